"""Installments over HTTP: quotes (read-only), booking and payoff (financial, group-committed)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from cardcore.common import ids
from cardcore.common.types import AmountFen, ShortText, Terms
from cardcore.installments.ops import BookingRequest, PayoffRequest, check_terms, fee_rate_for, option
from cardcore.platform.http import Request, Route, bad_request, not_found
from cardcore.platform.service import CoreService
from cardcore.platform.state import load_accounts


class QuoteRequest(msgspec.Struct, forbid_unknown_fields=True):
    account_id: ShortText
    amount: AmountFen
    terms: Annotated[list[Terms], msgspec.Meta(min_length=1, max_length=12)]


def routes(service: CoreService) -> list[Route]:
    async def quote(request: Request) -> tuple[int, Any]:
        body: QuoteRequest = request.decode(QuoteRequest)
        engine = service.engine_for_id(body.account_id, ids.PREFIX_ACCOUNT, "account_id")
        async with engine.require_ready().acquire() as conn:
            states = await load_accounts(conn, [body.account_id], datetime.now(UTC), lock=False)
        state = states.get(body.account_id)
        if state is None:
            raise not_found("account_id", f"account {body.account_id} not found")
        params = engine.catalogue.products[state.product_code]
        if body.amount < int(params["installment_min_fen"]):
            raise bad_request("amount", f"installments start at {params['installment_min_fen']} fen")
        for terms in body.terms:
            check_terms(terms, params)
        now = datetime.now(UTC)
        options = [
            option(body.amount, t, fee_rate_for(engine.catalogue, state, t, body.amount, now))
            for t in body.terms
        ]
        return 200, {"account_id": body.account_id, "amount": body.amount, "options": options}

    async def book(request: Request) -> tuple[int, Any]:
        body: BookingRequest = request.decode(BookingRequest)
        engine = service.engine_for_id(body.account_id, ids.PREFIX_ACCOUNT, "account_id")
        return await engine.submit("book_installment", body.idempotency_key, body)

    async def payoff(request: Request) -> tuple[int, Any]:
        plan_id = request.params["plan_id"]
        body: PayoffRequest = request.decode(PayoffRequest)
        engine = service.engine_for_id(plan_id, ids.PREFIX_PLAN, "plan_id")
        return await engine.submit("payoff", body.idempotency_key, body, plan_id)

    async def plans(request: Request) -> tuple[int, Any]:
        account_id = request.params["account_id"]
        pool = service.engine_for_id(account_id, ids.PREFIX_ACCOUNT, "account_id").require_ready()
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM accounts WHERE account_id = $1", account_id):
                raise not_found("account_id", f"account {account_id} not found")
            rows = await conn.fetch(
                "SELECT plan_id, transaction_id, principal_fen, terms, fee_rate, apr, schedule, periods_billed, status, created_at"
                " FROM installment_plans WHERE account_id = $1 ORDER BY created_at",
                account_id,
            )
        return 200, {
            "account_id": account_id,
            "plans": [
                {
                    "plan_id": r["plan_id"],
                    "transaction_id": r["transaction_id"],
                    "principal": r["principal_fen"],
                    "terms": r["terms"],
                    "fee_rate": float(r["fee_rate"]),
                    "apr": float(r["apr"]),
                    "periods_billed": r["periods_billed"],
                    "status": r["status"],
                    "schedule": msgspec.json.decode(r["schedule"]),
                    "created_at": r["created_at"],
                }
                for r in rows
            ],
        }

    return [
        Route(
            "POST",
            "/v1/installments/quote",
            quote,
            "Quote installment options with their real APR",
            QuoteRequest,
            tag="installments",
        ),
        Route(
            "POST",
            "/v1/installments",
            book,
            "Convert a posted purchase into an installment plan",
            BookingRequest,
            tag="installments",
        ),
        Route(
            "GET",
            "/v1/accounts/{account_id}/installments",
            plans,
            "The account's installment plans",
            tag="installments",
        ),
        Route(
            "POST",
            "/v1/installments/{plan_id}/payoff",
            payoff,
            "Pay off a plan early",
            PayoffRequest,
            tag="installments",
        ),
    ]
