"""Accounting over HTTP: balances, transactions, statements (with their lines), repayments, the
cycle and the trial balance. Never: report a trial balance that was not computed from the
postings; page without a bound.
"""

from __future__ import annotations

import re
from datetime import UTC, date, datetime
from typing import Any

import msgspec

from cardcore.accounting.cycle import run_cycle
from cardcore.accounting.ops import RepaymentRequest
from cardcore.common import ids
from cardcore.platform.http import Request, Route, bad_request, not_found
from cardcore.platform.service import CoreService, cell_param
from cardcore.platform.state import load_accounts

PAGE_SIZE_MAX = 200
STATEMENT_LINES_MAX = 2000


# a transaction id's shape (the OpenAPI says the same); one of no transaction here is a 404
CURSOR_PATTERN = "^TX[0-9]{2}[A-Z2-7]{16}$"
CURSOR_RE = re.compile(CURSOR_PATTERN)


class CycleRequest(msgspec.Struct, forbid_unknown_fields=True):
    business_date: date


_LINE_COLUMNS = (
    "transaction_id, kind, amount_fen, auth_id, plan_id, original_transaction_id, details, value_date,"
    " statement_id, created_at"
)
_STATEMENT_COLUMNS = (
    "statement_id, statement_date, due_date, statement_balance_fen, minimum_due_fen, minimum_due_cut_fen, interest_fen,"
    " fees_fen, late_fee_fen, installment_due_fen, past_due_fen, converted_fen"
)


def _line(row: Any) -> dict[str, Any]:
    line = {
        "transaction_id": row["transaction_id"],
        "kind": row["kind"],
        "amount": row["amount_fen"],
        "value_date": row["value_date"],
        "details": msgspec.json.decode(row["details"]) if row["details"] else None,
        "statement_id": row["statement_id"],
        "created_at": row["created_at"],
    }
    for name in ("auth_id", "plan_id", "original_transaction_id"):
        if row[name] is not None or name == "auth_id":
            line[name] = row[name]
    return line


def _statement(row: Any) -> dict[str, Any]:
    return {
        "statement_id": row["statement_id"],
        "statement_date": row["statement_date"],
        "due_date": row["due_date"],
        "statement_balance": row["statement_balance_fen"],
        # after conversions into installments (converted); as cut: minimum_due_at_cut
        "minimum_due": row["minimum_due_fen"],
        "minimum_due_at_cut": row["minimum_due_cut_fen"],
        "interest": row["interest_fen"],
        "fees": row["fees_fen"],
        "late_fee": row["late_fee_fen"],
        "installment_due": row["installment_due_fen"],
        "past_due": row["past_due_fen"],
        "converted": row["converted_fen"],
    }


