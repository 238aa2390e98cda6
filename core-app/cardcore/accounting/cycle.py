"""The statement cycle for one business date, online: each account in its own short transaction
under the same account lock the group commit takes, so traffic keeps flowing.

For accounts whose cycle day it is: bill the next period of every active installment plan,
charge interest on the revolving balance of the previous statement, then cut a statement with
minimum due = max(floor, rate x balance) + fees + interest + installment due (capped at the
balance). Idempotent per date: an account that already has its statement is skipped.
Never: charge interest inside the grace period or when the previous statement was paid in full.
"""

from __future__ import annotations

import logging
from datetime import UTC, date, datetime, timedelta
from typing import Any

import asyncpg
import msgspec

from cardcore.accounting import journal
from cardcore.common import ids
from cardcore.common.pricing import PriceContext, price
from cardcore.platform.engine import CellEngine
from cardcore.platform.state import Writes, load_accounts

log = logging.getLogger("cardcore.cycle")

ACCOUNTS_PER_QUERY_MAX = 1000


async def run_cycle(engine: CellEngine, business_date: date) -> dict[str, Any]:
    pool = engine.require_ready()
    totals = {"accounts_due": 0, "statements_created": 0, "interest": 0, "fees": 0, "installment_billed": 0}
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
                    for key in ("interest", "fees", "installment_billed"):
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
    return {"cell": engine.cell, "business_date": business_date.isoformat(), **totals}


async def _cycle_account(
    engine: CellEngine, conn: asyncpg.Connection, account_id: str, business_date: date
) -> dict[str, int] | None:
    now = datetime.now(UTC)
    async with conn.transaction():
        states = await load_accounts(conn, [account_id], now, lock=True)
        state = states[account_id]
        if await conn.fetchval(
            "SELECT 1 FROM statements WHERE account_id = $1 AND statement_date = $2",
            account_id,
            business_date,
        ):
            return None
        params = engine.catalogue.products[state.product_code]
        writes = Writes()
        fees = installment_due = installment_principal = 0  # installment_due = its principal + fee
        for plan in await conn.fetch(
            "SELECT plan_id, terms, schedule, periods_billed FROM installment_plans WHERE account_id = $1"
            " AND status = 'active' ORDER BY plan_id",
            account_id,
        ):
            period = msgspec.json.decode(plan["schedule"])[plan["periods_billed"]]
            entry = journal.Entry(
                account_id,
                "installment_bill",
                None,
                [
                    journal.Leg(account_id, journal.GL_INSTALLMENT_BILLED, period["principal"], 0),
                    journal.Leg(account_id, journal.GL_INSTALLMENT_UNBILLED, 0, period["principal"]),
                ]
                + (
                    [
                        journal.Leg(account_id, journal.GL_FEES, period["fee"], 0),
                        journal.Leg(journal.BANK, journal.GL_INCOME_FEES, 0, period["fee"]),
                    ]
                    if period["fee"]
                    else []
                ),
                business_date,
            )
            writes.entries.append(entry)
            state.apply(entry.legs)
            fees += period["fee"]
            installment_due += period["principal"] + period["fee"]
            installment_principal += period["principal"]
            periods = plan["periods_billed"] + 1
            writes.plan_updates[plan["plan_id"]] = (
                periods,
                "completed" if periods == plan["terms"] else "active",
            )
        interest = await _interest(conn, engine, state, business_date)
        if interest:
            entry = journal.transfer(
                account_id,
                "interest",
                None,
                interest,
                (account_id, journal.GL_INTEREST),
                (journal.BANK, journal.GL_INCOME_INTEREST),
                business_date,
            )
            writes.entries.append(entry)
            state.apply(entry.legs)
        # the statement balance: everything owed except principal not yet billed
        balance = state.posted("total") - state.balances.get(journal.GL_INSTALLMENT_UNBILLED, 0)
        minimum = 0
        if balance > 0:
            # each part of the balance counts once: the installment fee is among the fees
            revolving = max(0, balance - fees - interest - installment_principal)
            minimum = min(
                balance,
                max(int(params["min_due_floor_fen"]), round(revolving * float(params["min_due_rate"])))
                + fees
                + interest
                + installment_principal,
            )
        await writes.flush(conn, states.values(), engine.catalogue.tag_rules)
        await conn.execute(
            "INSERT INTO statements (statement_id, account_id, statement_date, due_date, statement_balance_fen,"
            " minimum_due_fen, interest_fen, fees_fen, installment_due_fen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            ids.new_id(ids.PREFIX_STATEMENT, engine.cell),
            account_id,
            business_date,
            business_date + timedelta(days=int(params["grace_days"])),
            balance,
            minimum,
            interest,
            fees,
            installment_due,
        )
    return {"interest": interest, "fees": fees, "installment_billed": installment_due}


async def _interest(conn: asyncpg.Connection, engine: CellEngine, state: Any, business_date: date) -> int:
    """Daily interest at the priced APR on what was left unpaid of the previous statement, from
    its statement date, once its due date has passed. Payments count from the moment that
    statement was cut (wall clock), since business dates may be run ahead of time."""
    previous = await conn.fetchrow(
        "SELECT statement_date, due_date, statement_balance_fen, created_at FROM statements WHERE account_id = $1"
        " AND statement_date < $2 ORDER BY statement_date DESC LIMIT 1",
        state.account_id,
        business_date,
    )
    if previous is None or previous["statement_balance_fen"] <= 0 or previous["due_date"] >= business_date:
        return 0
    paid = await conn.fetchval(
        "SELECT coalesce(sum(amount_fen), 0)::bigint FROM transactions WHERE account_id = $1 AND kind = 'repayment'"
        " AND created_at > $2",
        state.account_id,
        previous["created_at"],
    )
    unpaid = previous["statement_balance_fen"] - paid
    if unpaid <= 0:
        return 0
    apr = price(
        "apr",
        PriceContext(state.product_code, state.account_id, datetime.now(UTC), frozenset(state.tags)),
        engine.catalogue.products[state.product_code],
        engine.catalogue.rules,
    )
    days = (business_date - previous["statement_date"]).days
    return round(unpaid * apr.value * days / 365)
