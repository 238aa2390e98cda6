"""The statement cycle for one business date, online: each account in its own short transaction
under the same account lock the group commit takes, so traffic keeps flowing.

Running the cycle for a date first moves the cell's business date to it (when later): postings
made from then on are valued on it (on an account whose statement is cut, the day after). Then,
for every account whose cycle day it is:

1. each active installment plan bills its next period (principal and fee, due in full);
2. a late fee when the previous statement's minimum was not paid by its due date: ``late_fee_rate``
   of what was left unpaid of it, at least ``late_fee_min_fen``;
3. interest on the days of the cycle (from the day after the previous statement to this one; a
   first statement: from the same day a month before), at the priced APR / 365 on each day's
   balance by value date (daily accrual): cash advances always bear interest from their value
   date; purchases only when the grace is lost, i.e. the previous statement (less what was
   converted into installments) was not paid in full by its due date, counting repayments and
   refunds valued by then. Fees, interest and installment dues never bear interest (unpaid
   installment dues are past due: in full in the next minimum, with the late fee); a credit
   balance offsets what bears interest;
4. the statement: its balance is everything valued by the statement date except installment
   principal not yet billed; it shows the fees, interest and installments charged in the cycle
   and the past due (the previous minimum less the repayments valued since); minimum due =
   ``lines.minimum_due`` (the fees, interest and installments of the cycle and the past due in
   full, ``min_due_rate`` of the revolving rest, at least the floor, at most the balance); due
   date = statement date + ``grace_days``; every transaction valued by the statement date and on
   no earlier statement becomes a line of it.

Every amount is rounded once, half up (``common.money``). Idempotent per date: an account with a
statement on or after the date is skipped.
Never: charge interest on purchases of a statement paid in full by its due date, or on fees,
interest and installment dues; count a repayment from before the day it is valued.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from cardcore.accounting import journal
from cardcore.common import ids
from cardcore.common.money import decimal_of, fen, fen_of
from cardcore.common.pricing import PriceContext, price
from cardcore.limits.lines import StatementRef, minimum_due
from cardcore.platform.engine import CellEngine
from cardcore.platform.state import TransactionRow, Writes, load_accounts, read_business_date

log = logging.getLogger("cardcore.cycle")

ACCOUNTS_PER_QUERY_MAX = 1000
DAYS_PER_YEAR = 365
PAYMENT_KINDS = ("repayment", "refund")

_MOVEMENTS = """
SELECT j.value_date, p.gl, sum(p.debit_fen)::bigint, sum(p.credit_fen)::bigint
  FROM postings p JOIN journal_entries j ON j.entry_id = p.entry_id
 WHERE p.account_id = $1 AND j.value_date <= $2
 GROUP BY 1, 2
"""
_PAYMENTS = """
SELECT kind, value_date, amount_fen FROM transactions
 WHERE account_id = $1 AND kind = ANY($2::text[]) AND value_date > $3 AND value_date <= $4
"""


@dataclass(frozen=True, slots=True)
class Movement:
    value_date: date
    gl: str
    debit_fen: int
    credit_fen: int


class Ledgers:
    """An account's postings by value date and ledger, up to the statement date."""

    def __init__(self, movements: Iterable[Movement]) -> None:
        self.movements = list(movements)

    def add(self, entry: journal.Entry, account_id: str) -> None:
        assert entry.value_date is not None
        for leg in entry.legs:
            if leg.account_id == account_id:
                self.movements.append(Movement(entry.value_date, leg.gl, leg.debit_fen, leg.credit_fen))

    def balance(self, gl: str, on: date) -> int:
        """Debit minus credit of ``gl`` valued on or before ``on``."""
        return sum(m.debit_fen - m.credit_fen for m in self.movements if m.gl == gl and m.value_date <= on)

    def debits(self, gl: str, after: date, until: date) -> int:
        """What was charged to ``gl`` valued after ``after``, up to ``until``."""
        return sum(m.debit_fen for m in self.movements if m.gl == gl and after < m.value_date <= until)

    def daily(self, gls: tuple[str, ...], after: date, until: date) -> list[int]:
        """The summed balance of ``gls`` at the end of each day after ``after`` up to ``until``."""
        level = sum(self.balance(gl, after) for gl in gls)
        changes: dict[date, int] = {}
        for m in self.movements:
            if m.gl in gls and after < m.value_date <= until:
                changes[m.value_date] = changes.get(m.value_date, 0) + m.debit_fen - m.credit_fen
        days = []
        day = after
        while day < until:
            day += timedelta(days=1)
            level += changes.get(day, 0)
            days.append(level)
        return days