def routes(service: CoreService) -> list[Route]:
    def account_pool(account_id: str) -> Any:
        return service.engine_for_id(account_id, ids.PREFIX_ACCOUNT, "account_id").require_ready()

    async def balance(request: Request) -> tuple[int, Any]:
        account_id = request.params["account_id"]
        async with account_pool(account_id).acquire() as conn:
            states = await load_accounts(conn, [account_id], datetime.now(UTC), lock=False)
            if account_id not in states:
                raise not_found("account_id", f"account {account_id} not found")
            statement = await conn.fetchrow(
                "SELECT statement_date, statement_balance_fen, minimum_due_fen, due_date, converted_fen FROM statements"
                " WHERE account_id = $1 ORDER BY statement_date DESC LIMIT 1",
                account_id,
            )
            paid = 0
            if statement is not None:  # repayments valued after the statement pay its minimum
                paid = await conn.fetchval(
                    "SELECT coalesce(sum(amount_fen), 0)::bigint FROM transactions WHERE account_id = $1"
                    " AND kind = 'repayment' AND value_date > $2",
                    account_id,
                    statement["statement_date"],
                )
        state = states[account_id]
        return 200, {
            "account_id": account_id,
            "currency": "CNY",
            "posted": state.posted("total"),
            "held": state.held_on("total"),
            "available": state.available("total"),
            "statement_balance": statement["statement_balance_fen"] if statement else 0,
            "minimum_due": max(0, statement["minimum_due_fen"] - paid) if statement else 0,
            "due_date": statement["due_date"] if statement else None,
            "converted": statement["converted_fen"] if statement else 0,
            "credit_balance": state.credit_fen(),
            "ledgers": state.balances,
        }

    async def transactions(request: Request) -> tuple[int, Any]:
        account_id = request.params["account_id"]
        raw_limit = request.query.get("limit", "50")
        if not raw_limit.isdigit() or not 1 <= int(raw_limit) <= PAGE_SIZE_MAX:
            raise bad_request("limit", f"limit must be 1..{PAGE_SIZE_MAX}")
        limit = int(raw_limit)
        cursor = request.query.get("cursor")
        if cursor is not None and not CURSOR_RE.fullmatch(cursor):
            raise bad_request("cursor", "cursor must be a transaction_id (the last of the page before)")
        async with account_pool(account_id).acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id):
                raise not_found("account_id", f"account {account_id} not found")
            after: tuple[datetime, str] | None = None
            if cursor is not None:
                row = await conn.fetchrow(
                    "SELECT created_at, transaction_id FROM transactions WHERE transaction_id = $1 AND account_id = $2",
                    cursor,
                    account_id,
                )
                if row is None:
                    raise not_found("cursor", "cursor names no transaction of this account")
                after = (row[0], row[1])
            rows = await conn.fetch(
                f"SELECT {_LINE_COLUMNS} FROM transactions"
                " WHERE account_id = $1 AND ($2::timestamptz IS NULL OR (created_at, transaction_id) < ($2, $3))"
                " ORDER BY created_at DESC, transaction_id DESC LIMIT $4",
                account_id,
                after[0] if after else None,
                after[1] if after else "",
                limit + 1,
            )
        page = rows[:limit]
        return 200, {
            "account_id": account_id,
            "transactions": [_line(r) for r in page],
            "next_cursor": page[-1]["transaction_id"] if len(rows) > limit else None,
        }

    async def statements(request: Request) -> tuple[int, Any]:
        account_id = request.params["account_id"]
        async with account_pool(account_id).acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id):
                raise not_found("account_id", f"account {account_id} not found")
            rows = await conn.fetch(
                f"SELECT {_STATEMENT_COLUMNS} FROM statements WHERE account_id = $1 ORDER BY statement_date DESC",
                account_id,
            )
        return 200, {"account_id": account_id, "statements": [_statement(r) for r in rows]}

    async def statement(request: Request) -> tuple[int, Any]:
        account_id, statement_id = request.params["account_id"], request.params["statement_id"]
        async with account_pool(account_id).acquire() as conn:
            row = await conn.fetchrow(
                f"SELECT {_STATEMENT_COLUMNS} FROM statements WHERE account_id = $1 AND statement_id = $2",
                account_id,
                statement_id,
            )
            if row is None:
                raise not_found("statement_id", f"statement {statement_id} of account {account_id} not found")
            lines = await conn.fetch(
                f"SELECT {_LINE_COLUMNS} FROM transactions WHERE statement_id = $1"
                " ORDER BY value_date, created_at, transaction_id LIMIT $2",
                statement_id,
                STATEMENT_LINES_MAX + 1,
            )
        return 200, {
            "account_id": account_id,
            **_statement(row),
            "lines": [_line(r) for r in lines[:STATEMENT_LINES_MAX]],
            "lines_truncated": len(lines) > STATEMENT_LINES_MAX,
        }

    async def repay(request: Request) -> tuple[int, Any]:
        body: RepaymentRequest = request.decode(RepaymentRequest)
        engine = service.engine_for_id(body.account_id, ids.PREFIX_ACCOUNT, "account_id")
        return await engine.submit("repay", body.idempotency_key, body)

    async def cycle(request: Request) -> tuple[int, Any]:
        body: CycleRequest = request.decode(CycleRequest)
        results = {}
        for engine in cell_param(service, request.query, required=False):
            results[str(engine.cell)] = await run_cycle(engine, body.business_date)
        return 200, {"business_date": body.business_date, "cells": results}

    async def trial_balance(request: Request) -> tuple[int, Any]:
        (engine,) = cell_param(service, request.query, required=True)
        async with (
            engine.require_ready().acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            debits, credits = await conn.fetchrow(
                "SELECT coalesce(sum(debit_fen), 0)::bigint, coalesce(sum(credit_fen), 0)::bigint FROM postings"
            )
            unbalanced = await conn.fetchval(
                "SELECT count(*) FROM (SELECT entry_id FROM postings GROUP BY entry_id"
                " HAVING sum(debit_fen) <> sum(credit_fen)) AS bad"
            )
            mismatched = await conn.fetchval(
                "SELECT count(*) FROM (SELECT account_id, gl, sum(debit_fen - credit_fen) AS total FROM postings"
                " WHERE account_id <> '' GROUP BY 1, 2) AS p FULL JOIN balances b USING (account_id, gl)"
                " WHERE coalesce(p.total, 0) <> coalesce(b.balance_fen, 0)"
            )
            held_mismatch = await conn.fetchval(
                "SELECT count(*) FROM lines l LEFT JOIN (SELECT account_id, line, sum(hold_fen) AS held FROM authorizations"
                " WHERE status = 'open' GROUP BY 1, 2) h USING (account_id, line) WHERE l.held_fen <> coalesce(h.held, 0)"
            )
        return 200, {
            "cell": engine.cell,
            "debits": debits,
            "credits": credits,
            "balanced": debits == credits and unbalanced == 0,
            "entries_unbalanced": unbalanced,
            "balances_match_postings": mismatched == 0,
            "holds_match_lines": held_mismatch == 0,
        }

    return [
        Route(
            "GET",
            "/v1/accounts/{account_id}/balance",
            balance,
            "Posted, held, available, statement and minimum due",
            tag="accounting",
        ),
        Route(
            "GET",
            "/v1/accounts/{account_id}/transactions",
            transactions,
            "Posted transactions, newest first, paged",
            tag="accounting",
        ),
        Route(
            "GET",
            "/v1/accounts/{account_id}/statements",
            statements,
            "Statements, newest first",
            tag="accounting",
        ),
        Route(
            "GET",
            "/v1/accounts/{account_id}/statements/{statement_id}",
            statement,
            "One statement with its lines (the transactions it bills)",
            tag="accounting",
        ),
        Route(
            "POST",
            "/v1/repayments",
            repay,
            "A repayment, allocated fees first",
            RepaymentRequest,
            tag="accounting",
        ),
        Route(
            "POST",
            "/v1/admin/cycle",
            cycle,
            "Run the statement cycle for a business date (idempotent)",
            CycleRequest,
            tag="accounting",
        ),
        Route(
            "GET",
            "/v1/admin/trial-balance",
            trial_balance,
            "Trial balance of one cell (?cell=N)",
            tag="accounting",
        ),
    ]
