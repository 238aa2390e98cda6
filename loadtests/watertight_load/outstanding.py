"""What this process's cardholders have outstanding: the open holds, the purchases that can
still become installments or be returned, the spending to repay, and the authorizations whose
answer was lost.

Owns: the book-keeping that turns single requests into a realistic flow (an authorization is
later cleared, incremented or reversed; a cleared purchase of 500 CNY or more may become an
installment plan, a smaller one may be returned; what was spent is repaid so that lines do not
run out in a long run; an authorization or increment whose answer was lost is reversed by its
idempotency key at once, and while the core cannot answer again with the same reversal key,
waiting 1, 2, 4 ... ``RETRY_WAIT_S_MAX`` seconds between tries). One per process, shared by its
users (greenlets: no locks needed, nothing here yields).
Never: grow without bound (the oldest hold beyond ``HOLDS_MAX`` is left open: the core expires
it; the oldest lost answer beyond ``LOST_MAX`` is left to the hold's expiry); let reversals take
more than every other financial slot (an outage of one cell must not starve the others);
repay a purchase still waiting to become an installment (the core refuses to convert a repaid
purchase); return a purchase twice.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field, replace

from watertight_load.population import Customer

HOLDS_MAX = 10_000
BOOKABLE_MAX = 1_000
RETURNABLE_MAX = 1_000
LOST_MAX = 10_000
RETRY_WAIT_S_MAX = 30.0
INSTALLMENT_MIN_FEN = 50_000  # the catalogue's installment_min_fen: 500 CNY
LARGE_PURCHASE_SHARE = 0.05


def purchase_amount_fen() -> int:
    """Mostly everyday purchases of 10-400 CNY, one in twenty of 500-1,000 CNY."""
    if random.random() < LARGE_PURCHASE_SHARE:
        return random.randrange(INSTALLMENT_MIN_FEN, 100_001, 100)
    return random.randrange(1_000, 40_001, 10)


@dataclass(frozen=True)
class Hold:
    auth_id: str
    customer: Customer
    amount_fen: int


@dataclass(frozen=True)
class Purchase:
    transaction_id: str
    customer: Customer
    amount_fen: int


@dataclass(frozen=True)
class LostAnswer:
    """An authorization (or increment) that got no usable answer: reversed by its key, with
    ``reversal_key`` every time until the core answers."""

    original_key: str
    reversal_key: str
    customer: Customer
    amount_fen: int
    due_s: float = 0.0  # monotonic time of the next try
    tries: int = 0

    def again(self, now_s: float) -> LostAnswer:
        """The same reversal, tried again after a wait that doubles with each try."""
        wait_s = min(RETRY_WAIT_S_MAX, 2.0**self.tries)
        return replace(self, due_s=now_s + wait_s, tries=self.tries + 1)


@dataclass
class Outstanding:
    holds: deque[Hold] = field(default_factory=lambda: deque(maxlen=HOLDS_MAX))
    bookable: deque[Purchase] = field(default_factory=lambda: deque(maxlen=BOOKABLE_MAX))
    returnable: deque[Purchase] = field(default_factory=lambda: deque(maxlen=RETURNABLE_MAX))
    lost: deque[LostAnswer] = field(default_factory=lambda: deque(maxlen=LOST_MAX))
    owed_fen: dict[str, tuple[Customer, int]] = field(default_factory=dict)
    last_slot_reversed: bool = False

    def held(self, hold: Hold) -> None:
        self.holds.append(hold)

    def next_hold(self) -> Hold | None:
        return self.holds.popleft() if self.holds else None

    def cleared(self, purchase: Purchase) -> None:
        if purchase.amount_fen >= INSTALLMENT_MIN_FEN:
            if len(self.bookable) == self.bookable.maxlen:
                oldest = self.bookable.popleft()
                self.owe(oldest.customer, oldest.amount_fen)
            self.bookable.append(purchase)
        else:
            self.owe(purchase.customer, purchase.amount_fen)
            self.returnable.append(purchase)

    def next_returnable(self) -> Purchase | None:
        return self.returnable.popleft() if self.returnable else None

    def returned(self, customer: Customer, amount_fen: int) -> None:
        """A return pays what the customer owes: repay that much less."""
        entry = self.owed_fen.get(customer.customer_id)
        if entry is not None:
            left = entry[1] - amount_fen
            if left > 0:
                self.owed_fen[customer.customer_id] = (customer, left)
            else:
                del self.owed_fen[customer.customer_id]

    def lost_answer(self, answer: LostAnswer) -> None:
        self.lost.append(answer)

    def next_lost_answer(self, now_s: float | None = None) -> LostAnswer | None:
        """The lost answer to reverse in this slot: the first one due, unless the previous slot
        already was a reversal (at most every other slot)."""
        now_s = time.monotonic() if now_s is None else now_s
        if self.last_slot_reversed:
            self.last_slot_reversed = False
            return None
        for index, lost in enumerate(self.lost):
            if lost.due_s <= now_s:
                del self.lost[index]
                self.last_slot_reversed = True
                return lost
        return None

    def next_bookable(self) -> Purchase | None:
        return self.bookable.popleft() if self.bookable else None

    def owe(self, customer: Customer, amount_fen: int) -> None:
        _, owed = self.owed_fen.get(customer.customer_id, (customer, 0))
        self.owed_fen[customer.customer_id] = (customer, owed + amount_fen)

    def next_repayment(self) -> tuple[Customer, int] | None:
        """The customer who has owed longest and all they owe (forgotten until repaid again)."""
        if not self.owed_fen:
            return None
        customer_id = next(iter(self.owed_fen))
        return self.owed_fen.pop(customer_id)