def month_before(day: date) -> date:
    """The same day a month earlier (the month's last day when it has no such day)."""
    year, month = (day.year - 1, 12) if day.month == 1 else (day.year, day.month - 1)
    following = date(year + (month == 12), month % 12 + 1, 1)
    return date(year, month, min(day.day, (following - timedelta(days=1)).day))


def daily_interest_fen(balances_fen: list[int], apr: float | Decimal) -> int:
    """Interest on a list of end-of-day balances (negative days count as nothing), half up."""
    fen_days = sum(max(0, balance) for balance in balances_fen)
    return fen(Decimal(fen_days) * decimal_of(apr) / DAYS_PER_YEAR)


async def advance_business_date(conn: asyncpg.Connection, business_date: date) -> None:
    await conn.execute(
        "INSERT INTO business_clock (business_date) VALUES ($1) ON CONFLICT (singleton) DO UPDATE"
        " SET business_date = EXCLUDED.business_date WHERE business_clock.business_date < EXCLUDED.business_date",
        business_date,
    )


async def run_cycle(engine: CellEngine, business_date: date) -> dict[str, Any]:
    pool = engine.require_ready()
    totals = {
        "accounts_due": 0,
        "statements_created": 0,
        "interest": 0,
        "fees": 0,
        "late_fees": 0,
        "installment_billed": 0,
    }
    async with pool.acquire() as conn:
        await advance_business_date(conn, business_date)
        cell_date = await read_business_date(conn, datetime.now(UTC))
    last = ""
    while True:
        async with pool.acquire() as conn:
            account_ids = [
                row[0]
                for row in await conn.fetch(
                    "SELECT account_id FROM accounts WHERE cycle_day = $1 AND account_id > $2 ORDER BY account_id LIMIT $3",
                    business_date.day,
                    last,
                    ACCOUNTS_PER_QUERY_MAX,
                )
            ]
            for account_id in account_ids:
                result = await _cycle_account(engine, conn, account_id, business_date)
                totals["accounts_due"] += 1
                if result is not None:
                    totals["statements_created"] += 1
                    for key in ("interest", "fees", "late_fees", "installment_billed"):
                        totals[key] += result[key]
        if len(account_ids) < ACCOUNTS_PER_QUERY_MAX:
            break
        last = account_ids[-1]
    async with pool.acquire() as conn:
        await conn.execute(
            "INSERT INTO cycle_runs (business_date, accounts) VALUES ($1, $2) ON CONFLICT (business_date) DO NOTHING",
            business_date,
            totals["accounts_due"],
        )
    log.info("cell %s: cycle %s: %s", engine.cell, business_date, totals)
    return {
        "cell": engine.cell,
        "business_date": business_date.isoformat(),
        # the cell's business date now: postings are valued on it (it never moves back)
        "cell_business_date": cell_date.isoformat(),
        **totals,
    }


