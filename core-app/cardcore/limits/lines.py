"""The credit-line tree of an account and what is available at every node.

``total`` is shared by ``purchase``, ``cash`` and ``installment``. A child line is a **share of
the total** (STD: purchase 100 %, cash 50 %, installment 100 %): its limit is kept at share x the
total's limit, so raising the total raises every child, and it gets its share of every temporary
raise of the total on top of its own. At every node:
available = limit + temporary - used - held, where used is what is posted on the line net of any
credit balance (a prepayment can be spent on any line); a child never shows more than its
parent. Posted amounts derive from the journal balances. Never: write to the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, timedelta
from decimal import Decimal
from typing import Any

from cardcore.accounting import journal
from cardcore.common.money import fen_of

LINES = ("total", "purchase", "cash", "installment")
PARENT = {"purchase": "total", "cash": "total", "installment": "total"}
HOLD_LINES = ("purchase", "cash")
CHILD_LINES = ("purchase", "cash", "installment")


@dataclass(frozen=True, slots=True)
class StatementRef:
    """The account's last statement, as much of it as a batch needs."""

    statement_id: str
    statement_date: date
    due_date: date
    balance_fen: int
    minimum_due_fen: int
    converted_fen: int
    fixed_due_fen: int
    revolving_fen: int
    min_due_rate: Decimal
    min_due_floor_fen: int


def minimum_due(
    balance_fen: int, fixed_fen: int, revolving_fen: int, rate: Decimal | float, floor_fen: int
) -> int:
    """The minimum due of a statement: what is due in full (``fixed_fen``: fees, interest and
    installments of the cycle, past due) plus ``rate`` of the revolving rest, at least the floor,
    never more than the balance; nothing when nothing is owed."""
    if balance_fen <= 0:
        return 0
    return min(balance_fen, max(floor_fen, fixed_fen + fen_of(max(0, revolving_fen), rate)))


@dataclass(slots=True)
class AccountState:
    """One account under lock in a batch (or read for a view)."""

    account_id: str
    customer_id: str
    product_code: str
    status: str
    limits: dict[str, int]
    held: dict[str, int]
    temporary: dict[str, int] = field(default_factory=dict)
    balances: dict[str, int] = field(default_factory=dict)
    total_spend_fen: int = 0
    installment_plan_count: int = 0
    age: int = 0
    tags: dict[str, str] = field(default_factory=dict)  # tag -> source
    shares: dict[str, Decimal] = field(default_factory=dict)  # child line -> share of the total
    last_statement: StatementRef | None = None
    changed_held: bool = False
    changed_metrics: bool = False

    def posted(self, line: str) -> int:
        b = self.balances
        if line == "purchase":
            return b.get(journal.GL_PURCHASE, 0)
        if line == "cash":
            return b.get(journal.GL_CASH, 0)
        if line == "installment":
            return b.get(journal.GL_INSTALLMENT_UNBILLED, 0) + b.get(journal.GL_INSTALLMENT_BILLED, 0)
        return sum(b.values())  # total owed, net of any credit balance

    def credit_fen(self) -> int:
        """The credit balance (money paid in beyond what is owed), 0 when there is none."""
        return max(0, -self.balances.get(journal.GL_CREDIT_BALANCE, 0))

    def used(self, line: str) -> int:
        """Posted on the line, net of any credit balance (the total's posted is net already)."""
        if line == "total":
            return self.posted("total")
        return self.posted(line) - self.credit_fen()

    def held_on(self, line: str) -> int:
        if line == "total":
            return sum(self.held.get(name, 0) for name in HOLD_LINES)
        return self.held.get(line, 0)

    def share(self, line: str) -> Decimal:
        """A child line's share of the total (derived from the limits when none is stored)."""
        stored = self.shares.get(line)
        if stored is not None:
            return stored
        total = self.limits.get("total", 0)
        return min(Decimal(1), Decimal(self.limits[line]) / total) if total > 0 else Decimal(1)

    def temporary_of(self, line: str) -> int:
        """Live temporary raises of the line: its own, and a child's share of its parent's."""
        own = self.temporary.get(line, 0)
        parent = PARENT.get(line)
        if parent is None:
            return own
        return own + fen_of(self.temporary_of(parent), self.share(line))

    def own_available(self, line: str) -> int:
        return self.limits[line] + self.temporary_of(line) - self.used(line) - self.held_on(line)

    def available(self, line: str) -> int:
        own = self.own_available(line)
        parent = PARENT.get(line)
        if parent is not None:
            own = min(own, self.own_available(parent))
        return max(0, own)

    def can_hold(self, line: str, amount_fen: int) -> bool:
        """The line and every ancestor can take ``amount_fen`` more."""
        node: str | None = line
        while node is not None:
            if self.own_available(node) < amount_fen:
                return False
            node = PARENT.get(node)
        return True

    def hold(self, line: str, amount_fen: int) -> None:
        assert line in HOLD_LINES and amount_fen > 0
        assert self.can_hold(line, amount_fen), "approved beyond a line"
        self.held[line] = self.held.get(line, 0) + amount_fen
        self.changed_held = True

    def release(self, line: str, amount_fen: int) -> None:
        assert line in HOLD_LINES and 0 <= amount_fen <= self.held.get(line, 0), (line, amount_fen)
        self.held[line] -= amount_fen
        self.changed_held = True

    def apply(self, legs: list[journal.Leg]) -> None:
        for leg in legs:
            if leg.account_id == self.account_id:
                self.balances[leg.gl] = self.balances.get(leg.gl, 0) + leg.debit_fen - leg.credit_fen

    def child_limits(self, total_limit_fen: int) -> dict[str, int]:
        """Each child's limit for a total of ``total_limit_fen``: its share, half up."""
        return {line: fen_of(total_limit_fen, self.share(line)) for line in CHILD_LINES}

    def open_cycle_starts(self) -> date | None:
        """The first day after the last statement: nothing can be valued earlier."""
        last = self.last_statement
        return None if last is None else last.statement_date + timedelta(days=1)

    def metrics(self) -> dict[str, int]:
        return {
            "total_spend_fen": self.total_spend_fen,
            "installment_plan_count": self.installment_plan_count,
            "credit_limit_fen": self.limits["total"],
            "age": self.age,
        }

    def view(self) -> list[dict[str, Any]]:
        return [
            {
                "line": line,
                "limit": self.limits[line],
                "temporary": self.temporary_of(line),
                "used": self.used(line),
                "held": self.held_on(line),
                "available": self.available(line),
            }
            for line in LINES
        ]
