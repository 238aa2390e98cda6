"""Authorization over HTTP. An authorization for a cell that is down is declined with 91."""

from __future__ import annotations

from typing import Any

from cardcore.authorization.ops import (
    AuthorizationRequest,
    ClearingRequest,
    ReversalRequest,
    check_authorization_format,
)
from cardcore.common import ids
from cardcore.platform.http import ApiError, Request, Route, encode
from cardcore.platform.service import CoreService

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
    ]