async def _cycle_account(
    engine: CellEngine, conn: asyncpg.Connection, account_id: str, business_date: date
) -> dict[str, int] | None:
    now = datetime.now(UTC)
    async with conn.transaction():
        states = await load_accounts(conn, [account_id], now, lock=True)
        state = states[account_id]
        previous = state.last_statement
        if previous is not None and previous.statement_date >= business_date:
            return None
        params = engine.catalogue.products[state.product_code]
        start = previous.statement_date if previous is not None else month_before(business_date)
        ledgers = Ledgers(Movement(*row) for row in await conn.fetch(_MOVEMENTS, account_id, business_date))
        payments = [
            (kind, valued, amount)
            for kind, valued, amount in await conn.fetch(
                _PAYMENTS, account_id, list(PAYMENT_KINDS), start, business_date
            )
        ]
        writes = Writes()

        def post(
            entry: journal.Entry, kind: str, amount_fen: int, details: dict[str, Any], **row: Any
        ) -> None:
            writes.entries.append(entry)
            state.apply(entry.legs)
            ledgers.add(entry, account_id)
            writes.transactions.append(
                TransactionRow(
                    ids.new_id(ids.PREFIX_TRANSACTION, engine.cell),
                    account_id,
                    kind,
                    amount_fen,
                    business_date,
                    entry,
                    details,
                    **row,
                )
            )

        billed = await _bill_installments(conn, account_id, business_date, writes, post)
        late_fee = _late_fee(previous, payments, business_date, params)
        if late_fee:
            assert previous is not None
            entry = _charge(
                account_id, "late_fee", late_fee, journal.GL_FEES, journal.GL_INCOME_FEES, business_date
            )
            post(entry, "late_fee", late_fee, {"statement_id": previous.statement_id})
        grace = _grace(previous, payments)
        apr = price(
            "apr",
            PriceContext(state.product_code, state.account_id, now, frozenset(state.tags)),
            params,
            engine.catalogue.rules,
        )
        bearing: tuple[str, ...] = (journal.GL_CASH, journal.GL_CREDIT_BALANCE)
        if not grace:
            bearing += (journal.GL_PURCHASE,)
        days = ledgers.daily(bearing, start, business_date)
        interest = daily_interest_fen(days, apr.value)
        if interest:
            entry = _charge(
                account_id,
                "interest",
                interest,
                journal.GL_INTEREST,
                journal.GL_INCOME_INTEREST,
                business_date,
            )
            post(
                entry,
                "interest",
                interest,
                {
                    "from": start + timedelta(days=1),
                    "to": business_date,
                    "days": len(days),
                    "apr": apr.value,
                    "grace": grace,
                    "balance_fen_days": sum(max(0, d) for d in days),
                },
            )
        statement = _statement(previous, ledgers, payments, business_date, params)
        statement_id = ids.new_id(ids.PREFIX_STATEMENT, engine.cell)
        await writes.flush(conn, states.values(), engine.catalogue.tag_rules)
        await conn.execute(
            "INSERT INTO statements (statement_id, account_id, statement_date, due_date, statement_balance_fen,"
            " minimum_due_fen, interest_fen, fees_fen, installment_due_fen, past_due_fen, late_fee_fen, fixed_due_fen,"
            " revolving_fen, min_due_rate, min_due_floor_fen, minimum_due_cut_fen)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::numeric, $15, $6)",
            statement_id,
            account_id,
            business_date,
            business_date + timedelta(days=int(params["grace_days"])),
            statement["balance"],
            statement["minimum"],
            statement["interest"],
            statement["fees"],
            statement["installment_due"],
            statement["past_due"],
            late_fee,
            statement["fixed"],
            statement["revolving"],
            str(params["min_due_rate"]),
            int(params["min_due_floor_fen"]),
        )
        await conn.execute(
            "UPDATE transactions SET statement_id = $1 WHERE account_id = $2 AND statement_id IS NULL AND value_date <= $3",
            statement_id,
            account_id,
            business_date,
        )
    return {
        "interest": interest,
        "fees": statement["fees"],
        "late_fees": late_fee,
        "installment_billed": billed,
    }


def _charge(account_id: str, kind: str, amount_fen: int, gl: str, income_gl: str, on: date) -> journal.Entry:
    return journal.transfer(
        account_id, kind, None, amount_fen, (account_id, gl), (journal.BANK, income_gl), on, on
    )


Post = Callable[..., None]


