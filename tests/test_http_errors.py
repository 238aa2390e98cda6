"""What the app server answers when a handler's database goes away mid-request (a failover or a
partition between the app server's readiness check and its query): 503 ``cell_unavailable``, the
contract's answer for a cell that is down, never a 500; a real bug still surfaces as a 500."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import asyncpg
import pytest
from cardcore.app import current_cell, database_unavailable
from cardcore.platform import db
from cardcore.platform.http import JsonApp, Request, Route, RouteTable


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
