"""Double-entry journal: ledgers (gl codes), balanced entries, and repayment allocation.

Balances are debit minus credit. A customer account's receivables are debit-normal; its credit
balance (overpayment) is credit-normal. The bank's own ledgers sit under account id ''.
Never: build an entry whose debits and credits differ (asserted here, before any database).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date

BANK = ""

GL_PURCHASE = "purchase"
GL_CASH = "cash"
GL_INSTALLMENT_UNBILLED = "installment_unbilled"
GL_INSTALLMENT_BILLED = "installment_billed"
GL_FEES = "fees"
GL_INTEREST = "interest"
GL_CREDIT_BALANCE = "credit_balance"
CUSTOMER_GLS = (
    GL_PURCHASE,
    GL_CASH,
    GL_INSTALLMENT_UNBILLED,
    GL_INSTALLMENT_BILLED,
    GL_FEES,
    GL_INTEREST,
    GL_CREDIT_BALANCE,
)

GL_SCHEME_SETTLEMENT = "scheme_settlement"
GL_FUNDS_RECEIVED = "funds_received"
GL_INCOME_FEES = "income_fees"
GL_INCOME_INTEREST = "income_interest"

# Repayments pay fees first, then interest, installment due, cash, purchases; the rest is credit.
REPAYMENT_ORDER = (GL_FEES, GL_INTEREST, GL_INSTALLMENT_BILLED, GL_CASH, GL_PURCHASE)
ALLOCATION_NAMES = {
    GL_FEES: "fees",
    GL_INTEREST: "interest",
    GL_INSTALLMENT_BILLED: "installment_due",
    GL_CASH: "cash",
    GL_PURCHASE: "purchase",
    GL_CREDIT_BALANCE: "credit_balance",
}


@dataclass(frozen=True, slots=True)
class Leg:
    account_id: str
    gl: str
    debit_fen: int
    credit_fen: int


@dataclass(slots=True)
class Entry:
    account_id: str
    kind: str
    transaction_id: str | None
    legs: list[Leg]
    business_date: date | None = None  # the cycle's date, for the entries the cycle writes
    value_date: date | None = None  # from when the entry counts (interest, statements); set by the writer
    entry_id: int = 0  # assigned when written

    def __post_init__(self) -> None:
        assert self.legs, "an entry has legs"
        for leg in self.legs:
            assert leg.debit_fen >= 0 and leg.credit_fen >= 0, leg
            assert (leg.debit_fen == 0) != (leg.credit_fen == 0), leg
        debits = sum(leg.debit_fen for leg in self.legs)
        credits = sum(leg.credit_fen for leg in self.legs)
        assert debits == credits, f"unbalanced entry {self.kind}: {debits} != {credits}"


def transfer(
    account_id: str,
    kind: str,
    transaction_id: str | None,
    amount_fen: int,
    debit: tuple[str, str],
    credit: tuple[str, str],
    business_date: date | None = None,
    value_date: date | None = None,
) -> Entry:
    """Move ``amount_fen`` from ``credit`` (account, gl) to ``debit`` (account, gl)."""
    assert amount_fen > 0, amount_fen
    return Entry(
        account_id,
        kind,
        transaction_id,
        [Leg(debit[0], debit[1], amount_fen, 0), Leg(credit[0], credit[1], 0, amount_fen)],
        business_date,
        value_date,
    )


@dataclass(slots=True)
class Allocation:
    parts: dict[str, int] = field(default_factory=dict)  # gl -> fen

    def named(self) -> dict[str, int]:
        return {ALLOCATION_NAMES[gl]: self.parts.get(gl, 0) for gl in (*REPAYMENT_ORDER, GL_CREDIT_BALANCE)}


def allocate_repayment(amount_fen: int, balances: dict[str, int]) -> Allocation:
    """Split a repayment over the receivables in REPAYMENT_ORDER; the remainder becomes credit."""
    assert amount_fen > 0
    allocation = Allocation()
    left = amount_fen
    for gl in REPAYMENT_ORDER:
        owed = max(0, balances.get(gl, 0))
        part = min(owed, left)
        if part:
            allocation.parts[gl] = part
            left -= part
    if left:
        allocation.parts[GL_CREDIT_BALANCE] = left
    assert sum(allocation.parts.values()) == amount_fen
    return allocation


def repayment_entry(
    account_id: str, transaction_id: str, allocation: Allocation, value_date: date | None = None
) -> Entry:
    total = sum(allocation.parts.values())
    legs = [Leg(BANK, GL_FUNDS_RECEIVED, total, 0)]
    legs += [Leg(account_id, gl, 0, part) for gl, part in allocation.parts.items()]
    return Entry(account_id, "repayment", transaction_id, legs, value_date=value_date)


def refund_entry(
    account_id: str, transaction_id: str, amount_fen: int, purchase_owed_fen: int, value_date: date
) -> Entry:
    """A merchandise return: the scheme pays it back; it pays purchases owed, the rest is credit."""
    assert amount_fen > 0
    to_purchase = min(amount_fen, max(0, purchase_owed_fen))
    legs = [Leg(BANK, GL_SCHEME_SETTLEMENT, amount_fen, 0)]
    if to_purchase:
        legs.append(Leg(account_id, GL_PURCHASE, 0, to_purchase))
    if amount_fen - to_purchase:
        legs.append(Leg(account_id, GL_CREDIT_BALANCE, 0, amount_fen - to_purchase))
    return Entry(account_id, "refund", transaction_id, legs, value_date=value_date)