async def _bill_installments(
    conn: asyncpg.Connection, account_id: str, business_date: date, writes: Writes, post: Post
) -> int:
    """Bill the next period of every active plan; the principal and fees billed."""
    billed = 0
    for plan in await conn.fetch(
        "SELECT plan_id, terms, schedule, periods_billed FROM installment_plans WHERE account_id = $1"
        " AND status = 'active' ORDER BY plan_id",
        account_id,
    ):
        period = msgspec.json.decode(plan["schedule"])[plan["periods_billed"]]
        legs = [
            journal.Leg(account_id, journal.GL_INSTALLMENT_BILLED, period["principal"], 0),
            journal.Leg(account_id, journal.GL_INSTALLMENT_UNBILLED, 0, period["principal"]),
        ]
        if period["fee"]:
            legs += [
                journal.Leg(account_id, journal.GL_FEES, period["fee"], 0),
                journal.Leg(journal.BANK, journal.GL_INCOME_FEES, 0, period["fee"]),
            ]
        entry = journal.Entry(account_id, "installment_bill", None, legs, business_date, business_date)
        amount = period["principal"] + period["fee"]
        post(
            entry,
            "installment_bill",
            amount,
            {"period": period["period"], "principal": period["principal"], "fee": period["fee"]},
            plan_id=plan["plan_id"],
        )
        billed += amount
        periods = plan["periods_billed"] + 1
        writes.plan_updates[plan["plan_id"]] = (
            periods,
            "completed" if periods == plan["terms"] else "active",
        )
    return billed


def _paid(payments: list[tuple[str, date, int]], kinds: tuple[str, ...], after: date, until: date) -> int:
    return sum(amount for kind, valued, amount in payments if kind in kinds and after < valued <= until)


def _grace(previous: StatementRef | None, payments: list[tuple[str, date, int]]) -> bool:
    """Purchases bear no interest this cycle: the previous statement, less what was converted
    into installments, was paid in full by its due date (or there was none to pay)."""
    if previous is None:
        return True
    owed = previous.balance_fen - previous.converted_fen
    return owed <= 0 or _paid(payments, PAYMENT_KINDS, previous.statement_date, previous.due_date) >= owed


def _late_fee(
    previous: StatementRef | None,
    payments: list[tuple[str, date, int]],
    business_date: date,
    params: dict[str, Any],
) -> int:
    if previous is None or previous.minimum_due_fen <= 0 or previous.due_date >= business_date:
        return 0
    repaid = _paid(payments, ("repayment",), previous.statement_date, previous.due_date)
    unpaid = previous.minimum_due_fen - repaid
    if unpaid <= 0:
        return 0
    return max(int(params.get("late_fee_min_fen", 0)), fen_of(unpaid, params.get("late_fee_rate", 0)))


def _statement(
    previous: StatementRef | None,
    ledgers: Ledgers,
    payments: list[tuple[str, date, int]],
    business_date: date,
    params: dict[str, Any],
) -> dict[str, int]:
    on = business_date
    owed = {gl: ledgers.balance(gl, on) for gl in journal.CUSTOMER_GLS}
    balance = sum(owed.values()) - owed[journal.GL_INSTALLMENT_UNBILLED]
    # charged since the previous statement (a first statement: since the account opened)
    since = previous.statement_date if previous is not None else date.min
    fees = ledgers.debits(journal.GL_FEES, since, on)
    interest = ledgers.debits(journal.GL_INTEREST, since, on)
    installments = ledgers.debits(journal.GL_INSTALLMENT_BILLED, since, on)
    past_due = 0
    if previous is not None:
        repaid = _paid(payments, ("repayment",), previous.statement_date, on)
        past_due = max(0, previous.minimum_due_fen - repaid)
    # due in full: what the cycle charged and is still owed, and the past due
    fixed = (
        min(fees, max(0, owed[journal.GL_FEES]))
        + min(interest, max(0, owed[journal.GL_INTEREST]))
        + min(installments, max(0, owed[journal.GL_INSTALLMENT_BILLED]))
        + past_due
    )
    fixed = min(fixed, max(0, balance))
    revolving = max(0, balance - fixed)
    rate = params["min_due_rate"]
    floor = int(params["min_due_floor_fen"])
    return {
        "balance": balance,
        "fees": fees,
        "interest": interest,
        "installment_due": installments,
        "past_due": past_due,
        "fixed": fixed,
        "revolving": revolving,
        "minimum": minimum_due(balance, fixed, revolving, decimal_of(rate), floor),
    }
