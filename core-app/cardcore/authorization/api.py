"""Authorization over HTTP. An authorization (or an increment) for a cell that is down is
declined with 91. A reversal by the original key without a card number goes to every cell this
server serves (``?cell=N``: that one); the cell that knew the original answers for all."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from cardcore.authorization.ops import (
    AuthorizationRequest,
    ClearingRequest,
    IncrementRequest,
    RefundRequest,
    ReversalByKeyRequest,
    ReversalRequest,
    check_authorization_format,
)
from cardcore.common import ids
from cardcore.platform.engine import CellEngine, Result
from cardcore.platform.http import ApiError, Request, Route, bad_request, encode
from cardcore.platform.service import CoreService, cell_param

ISSUER_UNAVAILABLE = "91"


def declined(code: str) -> bytes:
    return encode({"auth_id": None, "approved": False, "response_code": code, "available": None})


def routes(service: CoreService) -> list[Route]:
    async def authorize(request: Request) -> tuple[int, Any]:
        body: AuthorizationRequest = request.decode(AuthorizationRequest)
        check_authorization_format(body)
        cell = service.router.cell_for_pan(body.pan)
        if cell is None:
            return 200, declined("14")
        try:
            status, data = await service.engine_for_cell(cell).submit("authorize", body.idempotency_key, body)
        except ApiError as error:
            if error.status < 500:
                raise
            return 200, declined(ISSUER_UNAVAILABLE)
        # the cell could not commit: an issuer that cannot answer declines with 91 (retry, same key)
        return (200, declined(ISSUER_UNAVAILABLE)) if status >= 500 else (status, data)

    async def reverse(request: Request) -> tuple[int, Any]:
        auth_id = request.params["auth_id"]
        body: ReversalRequest = request.decode(ReversalRequest)
        engine = service.engine_for_id(auth_id, ids.PREFIX_AUTHORIZATION, "auth_id")
        return await engine.submit("reverse", body.idempotency_key, body, auth_id)

    async def clear(request: Request) -> tuple[int, Any]:
        body: ClearingRequest = request.decode(ClearingRequest)
        engine = service.engine_for_id(body.auth_id, ids.PREFIX_AUTHORIZATION, "auth_id")
        return await engine.submit("clear", body.idempotency_key, body)

    async def reverse_by_key(request: Request) -> tuple[int, Any]:
        body: ReversalByKeyRequest = request.decode(ReversalByKeyRequest)
        if "cell" in request.query:
            engines = cell_param(service, request.query)
        elif body.pan is not None:
            if not ids.pan_well_formed(body.pan):
                raise bad_request("pan", "pan must be 16 digits with a valid Luhn check digit")
            cell = service.router.cell_for_pan(body.pan)
            if cell is None:
                raise bad_request("pan", "pan is not a card number of this issuer")
            engines = [service.engine_for_cell(cell)]
        else:
            engines = cell_param(service, request.query, required=False)
        return merge_reversals(await asyncio.gather(*(_submit(e, body) for e in engines)))

    async def increment(request: Request) -> tuple[int, Any]:
        auth_id = request.params["auth_id"]
        body: IncrementRequest = request.decode(IncrementRequest)
        engine = service.engine_for_id(auth_id, ids.PREFIX_AUTHORIZATION, "auth_id")
        try:
            status, data = await engine.submit("increment", body.idempotency_key, body, auth_id)
        except ApiError as error:
            if error.status < 500:
                raise
            return 200, declined(ISSUER_UNAVAILABLE)
        return (200, declined(ISSUER_UNAVAILABLE)) if status >= 500 else (status, data)

    async def refund(request: Request) -> tuple[int, Any]:
        body: RefundRequest = request.decode(RefundRequest)
        check_authorization_format(body)
        cell = service.router.cell_for_pan(body.pan)
        if cell is None:
            raise ApiError(404, "not_found", "no card of this issuer has this number", "pan")
        return await service.engine_for_cell(cell).submit("refund", body.idempotency_key, body)

    return [
        Route(
            "POST",
            "/v1/authorizations",
            authorize,
            "Authorize a card transaction (ISO 8583 response codes)",
            AuthorizationRequest,
            tag="authorization",
        ),
        Route(
            "POST",
            "/v1/authorizations/{auth_id}/reversal",
            reverse,
            "Reverse all or part of a hold",
            ReversalRequest,
            tag="authorization",
        ),
        Route(
            "POST",
            "/v1/clearing",
            clear,
            "Clear an authorization: post the purchase",
            ClearingRequest,
            tag="authorization",
        ),
        Route(
            "POST",
            "/v1/authorizations/reversal",
            reverse_by_key,
            "Reverse a request whose answer was lost, by its idempotency key: releases its hold if it"
            " was committed, else records the reversal so that it is declined if it arrives late",
            ReversalByKeyRequest,
            tag="authorization",
        ),
        Route(
            "POST",
            "/v1/authorizations/{auth_id}/increment",
            increment,
            "An incremental authorization on an open hold",
            IncrementRequest,
            tag="authorization",
        ),
        Route(
            "POST",
            "/v1/refunds",
            refund,
            "A merchandise return credited to the card's account",
            RefundRequest,
            tag="authorization",
        ),
    ]


class _ReversalAnswer(msgspec.Struct):
    original: str = ""


_decode_reversal = msgspec.json.Decoder(_ReversalAnswer).decode


async def _submit(engine: CellEngine, body: ReversalByKeyRequest) -> Result:
    try:
        return await engine.submit("reverse_by_key", body.idempotency_key, body)
    except ApiError as error:
        return error.status, encode(error.body())


def merge_reversals(answers: list[Result]) -> Result:
    """One answer for a reversal asked of several cells: the cell that knew the original answers
    (its error too: it is about that original); else, when one failed, 503 (retry: every cell that
    recorded it answers the same again); else the first "recorded"."""
    failed: Result | None = None
    recorded: Result | None = None
    for status, data in answers:
        if status >= 500:
            failed = failed or (status, data)
            continue
        if status >= 400:
            return status, data
        try:
            original = _decode_reversal(data).original
        except msgspec.DecodeError:
            original = ""
        if original != "absent":
            return status, data
        recorded = recorded or (status, data)
    if failed is not None:
        return failed
    assert recorded is not None, "no cell answered"
    return recorded
