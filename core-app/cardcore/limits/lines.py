"""The credit-line tree of an account and what is available at every node.

``total`` is shared by ``purchase``, ``cash`` and ``installment``. At every node:
available = limit + active temporary raise - posted - held; a child never shows more than its
parent. Posted amounts derive from the journal balances. Never: write to the database.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cardcore.accounting import journal

LINES = ("total", "purchase", "cash", "installment")
PARENT = {"purchase": "total", "cash": "total", "installment": "total"}
HOLD_LINES = ("purchase", "cash")


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

    def held_on(self, line: str) -> int:
        if line == "total":
            return sum(self.held.get(name, 0) for name in HOLD_LINES)
        return self.held.get(line, 0)

    def own_available(self, line: str) -> int:
        return self.limits[line] + self.temporary.get(line, 0) - self.posted(line) - self.held_on(line)

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
                "temporary": self.temporary.get(line, 0),
                "used": self.posted(line),
                "held": self.held_on(line),
                "available": self.available(line),
            }
            for line in LINES
        ]
