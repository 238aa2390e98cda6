"""Authorization over HTTP. An authorization (or an increment) for a cell that is down is
declined with 91. A reversal by the original key without a card number goes to every cell this
server serves (``?cell=N``: that one; ``&known=only``: applied only if that cell knows the
original): first where the original is known, and only when no cell knows it, claimed in every
cell (``merge_reversals``); the cell that knew the original answers for all."""

from __future__ import annotations

import asyncio
from typing import Any

import msgspec

from cardcore.authorization.ops import (
    KNOWN_ONLY,
    AuthorizationRequest,
    ClearingRequest,
    IncrementRequest,
    RefundRequest,
    ReversalByKeyRequest,
    ReversalRequest,
    check_authorization_format,
    check_reversal_by_key,
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
        check_reversal_by_key(body)
        known = request.query.get("known")
        if known not in (None, "only"):
            raise bad_request("known", "known must be 'only' (apply only where the original is known)")
        mode = KNOWN_ONLY if known == "only" else ""
        if "cell" in request.query:
            (engine,) = cell_param(service, request.query)
            return await _submit(engine, body, mode)
        if body.pan is not None:
            cell = service.router.cell_for_pan(body.pan)
            if cell is None:
                # well formed, just not ours: no original of this issuer to reverse (as a refund says)
                raise ApiError(404, "not_found", "no card of this issuer has this number", "pan")
            return await _submit(service.engine_for_cell(cell), body, mode)
        engines = cell_param(service, request.query, required=False)
        first = list(await asyncio.gather(*(_submit(e, body, KNOWN_ONLY) for e in engines)))
        decided = merge_known(first)
        if decided is not None or mode == KNOWN_ONLY:
            return decided or first[0]
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


async def _submit(engine: CellEngine, body: ReversalByKeyRequest, mode: str = "") -> Result:
    try:
        return await engine.submit("reverse_by_key", body.idempotency_key, body, mode=mode)
    except ApiError as error:
        return error.status, encode(error.body())


class _Error(msgspec.Struct):
    code: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error | None = None


_decode_error = msgspec.json.Decoder(_ErrorBody).decode


def original_unknown(result: Result) -> bool:
    """A cell's answer to a ``known=only`` reversal that says it does not know the original."""
    status, data = result
    if status != 404:
        return False
    try:
        error = _decode_error(data).error
    except msgspec.DecodeError:
        return False
    return error is not None and error.code == "original_unknown"


def merge_known(answers: list[Result]) -> Result | None:
    """The first round of a reversal asked of every cell (``known=only``): the answer of the cell
    that knew the original (a refusal too); 503 when a cell could not say (it may know it);
    None when no cell knows it: the reversal is then to be claimed in every cell."""
    failed: Result | None = None
    for result in answers:
        status, data = result
        if original_unknown(result):
            continue
        if status >= 500:
            failed = failed or result
            continue
        if status >= 400:
            return result
        try:
            original = _decode_reversal(data).original
        except msgspec.DecodeError:
            original = ""
        if original != "absent":
            return result
        # "absent": this reversal was recorded here before (the second round of an earlier try,
        # which may not have reached every cell): the second round answers
    return failed


def merge_reversals(answers: list[Result]) -> Result:
    """The second round (claimed in every cell): the cell that knew the original after all (it
    committed in between) answers; else, when one failed, 503 (retry: every cell that recorded it
    answers the same again); else the first "recorded"."""
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
