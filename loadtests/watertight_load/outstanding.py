"""What this process's cardholders have outstanding: the open holds, the purchases that can
still become installments, and the spending to repay.

Owns: the book-keeping that turns single requests into a realistic flow (an authorization is
later cleared or reversed; a cleared purchase of 500 CNY or more may become an installment
plan; what was spent is repaid so that lines do not run out in a long run). One per process,
shared by its users (greenlets: no locks needed, nothing here yields).
Never: grow without bound (the oldest hold beyond ``HOLDS_MAX`` is left open: the core expires
it); repay a purchase still waiting to become an installment (the core refuses to convert a
repaid purchase).
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field

from watertight_load.population import Customer

HOLDS_MAX = 10_000
BOOKABLE_MAX = 1_000
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


@dataclass
class Outstanding:
    holds: deque[Hold] = field(default_factory=lambda: deque(maxlen=HOLDS_MAX))
    bookable: deque[Purchase] = field(default_factory=lambda: deque(maxlen=BOOKABLE_MAX))
    owed_fen: dict[str, tuple[Customer, int]] = field(default_factory=dict)

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
