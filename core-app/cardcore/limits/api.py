"""Limits: one unified view of every credit line of a customer, permanent changes and
temporary raises. Changes take the same account lock as the group commit.

Child lines are shares of the total (``lines.py``): a new total limit moves every child to its
share of it; a child's new limit sets its share (never above the total).
Never: set a limit below what the line (or, through its share, a child) already uses.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Any

import asyncpg
import msgspec

from cardcore.common import ids
from cardcore.common.types import AMOUNT_FEN_MAX, AmountFen, Line
from cardcore.limits.lines import CHILD_LINES, PARENT, AccountState
from cardcore.platform.http import Request, Route, bad_request, not_found, unprocessable
from cardcore.platform.service import CoreService
from cardcore.platform.state import load_accounts, load_customer_account, write_rule_tags

TEMPORARY_DAYS_MAX = 365


class TemporaryRaiseRequest(msgspec.Struct, forbid_unknown_fields=True):
    line: Line
    amount: AmountFen
    expires_at: Annotated[
        datetime,
        msgspec.Meta(
            tz=True,
            description=f"RFC 3339 with an offset, in the future and at most {TEMPORARY_DAYS_MAX} days "
            "ahead. The schema cannot say when now is: any other time is refused with 400.",
        ),
    ]


class LimitRequest(msgspec.Struct, forbid_unknown_fields=True):
    line: Line
    limit: Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_FEN_MAX)]


async def account_of_customer(
    conn: asyncpg.Connection, customer_id: str, now: datetime, lock: bool
) -> AccountState:
    if not lock:
        state = await load_customer_account(conn, customer_id, now)
        if state is None:
            raise not_found("customer_id", f"customer {customer_id} not found")
        return state
    account_id = await conn.fetchval(
        "SELECT account_id FROM accounts WHERE customer_id = $1 ORDER BY created_at LIMIT 1", customer_id
    )
    if account_id is None:
        raise not_found("customer_id", f"customer {customer_id} not found")
    return (await load_accounts(conn, [account_id], now, lock=True))[account_id]


def limits_view(customer_id: str, state: AccountState) -> dict[str, Any]:
    return {"customer_id": customer_id, "account_id": state.account_id, "lines": state.view()}


def routes(service: CoreService) -> list[Route]:
    def pool_for(customer_id: str) -> asyncpg.Pool:
        return service.engine_for_id(customer_id, ids.PREFIX_CUSTOMER, "customer_id").require_ready()

    async def get_limits(request: Request) -> tuple[int, Any]:
        customer_id = request.params["customer_id"]
        async with pool_for(customer_id).acquire() as conn:
            state = await account_of_customer(conn, customer_id, datetime.now(UTC), lock=False)
        return 200, limits_view(customer_id, state)

    async def temporary(request: Request) -> tuple[int, Any]:
        customer_id = request.params["customer_id"]
        body: TemporaryRaiseRequest = request.decode(TemporaryRaiseRequest)
        now = datetime.now(UTC)
        if body.expires_at <= now:
            raise bad_request("expires_at", "expires_at must be in the future")
        if body.expires_at > now + timedelta(days=TEMPORARY_DAYS_MAX):
            raise bad_request("expires_at", f"a temporary raise lasts at most {TEMPORARY_DAYS_MAX} days")
        async with pool_for(customer_id).acquire() as conn, conn.transaction():
            state = await account_of_customer(conn, customer_id, now, lock=True)
            raise_id = await conn.fetchval(
                "INSERT INTO temporary_raises (account_id, line, amount_fen, expires_at) VALUES ($1, $2, $3, $4) RETURNING raise_id",
                state.account_id,
                body.line,
                body.amount,
                body.expires_at,
            )
            state.temporary[body.line] = state.temporary.get(body.line, 0) + body.amount
        return 201, {
            "raise_id": raise_id,
            "line": body.line,
            "amount": body.amount,
            "expires_at": body.expires_at,
            **limits_view(customer_id, state),
        }

    async def set_limit(request: Request) -> tuple[int, Any]:
        customer_id = request.params["customer_id"]
        body: LimitRequest = request.decode(LimitRequest)
        engine = service.engine_for_id(customer_id, ids.PREFIX_CUSTOMER, "customer_id")
        async with engine.require_ready().acquire() as conn, conn.transaction():
            state = await account_of_customer(conn, customer_id, datetime.now(UTC), lock=True)
            parent = PARENT.get(body.line)
            if parent is not None and body.limit > state.limits[parent]:
                raise unprocessable(
                    "above_parent",
                    f"limit {body.limit} is above the {parent} line's {state.limits[parent]}",
                    "limit",
                )
            shares: dict[str, Decimal | None] = {}
            if body.line == "total":
                changes = {"total": body.limit, **state.child_limits(body.limit)}
                shares = {line: state.share(line) for line in CHILD_LINES}
            else:
                changes = {body.line: body.limit}
                total = state.limits["total"]
                shares[body.line] = Decimal(body.limit) / total if total > 0 else None
            for line, limit in changes.items():
                used = state.used(line) + state.held_on(line)
                if limit < used:
                    what = (
                        ""
                        if line == body.line
                        else f" (the {line} line, a share of the total, would be {limit})"
                    )
                    raise unprocessable(
                        "below_used",
                        f"limit {body.limit} is below what the {line} line uses ({used}){what}",
                        "limit",
                    )
            await conn.execute(
                "UPDATE lines l SET limit_fen = u.x, share = coalesce(u.s, l.share)"
                " FROM unnest($2::text[], $3::bigint[], $4::numeric[]) AS u(line, x, s)"
                " WHERE l.account_id = $1 AND l.line = u.line",
                state.account_id,
                list(changes),
                list(changes.values()),
                [shares.get(line) for line in changes],
            )
            for line, share in shares.items():
                if share is not None:
                    state.shares[line] = share
            state.limits.update(changes)
            await write_rule_tags(conn, [state], engine.catalogue.tag_rules)
        return 200, limits_view(customer_id, state)

    return [
        Route(
            "GET",
            "/v1/customers/{customer_id}/limits",
            get_limits,
            "Every credit line of the customer",
            tag="limits",
        ),
        Route(
            "POST",
            "/v1/customers/{customer_id}/limits/temporary",
            temporary,
            "A temporary raise that expires",
            TemporaryRaiseRequest,
            tag="limits",
        ),
        Route(
            "POST",
            "/v1/customers/{customer_id}/limits",
            set_limit,
            "Change a line's permanent limit",
            LimitRequest,
            tag="limits",
        ),
    ]
