"""What the app server answers when a handler's database goes away mid-request (a failover or a
partition between the app server's readiness check and its query): 503 ``cell_unavailable``, the
contract's answer for a cell that is down, never a 500; a real bug still surfaces as a 500. And
what the body decoding refuses or takes: an integer written 47.0, text holding U+0000."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import asyncpg
import pytest
from cardcore.app import current_cell, database_unavailable
from cardcore.authorization.ops import ReversalRequest
from cardcore.common.tags import TagRule
from cardcore.platform import db
from cardcore.platform.http import ApiError, JsonApp, Request, Route, RouteTable


def call(app: JsonApp, path: str) -> tuple[int, Any]:
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": []}
    asyncio.run(app(scope, receive, send))
    start, body = sent[0], sent[1]
    return start["status"], json.loads(body["body"])


def raising(error: Exception) -> Route:
    async def handler(request: Request) -> tuple[int, Any]:
        current_cell.set("2")
        raise error

    return Route("GET", "/v1/boom", handler, "fails")


@pytest.mark.parametrize(
    "error",
    [
        asyncpg.ConnectionDoesNotExistError("connection was closed in the middle of operation"),
        asyncpg.ReadOnlySQLTransactionError("cannot execute INSERT in a read-only transaction"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
        db.CommitNotConfirmedError("committed on the primary without the sync standby's confirmation"),
    ],
    ids=lambda e: type(e).__name__,
)
def test_a_database_lost_mid_request_is_a_503_naming_the_cell(error: Exception) -> None:
    app = JsonApp(RouteTable([raising(error)]), on_error=database_unavailable)
    status, body = call(app, "/v1/boom")
    assert status == 503
    assert body["error"]["code"] == "cell_unavailable"
    assert "cell 2" in body["error"]["message"] and type(error).__name__ in body["error"]["message"]


def test_a_bug_is_not_dressed_up_as_an_unavailable_cell() -> None:
    app = JsonApp(RouteTable([raising(KeyError("account_id"))]), on_error=database_unavailable)
    with pytest.raises(KeyError):
        call(app, "/v1/boom")


def decoded(body: bytes, kind: type[Any]) -> Any:
    """``Request.decode`` of ``body``: the value, or (status, field) of the refusal."""
    try:
        return Request(
            "POST", "/v1/x", {}, {}, body, Route("POST", "/v1/x", raising(TimeoutError()).handler, "x")
        ).decode(kind)
    except ApiError as error:
        return error.status, error.field


def test_an_integer_field_takes_a_number_without_fraction_exactly_and_nothing_else() -> None:
    assert decoded(b'{"idempotency_key": "k", "amount": 47.0}', ReversalRequest).amount == 47
    assert decoded(b'{"idempotency_key": "k", "amount": 4.7e1}', ReversalRequest).amount == 47
    assert decoded(b'{"idempotency_key": "k", "amount": 100000000001.0}', ReversalRequest) == (400, "amount")
    for wrong in (b"47.5", b'"47"', b"true", b"1e30", b"1e100000000"):
        body = b'{"idempotency_key": "k", "amount": %s}' % wrong
        assert decoded(body, ReversalRequest) == (400, "amount"), wrong
    # a number of a hundred million digits beside it is never expanded into an int (seconds, GBs)
    started = time.perf_counter()
    junk = b'{"idempotency_key": "k", "amount": 47.0, "junk": 1.5e100000000}'
    assert decoded(junk, ReversalRequest)[0] == 400
    assert time.perf_counter() - started < 1.0
    # the exact integer, not the float nearest to it
    rule = decoded(
        b'{"all": [{"metric": "total_spend_fen", "op": ">=", "value": 9007199254740993.0}]}', TagRule
    )
    assert rule.all[0].value == 9007199254740993


def test_text_holding_u0000_is_refused_naming_its_field() -> None:
    assert decoded(b'{"idempotency_key": "k\\u0000", "amount": 1}', ReversalRequest) == (
        400,
        "idempotency_key",
    )
    body = b'{"all": [{"metric": "age", "op": ">=", "value": 1}], "x\\u0000": 1}'
    assert decoded(body, TagRule)[0] == 400  # an unknown field, or the NUL in its name: refused
    # a backslash followed by "u0000" is no NUL
    assert (
        decoded(b'{"idempotency_key": "k\\\\u0000", "amount": 1}', ReversalRequest).idempotency_key
        == "k\\u0000"
    )
