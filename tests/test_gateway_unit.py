"""The gateway against fake app servers on real loopback sockets.

The fake app servers are raw asyncio HTTP/1.1 servers written here: they answer ``/readyz`` like
the app server does and echo every other request (method, path, query, body, content type), with
a few answers shaped like the fan-out endpoints. The gateway runs in-process through a small ASGI
call harness, and for real as its own process (``python -m cardcore.gateway``) on each HTTP server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cardcore.common import ids
from cardcore.common.routing import Router
from cardcore.gateway.app import Gateway
from cardcore.gateway.settings import GatewayConfigError, GatewaySettings, parse
from cardcore.platform.auth import ClientTokens
from cardcore.platform.metrics import Registry
from cardcore.platform.upstream import UpstreamConnectError, UpstreamPool, UpstreamTimeout

from tests.api_auth import new_tokens, write_tokens_file

pytestmark = pytest.mark.timeout(30)

REPO = Path(__file__).resolve().parents[1]
TOKENS = ClientTokens(new_tokens())
TOKENS_FILE = write_tokens_file(
    Path(tempfile.mkdtemp(prefix="watertight-gateway-unit-")) / "api-tokens.json",
    {kind: [token] for kind, token in TOKENS.tokens.items()},
)


# -- a fake app server ------------------------------------------------------------------------


class FakeApp:
    """Answers /readyz from ``cells`` and echoes the rest; ``frozen`` never answers (SIGSTOP)."""

    def __init__(self, name: str, cells: dict[int, tuple[bool, str | None]], site: str = "prod") -> None:
        self.name = name
        self.cells = cells
        self.site = site
        self.frozen = False
        self.delay = 0.0  # seconds before answering anything but /readyz
        self.requests: list[tuple[str, str, str, bytes]] = []  # method, path, query, body
        self.known_keys: set[str] = set()  # idempotency keys of originals a reversal finds here
        self.tags: dict[str, str] = {}  # tag -> description: the definitions this cell holds
        self.rules: set[str] = set()  # names of the pricing rules this cell holds
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._thaw = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._thaw = asyncio.Event()
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Close the listener and every connection: the port now refuses connections."""
        if self._server is not None:
            self._server.close()
            self._server = None
        self._thaw.set()
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        await asyncio.sleep(0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head.decode("latin-1").split("\r\n")
                method, target, _ = lines[0].split(" ", 2)
                headers = {}
                for line in lines[1:]:
                    if line:
                        name, _, value = line.partition(":")
                        headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                path, _, query = target.partition("?")
                if self.frozen:
                    await self._thaw.wait()
                    return
                if path != "/readyz":
                    self.requests.append((method, path, query, body))
                    if self.delay:
                        await asyncio.sleep(self.delay)
                status, payload, chunked = self._answer(method, path, query, body, headers)
                data = json.dumps(payload).encode()
                head_out = f"HTTP/1.1 {status} X\r\ncontent-type: application/json\r\n"
                if chunked:
                    half = len(data) // 2
                    writer.write(
                        (head_out + "transfer-encoding: chunked\r\n\r\n").encode()
                        + b"%x\r\n%s\r\n%x\r\n%s\r\n0\r\n\r\n"
                        % (half, data[:half], len(data) - half, data[half:])
                    )
                else:
                    writer.write((head_out + f"content-length: {len(data)}\r\n\r\n").encode() + data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _answer(
        self, method: str, path: str, query: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, Any, bool]:
        params = dict(part.split("=", 1) for part in query.split("&") if "=" in part)
        cell = params.get("cell", "")
        if path == "/readyz":
            cells = {
                str(c): {"ready": ready, "leader_site": leader} for c, (ready, leader) in self.cells.items()
            }
            ready = any(r for r, _ in self.cells.values())
            return (200 if ready else 503), {"ready": ready, "site": self.site, "cells": cells}, False
        if path.startswith("/v1/tags/") and path.endswith("/customers"):
            tag = path.split("/")[3]
            if self.tags and tag not in self.tags:  # (no definitions at all: every tag is defined)
                error = {"code": "not_found", "message": f"tag {tag!r} is not defined", "field": "tag"}
                return 404, {"error": error}, False
            return 200, {"tag": tag, "customers": [f"CU-of-cell-{cell}"]}, False
        if path == "/v1/pricing/rules" and method == "GET":
            return (
                200,
                {"rules": [{"rule_id": "shared", "layer": "product"}, {"rule_id": f"acct-{cell}"}]},
                False,
            )
        if path == "/v1/authorizations/reversal":
            original = json.loads(body)["original_idempotency_key"]
            if original in self.known_keys:
                return 200, {"original": "approved", "status": "reversed", "upstream": self.name}, False
            if params.get("known") == "only":
                error = {
                    "code": "original_unknown",
                    "message": "unknown",
                    "field": "original_idempotency_key",
                }
                return 404, {"error": error}, False
            return 200, {"original": "absent", "status": "recorded", "upstream": self.name}, False
        if path == "/v1/admin/cycle":
            return 200, {"cell": int(cell), "business_date": json.loads(body)["business_date"]}, False
        if path == "/v1/tags" and method == "POST":
            # as the app server: the same definition is no conflict, a different one is (409)
            request = json.loads(body)
            if "tag" not in request:
                error = {"code": "invalid", "message": "missing required field `tag`", "field": "tag"}
                return 400, {"error": error}, False
            held = self.tags.get(request["tag"])
            if held is not None and held != request.get("description"):
                error = {"code": "tag_exists", "message": "defined differently", "field": "tag"}
                return 409, {"error": error}, False
            if params.get("check") == "only" or held is not None:
                return 200, {"tag": request["tag"], "cell": cell}, False
            self.tags[request["tag"]] = request.get("description", "")
            return 201, {"tag": request["tag"], "cell": cell}, False
        if path == "/v1/pricing/rules" and method == "POST" and "name" in json.loads(body):
            name = json.loads(body)["name"]
            if name == "unknown product" and self.name == "a":  # the answer of a cell that refuses
                return 404, {"error": {"code": "not_found", "message": "no", "field": "product_code"}}, False
            status = 200 if name in self.rules else 201
            self.rules.add(name)
            return status, {"rule_id": name, "cell": cell}, False
        echo = {
            "upstream": self.name,
            "method": method,
            "path": path,
            "query": query,
            "body": body.decode("latin-1"),
            "content_type": headers.get("content-type"),
        }
        return 200, echo, path == "/v1/products"  # products: answered chunked


# -- harness ----------------------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    elapsed: float = 0.0
    data: Any = field(default=None)


async def call(
    app: Gateway,
    method: str,
    path: str,
    body: Any = None,
    query: str = "",
    content_type: bytes = b"application/json",
    authorization: bytes | None = None,
) -> Answer:
    """One ASGI HTTP call into the app, as granian would make it; with the route's token unless
    ``authorization`` says otherwise (b"": none)."""
    raw = body if isinstance(body, bytes) else (json.dumps(body).encode() if body is not None else b"")
    if authorization is None:
        authorization = (
            TOKENS.header_value(method, path).encode() if TOKENS.header_value(method, path) else b""
        )
    credentials = [(b"authorization", authorization)] if authorization else []
    scope = {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "query_string": query.encode(),
        "root_path": "",
        "headers": (
            [(b"host", b"gateway"), (b"content-type", content_type)] if raw else [(b"host", b"gateway")]
        )
        + credentials,
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8000),
    }
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    messages: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)

    started = time.perf_counter()
    await app(scope, receive, send)
    elapsed = time.perf_counter() - started
    assert messages[0]["type"] == "http.response.start"
    headers = {k.decode(): v.decode() for k, v in messages[0]["headers"]}
    data = b"".join(m.get("body", b"") for m in messages[1:])
    assert int(headers["content-length"]) == len(data)
    parsed = json.loads(data) if headers["content-type"].startswith("application/json") else None
    return Answer(messages[0]["status"], headers, data, elapsed, parsed)


def settings_for(upstreams: dict[str, list[str]], **overrides: Any) -> GatewaySettings:
    values: dict[str, Any] = {
        "site": "prod",
        "cell_count": 2,
        "upstreams": upstreams,
        "health_interval_ms": 100,
        "health_timeout_ms": 200,
        "request_timeout_ms": 1000,
        "connect_timeout_ms": 200,
        "api_tokens_file": str(TOKENS_FILE),
    }
    values.update(overrides)
    return GatewaySettings(**values)


UPSTREAMS_SEEN_S = 10.0


@contextlib.asynccontextmanager
async def two_cells(**overrides: Any) -> AsyncIterator[tuple[Gateway, FakeApp, FakeApp]]:
    """App server a leads cell 1 (prod), b leads cell 2 (samecity); the gateway routes to both."""
    a = FakeApp("a", {1: (True, "prod")})
    b = FakeApp("b", {2: (True, "samecity")}, site="samecity")
    await a.start()
    await b.start()
    gateway = Gateway(settings_for({"1": [a.url], "2": [b.url]}, **overrides))
    await gateway.startup()
    # the first poll may time out on a busy machine (200 ms here): the scenarios start once the
    # gateway sees both app servers, as a gateway in service would by its next polls
    deadline = asyncio.get_running_loop().time() + UPSTREAMS_SEEN_S
    while not all(gateway.health.candidates(cell) for cell in (1, 2)):
        assert asyncio.get_running_loop().time() < deadline, "the gateway never saw both app servers"
        await asyncio.sleep(0.05)
    try:
        yield gateway, a, b
    finally:
        await gateway.shutdown()
        await a.stop()
        await b.stop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def applicant_in(cell: int, cell_count: int = 2) -> str:
    router = Router(cell_count)
    for n in range(10_000):
        id_number = f"11010119900307{n:04d}"
        if router.cell_for_applicant(id_number) == cell:
            return id_number
    raise AssertionError("no id number for the cell")


# -- routing ----------------------------------------------------------------------------------


def test_routes_by_the_id_in_the_path_and_forwards_bytes_as_they_are() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, _a, _b):
            customer = ids.new_id(ids.PREFIX_CUSTOMER, 1)
            answer = await call(gateway, "GET", f"/v1/customers/{customer}/limits", query="x=1&y=%20")
            assert answer.status == 200
            assert answer.data == {
                "upstream": "a",
                "method": "GET",
                "path": f"/v1/customers/{customer}/limits",
                "query": "x=1&y=%20",
                "body": "",
                "content_type": None,
            }
            assert answer.headers["x-watertight-cell"] == "1"
            assert answer.headers["x-watertight-site"] == "prod"

            raw = b'{"idempotency_key": "k1", "amount": 5}'  # spacing kept: bytes, not re-encoded JSON
            cases = [
                ("GET", f"/v1/cards/{ids.new_id(ids.PREFIX_CARD, 2)}", "b", "2"),
                ("POST", f"/v1/cards/{ids.new_id(ids.PREFIX_CARD, 1)}/status", "a", "1"),
                ("GET", f"/v1/accounts/{ids.new_id(ids.PREFIX_ACCOUNT, 2)}/balance", "b", "2"),
                ("POST", f"/v1/authorizations/{ids.new_id(ids.PREFIX_AUTHORIZATION, 2)}/reversal", "b", "2"),
                ("POST", f"/v1/installments/{ids.new_id(ids.PREFIX_PLAN, 1)}/payoff", "a", "1"),
                ("PUT", f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 2)}/tags/vip", "b", "2"),
            ]
            for method, path, upstream, cell in cases:
                answer = await call(
                    gateway, method, path, raw if method != "GET" else None, content_type=b"text/x"
                )
                assert answer.status == 200, (path, answer.body)
                assert answer.data["upstream"] == upstream, path
                assert answer.data["path"] == path
                assert answer.headers["x-watertight-cell"] == cell
                if method != "GET":
                    assert answer.data["body"] == raw.decode()
                    assert answer.data["content_type"] == "text/x"

            # chunked upstream answers come back whole; content type as the upstream said
            products = await call(gateway, "GET", "/v1/products")
            assert products.status == 200 and products.data["path"] == "/v1/products"
            assert products.headers["x-watertight-cell"] == "any"

    run(scenario())


def test_routes_by_the_body_field_and_sends_what_it_cannot_route_to_any_app_server() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, _a, _b):
            cases: list[tuple[str, dict[str, Any], str]] = [
                ("/v1/authorizations", {"pan": ids.new_pan(2, 17), "amount": 100}, "b"),
                ("/v1/authorizations", {"pan": ids.new_pan(1, 17), "amount": 100}, "a"),
                ("/v1/clearing", {"auth_id": ids.new_id(ids.PREFIX_AUTHORIZATION, 2), "amount": 1}, "b"),
                ("/v1/repayments", {"account_id": ids.new_id(ids.PREFIX_ACCOUNT, 1), "amount": 1}, "a"),
                (
                    "/v1/installments/quote",
                    {"account_id": ids.new_id(ids.PREFIX_ACCOUNT, 2), "terms": [3]},
                    "b",
                ),
                ("/v1/installments", {"account_id": ids.new_id(ids.PREFIX_ACCOUNT, 1), "terms": 3}, "a"),
                ("/v1/applications", {"applicant": {"id_number": applicant_in(1), "name": "A"}}, "a"),
                ("/v1/applications", {"applicant": {"id_number": applicant_in(2), "name": "B"}}, "b"),
                (
                    "/v1/pricing/rules",
                    {"layer": "account", "account_id": ids.new_id(ids.PREFIX_ACCOUNT, 2)},
                    "b",
                ),
            ]
            for path, body, upstream in cases:
                answer = await call(gateway, "POST", path, body)
                assert answer.status == 200, (path, answer.body)
                assert answer.data["upstream"] == upstream, (path, body)
                assert answer.headers["x-watertight-cell"] == ("1" if upstream == "a" else "2")
                assert json.loads(answer.data["body"]) == body

            # no routing key, a malformed one, a wrong type, broken JSON: the app server decides (4xx)
            for path, raw in [
                ("/v1/authorizations", b'{"pan": "1234"}'),
                ("/v1/authorizations", b'{"pan": 4111111111111111}'),
                ("/v1/clearing", b"{}"),
                ("/v1/repayments", b'{"account_id": "AC99AAAAAAAAAAAAAAAA"}'),
                ("/v1/applications", b'{"applicant": "nobody"}'),
                ("/v1/applications", b"{not json"),
                ("/v1/installments/quote", b""),
                ("/v1/customers/nobody/limits", b""),
                ("/v1/no/such/path", b""),
            ]:
                answer = await call(gateway, "POST", path, raw)
                assert answer.status == 200, (path, raw, answer.body)  # the fake echoes; a real app says 4xx
                assert answer.headers["x-watertight-cell"] == "any"
                assert answer.data["body"] == raw.decode()

    run(scenario())


def test_fan_out_reaches_every_cell_and_merges_the_answers() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            answer = await call(gateway, "GET", "/v1/tags/vip/customers")
            assert answer.status == 200
            assert answer.data == {"tag": "vip", "customers": ["CU-of-cell-1", "CU-of-cell-2"]}
            assert answer.headers["x-watertight-cell"] == "all"

            answer = await call(gateway, "GET", "/v1/pricing/rules")
            assert answer.status == 200
            assert [rule["rule_id"] for rule in answer.data["rules"]] == ["shared", "acct-1", "acct-2"]

            answer = await call(gateway, "POST", "/v1/admin/cycle", {"business_date": "2025-01-31"})
            assert answer.status == 200
            assert answer.data == {
                "business_date": "2025-01-31",
                "cells": {
                    "1": {"cell": 1, "business_date": "2025-01-31"},
                    "2": {"cell": 2, "business_date": "2025-01-31"},
                },
            }

            a.requests.clear()
            b.requests.clear()
            answer = await call(gateway, "POST", "/v1/tags", {"tag": "vip", "description": "d"})
            assert answer.status == 201 and answer.data == {"tag": "vip", "cell": "1"}
            # every cell checked first (writing nothing), then every cell written
            assert [(r[0], r[1], r[2]) for r in a.requests] == [
                ("POST", "/v1/tags", "check=only&cell=1"),
                ("POST", "/v1/tags", "cell=1"),
            ]
            assert [(r[0], r[1], r[2]) for r in b.requests] == [
                ("POST", "/v1/tags", "check=only&cell=2"),
                ("POST", "/v1/tags", "cell=2"),
            ]

            rejected = await call(gateway, "POST", "/v1/tags", {"description": "no tag"})
            assert rejected.status == 400 and rejected.data["error"]["field"] == "tag"

            b.requests.clear()
            rule = {"layer": "product", "product_code": "classic", "value": 1}
            answer = await call(gateway, "POST", "/v1/pricing/rules", rule, query="dry=1")
            assert answer.status == 200 and answer.data["upstream"] == "a"
            assert [r[2] for r in b.requests] == ["dry=1&cell=2"]

    run(scenario())


def test_a_tag_one_cell_holds_already_is_defined_in_the_others_and_a_retry_is_a_200() -> None:
    """A definition fanned out after a partial failure: the cell that has it (the same) is no
    conflict, the cell without it gets it: 201, not the 503 of a "failed" cell; asked again,
    every cell has it: 200."""

    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            a.tags["vip"] = "d"
            answer = await call(gateway, "POST", "/v1/tags", {"tag": "vip", "description": "d"})
            assert answer.status == 201, answer.data
            assert b.tags == {"vip": "d"}
            again = await call(gateway, "POST", "/v1/tags", {"tag": "vip", "description": "d"})
            assert again.status == 200, again.data

    run(scenario())


def test_a_tag_defined_differently_in_one_cell_is_a_409_and_no_cell_is_written() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            a.tags["vip"] = "set by hand"
            answer = await call(gateway, "POST", "/v1/tags", {"tag": "vip", "description": "other"})
            assert answer.status == 409, answer.data
            assert answer.data["error"]["code"] == "tag_exists"
            assert b.tags == {} and a.tags == {"vip": "set by hand"}
            assert [r[2] for r in b.requests] == ["check=only&cell=2"]

    run(scenario())


def test_a_definition_no_cell_could_check_writes_nothing_and_says_retry() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            await b.stop()
            answer = await call(gateway, "POST", "/v1/tags", {"tag": "vip", "description": "d"})
            assert answer.status == 503
            assert answer.data["error"]["code"] == "cells_unavailable"
            assert "nothing was written" in answer.data["error"]["message"]
            assert a.tags == {}

    run(scenario())


def test_customers_of_a_tag_only_some_cells_define_are_a_200_and_of_one_no_cell_defines_a_404() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            a.tags["local"] = "defined in cell 1 only"
            b.tags["other"] = "defined in cell 2 only"
            answer = await call(gateway, "GET", "/v1/tags/local/customers")
            assert answer.status == 200, answer.data
            assert answer.data == {"tag": "local", "customers": ["CU-of-cell-1"]}
            nowhere = await call(gateway, "GET", "/v1/tags/nowhere/customers")
            assert nowhere.status == 404 and nowhere.data["error"]["field"] == "tag"

    run(scenario())


def test_a_pricing_rule_one_cell_holds_already_is_a_201_and_a_refusal_by_a_cell_is_no_503() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, _a, b):
            b.rules.add("campaign")
            rule = {"layer": "transaction", "name": "campaign"}
            answer = await call(gateway, "POST", "/v1/pricing/rules", rule)
            assert answer.status == 201, answer.data
            assert (await call(gateway, "POST", "/v1/pricing/rules", rule)).status == 200
            unknown = {"layer": "product", "name": "unknown product"}  # refused by cell 1 only
            refused = await call(gateway, "POST", "/v1/pricing/rules", unknown)
            assert refused.status == 404 and refused.data["error"]["field"] == "product_code"

    run(scenario())


# -- failure isolation ------------------------------------------------------------------------


def test_a_reversal_by_key_without_a_card_goes_where_the_original_is_known_before_it_is_claimed() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            path = "/v1/authorizations/reversal"
            b.known_keys.add("k-of-cell-2")
            found = await call(
                gateway, "POST", path, {"idempotency_key": "r1", "original_idempotency_key": "k-of-cell-2"}
            )
            assert (found.status, found.data["upstream"], found.data["original"]) == (200, "b", "approved")
            asked = [
                (upstream.name, query)
                for upstream in (a, b)
                for _, p, query, _ in upstream.requests
                if p == path
            ]
            assert sorted(asked) == [
                ("a", "known=only&cell=1"),
                ("b", "known=only&cell=2"),
            ]  # nothing claimed
            a.requests.clear()
            b.requests.clear()

            unknown = await call(
                gateway, "POST", path, {"idempotency_key": "r2", "original_idempotency_key": "nowhere"}
            )
            assert (unknown.status, unknown.data["status"]) == (200, "recorded")
            asked = sorted(
                (upstream.name, query)
                for upstream in (a, b)
                for _, p, query, _ in upstream.requests
                if p == path
            )
            assert asked == [
                ("a", "cell=1"),
                ("a", "known=only&cell=1"),
                ("b", "cell=2"),
                ("b", "known=only&cell=2"),
            ]
            a.requests.clear()
            b.requests.clear()

            body = {"idempotency_key": "r3", "original_idempotency_key": "k", "pan": ids.new_pan(1, 17)}
            with_card = await call(gateway, "POST", path, body)
            assert (with_card.status, with_card.data["upstream"]) == (200, "a")
            assert [query for _, p, query, _ in a.requests if p == path] == [""] and not b.requests

            a.requests.clear()
            await b.stop()
            cut = await call(
                gateway, "POST", path, {"idempotency_key": "r4", "original_idempotency_key": "nowhere"}
            )
            assert cut.status == 503 and cut.data["error"]["code"] == "cells_unavailable"
            assert not [1 for _, p, query, _ in a.requests if p == path and "known" not in query]  # no claim

            increment = await call(
                gateway,
                "POST",
                f"/v1/authorizations/{ids.new_id(ids.PREFIX_AUTHORIZATION, 2)}/increment",
                {"amount": 1},
            )
            assert increment.status == 200 and increment.data["response_code"] == "91"
            refund = await call(gateway, "POST", "/v1/refunds", {"pan": ids.new_pan(2, 5), "amount": 1})
            assert refund.status == 503 and refund.data["error"]["code"] == "cell_unavailable"
            refund_1 = await call(gateway, "POST", "/v1/refunds", {"pan": ids.new_pan(1, 5), "amount": 1})
            assert (refund_1.status, refund_1.data["upstream"]) == (200, "a")

    run(scenario())


def test_a_stopped_cell_fails_fast_and_the_other_cell_keeps_answering() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, _a, b):
            cell_1 = f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 1)}"
            cell_2 = f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 2)}"
            assert (await call(gateway, "GET", cell_2)).status == 200
            await b.stop()  # refused from now on; the gateway has not polled yet

            down = await call(gateway, "GET", cell_2)
            assert down.status == 503 and down.elapsed < 1.0
            assert down.data["error"]["code"] == "cell_unavailable"
            assert "cell 2" in down.data["error"]["message"]
            assert down.data["error"]["field"] is None
            again = await call(gateway, "GET", cell_2)
            assert again.status == 503 and again.elapsed < 0.5  # marked down: no connect attempt

            auth = await call(gateway, "POST", "/v1/authorizations", {"pan": ids.new_pan(2, 5), "amount": 1})
            assert auth.status == 200 and auth.elapsed < 1.0
            assert auth.data == {"auth_id": None, "approved": False, "response_code": "91", "available": None}

            for _ in range(20):
                assert (await call(gateway, "GET", cell_1)).status == 200

            await asyncio.sleep(0.35)  # a poll or two
            ready = await call(gateway, "GET", "/readyz")
            assert ready.status == 200
            assert ready.data["cells"]["1"]["ready"] is True
            assert ready.data["cells"]["2"] == {
                "ready": False,
                "leader_site": None,
                "upstreams": [],
                "drained": False,
                "in_flight": 0,
            }
            routing = await call(
                gateway, "GET", f"/v1/routing/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 2)}"
            )
            assert routing.status == 200 and routing.data == {"cell": 2, "leader_site": None}

            partial = await call(gateway, "GET", "/v1/tags/vip/customers")
            assert partial.status == 503
            assert partial.data["customers"] == ["CU-of-cell-1"]
            assert partial.data["failed_cells"] == ["2"]
            assert "2" in partial.data["error"]["message"]

            await b.start()  # same port again: back after the next poll
            for _ in range(40):
                await asyncio.sleep(0.05)
                if (await call(gateway, "GET", cell_2)).status == 200:
                    break
            else:
                raise AssertionError("cell 2 did not come back")

            metrics = (await call(gateway, "GET", "/metrics")).body.decode()
            assert (
                'watertight_requests_total{route="/v1/customers/{customer_id}",cell="2",site="prod",'
                'outcome="unavailable"} ' in metrics
            )
            assert (
                'watertight_requests_total{route="/v1/authorizations",cell="2",site="prod",outcome="unavailable"} 1'
                in metrics
            )

    run(scenario())


def test_a_drained_cell_refuses_new_requests_at_once_and_lets_those_in_flight_finish(tmp_path: Path) -> None:
    drain_file = tmp_path / "cells.json"

    async def until(gateway: Gateway, cell: str, drained: bool) -> dict[str, Any]:
        for _ in range(40):
            ready = (await call(gateway, "GET", "/readyz")).data["cells"][cell]
            if ready["drained"] is drained:
                return dict(ready)
            await asyncio.sleep(0.05)
        raise AssertionError(f"cell {cell} never showed drained={drained}")

    async def scenario() -> None:
        async with two_cells(drain_file=str(drain_file), drain_poll_ms=20) as (gateway, _a, b):
            cell_1 = f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 1)}"
            cell_2 = f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 2)}"
            assert (await call(gateway, "GET", cell_2)).status == 200  # no file: nothing drained

            b.delay = 0.5
            slow = asyncio.create_task(call(gateway, "GET", cell_2))
            await asyncio.sleep(0.1)
            drain_file.write_text('{"drained_cells": [2]}')
            during = await until(gateway, "2", drained=True)
            assert during["in_flight"] == 1
            refused = await call(gateway, "GET", cell_2)
            assert refused.status == 503 and refused.elapsed < 0.2
            assert refused.data["error"]["code"] == "cell_drained"
            assert "cell 2" in refused.data["error"]["message"]
            auth = await call(gateway, "POST", "/v1/authorizations", {"pan": ids.new_pan(2, 5), "amount": 1})
            assert auth.status == 200 and auth.data["response_code"] == "91"
            assert (await slow).status == 200  # in flight before the drain: answered
            after = (await call(gateway, "GET", "/readyz")).data["cells"]
            assert after["2"]["in_flight"] == 0 and after["1"]["drained"] is False
            assert (await call(gateway, "GET", cell_1)).status == 200  # the other cell never noticed

            drain_file.write_text('{"drained_cells": [7]}')  # a bad file changes nothing
            await asyncio.sleep(0.15)
            assert (await call(gateway, "GET", cell_2)).status == 503

            b.delay = 0.0
            drain_file.write_text('{"drained_cells": []}')
            await until(gateway, "2", drained=False)
            assert (await call(gateway, "GET", cell_2)).status == 200
            metrics = (await call(gateway, "GET", "/metrics")).body.decode()
            assert 'cell="2",site="prod",outcome="drained"} ' in metrics

    run(scenario())


def test_a_frozen_cell_is_detected_by_polling_and_a_slow_one_times_out() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, b):
            cell_1 = f"/v1/accounts/{ids.new_id(ids.PREFIX_ACCOUNT, 1)}/balance"
            cell_2 = f"/v1/accounts/{ids.new_id(ids.PREFIX_ACCOUNT, 2)}/balance"

            b.delay = 1.5  # answers after the gateway's 1 s request timeout; readyz still fine
            slow, fast = await asyncio.gather(call(gateway, "GET", cell_2), call(gateway, "GET", cell_1))
            assert slow.status == 504 and 0.9 < slow.elapsed < 2.0
            assert slow.data["error"]["code"] == "upstream_timeout"
            assert fast.status == 200 and fast.elapsed < 0.8
            auth = await call(gateway, "POST", "/v1/authorizations", {"pan": ids.new_pan(2, 9), "amount": 1})
            assert auth.status == 200 and auth.data["response_code"] == "91"
            b.delay = 0.0

            # one readyz that times out is a miss, not a verdict: a starved app server is still up
            b.frozen = True
            await asyncio.sleep(0.25)  # one poll (interval 100 ms) timed out (200 ms)
            b.frozen = False
            assert (await call(gateway, "GET", cell_2)).status == 200

            b.frozen = True  # SIGSTOP: connections are accepted, nothing answers, readyz neither
            await asyncio.sleep(1.0)  # two polls in a row time out: interval 100 ms + timeout 200 ms each
            frozen, fine = await asyncio.gather(call(gateway, "GET", cell_2), call(gateway, "GET", cell_1))
            assert frozen.status == 503 and frozen.elapsed < 0.5  # the request timeout is 1 s
            assert fine.status == 200
            assert a.requests[-1][1] == cell_1

    run(scenario())


# -- answered by the gateway ------------------------------------------------------------------


def test_routing_health_and_trial_balance_endpoints() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, _a, b):
            answer = await call(gateway, "GET", f"/v1/routing/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 1)}")
            assert answer.status == 200 and answer.data == {"cell": 1, "leader_site": "prod"}
            answer = await call(gateway, "GET", f"/v1/routing/cards/{ids.new_id(ids.PREFIX_CARD, 2)}")
            assert answer.status == 200 and answer.data == {"cell": 2, "leader_site": "samecity"}
            for path, field_name in [
                ("/v1/routing/customers/nobody", "customer_id"),
                (f"/v1/routing/customers/{ids.new_id(ids.PREFIX_CARD, 1)}", "customer_id"),
                (f"/v1/routing/customers/{ids.new_id(ids.PREFIX_CUSTOMER, 3)}", "customer_id"),  # no cell 3
                ("/v1/routing/cards/6259770100000017", "card_id"),
            ]:
                answer = await call(gateway, "GET", path)
                assert answer.status == 404, path
                assert answer.data["error"]["field"] == field_name
                assert "6259770100000017" not in answer.body.decode()

            assert (await call(gateway, "GET", "/healthz")).data == {"status": "ok"}
            ready = await call(gateway, "GET", "/readyz")
            assert ready.status == 200 and ready.data["ready"] is True and ready.data["site"] == "prod"
            assert ready.data["cells"]["2"] == {
                "ready": True,
                "leader_site": "samecity",
                "upstreams": [b.url],
                "drained": False,
                "in_flight": 0,
            }

            answer = await call(gateway, "GET", "/v1/admin/trial-balance", query="cell=2")
            assert (
                answer.status == 200 and answer.data["upstream"] == "b" and answer.data["query"] == "cell=2"
            )
            for query in ["", "cell=", "cell=3", "cell=x", "cell=-1"]:
                answer = await call(gateway, "GET", "/v1/admin/trial-balance", query=query)
                assert answer.status == 400, query
                assert answer.data["error"]["field"] == "cell"

            too_big = await call(gateway, "POST", "/v1/repayments", b"x" * (1024 * 1024 + 1))
            assert too_big.status == 413 and too_big.data["error"]["field"] == "body"

    run(scenario())


def test_lifespan_starts_polling_and_no_cell_means_not_ready() -> None:
    async def scenario() -> None:
        a = FakeApp("a", {1: (False, None), 2: (False, None)})
        await a.start()
        gateway = Gateway(settings_for({"1": [a.url], "2": [a.url + "/"]}))
        assert len(gateway.health.upstreams) == 1  # one URL serving both cells: one poll, one pool
        events = asyncio.Queue[dict[str, Any]]()
        replies: list[str] = []

        async def send(message: dict[str, Any]) -> None:
            replies.append(message["type"])

        task = asyncio.create_task(gateway({"type": "lifespan"}, events.get, send))
        await events.put({"type": "lifespan.startup"})
        for _ in range(100):
            if replies:
                break
            await asyncio.sleep(0.01)
        assert replies == ["lifespan.startup.complete"]

        ready = await call(gateway, "GET", "/readyz")
        assert ready.status == 503 and ready.data["ready"] is False
        answer = await call(gateway, "GET", f"/v1/cards/{ids.new_id(ids.PREFIX_CARD, 1)}")
        assert answer.status == 503 and answer.data["error"]["code"] == "cell_unavailable"

        a.cells = {1: (True, "samecity"), 2: (False, "prod")}
        await asyncio.sleep(0.3)
        assert (await call(gateway, "GET", f"/v1/cards/{ids.new_id(ids.PREFIX_CARD, 1)}")).status == 200
        assert (await call(gateway, "GET", f"/v1/cards/{ids.new_id(ids.PREFIX_CARD, 2)}")).status == 503
        routing = await call(gateway, "GET", f"/v1/routing/cards/{ids.new_id(ids.PREFIX_CARD, 2)}")
        assert routing.data == {"cell": 2, "leader_site": "prod"}  # known though not ready

        await events.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(task, 2)
        assert replies[-1] == "lifespan.shutdown.complete"
        await a.stop()

    run(scenario())


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_registry_renders_the_text_format() -> None:
    registry = Registry()
    requests = registry.counter("t_requests_total", "Requests.\nTwo lines.", ("route", "outcome"))
    seconds = registry.histogram("t_seconds", "Latency.", ("route",), buckets=(0.01, 0.1))
    healthy = registry.gauge("t_healthy", "Up.", ("upstream",))
    requests.inc(("/v1/x/{id}", "2xx"))
    requests.inc(("/v1/x/{id}", "2xx"), 2)
    requests.inc(('a"b\\c', "4xx"))
    seconds.observe(("/r",), 0.005)
    seconds.observe(("/r",), 0.05)
    seconds.observe(("/r",), 3.0)
    healthy.set(("http://h:1",), 1)
    text = registry.render().decode()
    assert "# HELP t_requests_total Requests.\\nTwo lines.\n# TYPE t_requests_total counter\n" in text
    assert 't_requests_total{route="/v1/x/{id}",outcome="2xx"} 3\n' in text
    assert 't_requests_total{route="a\\"b\\\\c",outcome="4xx"} 1\n' in text
    assert "# TYPE t_seconds histogram\n" in text
    assert 't_seconds_bucket{route="/r",le="0.01"} 1\n' in text
    assert 't_seconds_bucket{route="/r",le="0.1"} 2\n' in text
    assert 't_seconds_bucket{route="/r",le="+Inf"} 3\n' in text
    assert 't_seconds_sum{route="/r"} 3.055\n' in text
    assert 't_seconds_count{route="/r"} 3\n' in text
    assert '# TYPE t_healthy gauge\nt_healthy{upstream="http://h:1"} 1\n' in text
    with pytest.raises(ValueError, match="already registered"):
        registry.counter("t_requests_total", "again")


def test_gateway_metrics_count_by_route_template_not_raw_path() -> None:
    async def scenario() -> None:
        async with two_cells() as (gateway, a, _b):
            for cell in (1, 1, 2):
                await call(gateway, "GET", f"/v1/customers/{ids.new_id(ids.PREFIX_CUSTOMER, cell)}/limits")
            await call(gateway, "GET", "/v1/routing/cards/bad")
            text = (await call(gateway, "GET", "/metrics")).body.decode()
            route = "/v1/customers/{customer_id}/limits"
            assert (
                f'watertight_requests_total{{route="{route}",cell="1",site="prod",outcome="2xx"}} 2' in text
            )
            assert (
                f'watertight_requests_total{{route="{route}",cell="2",site="prod",outcome="2xx"}} 1' in text
            )
            assert (
                'watertight_requests_total{route="/v1/routing/cards/{card_id}",cell="none",site="prod",outcome="4xx"} 1'
                in text
            )
            assert f'watertight_request_seconds_count{{route="{route}",cell="1",site="prod"}} 2' in text
            assert (
                f'watertight_request_seconds_bucket{{route="{route}",cell="1",site="prod",le="+Inf"}} 2'
                in text
            )
            assert f'watertight_upstream_healthy{{upstream="{a.url}",cell="1"}} 1' in text
            assert "CU0" not in text  # no raw ids as labels

    run(scenario())


# -- the upstream client ----------------------------------------------------------------------


def test_upstream_pool_keeps_connections_and_names_its_failures() -> None:
    async def scenario() -> None:
        a = FakeApp("a", {1: (True, "prod")})
        await a.start()
        pool = UpstreamPool(a.url, size_max=2, connect_timeout=0.2)
        for _ in range(3):
            response = await pool.request("GET", "/v1/products", seconds=1)  # chunked answer
            assert response.status == 200 and json.loads(response.body)["upstream"] == "a"
        response = await pool.request("POST", "/x", b'{"a":1}', [(b"content-type", b"application/json")])
        assert json.loads(response.body)["body"] == '{"a":1}'
        assert pool.opened == 1  # one keep-alive connection served all four

        a.frozen = True
        with pytest.raises(UpstreamTimeout) as timeout:
            await pool.request("GET", "/x", seconds=0.2)
        assert timeout.value.sent is True
        await a.stop()
        await pool.close()

        with pytest.raises(UpstreamConnectError):
            await UpstreamPool(a.url, connect_timeout=0.2).request("GET", "/x", seconds=1)

    run(scenario())


# -- settings and the real server -------------------------------------------------------------


def test_bad_settings_fail_with_a_message_naming_the_key(tmp_path: Path) -> None:
    good: dict[str, Any] = {
        "site": "prod",
        "cell_count": 2,
        "upstreams": {"1": ["http://127.0.0.1:1"], "2": ["http://127.0.0.1:1"]},
        "api_tokens_file": str(TOKENS_FILE),
    }
    assert parse(json.dumps(good)).cell_count == 2
    cases = [
        ({**good, "colour": "red"}, "colour"),
        ({k: v for k, v in good.items() if k != "site"}, "site"),
        ({**good, "cell_count": "two"}, "cell_count"),
        ({**good, "health_interval_ms": 0}, "health_interval_ms"),
        ({**good, "upstreams": {"1": ["http://127.0.0.1:1"]}}, "upstreams"),
        ({**good, "upstreams": {**good["upstreams"], "3": ["http://127.0.0.1:1"]}}, "upstreams"),
        ({**good, "upstreams": {"1": ["https://x:1"], "2": ["http://x:1"]}}, "upstreams.1"),
        ({**good, "upstreams": {"1": ["http://x:1/api"], "2": ["http://x:1"]}}, "upstreams.1"),
        ({**good, "slot_overrides": {"5": 7}}, "slot_overrides"),
    ]
    for data, key in cases:
        with pytest.raises(GatewayConfigError) as error:
            parse(json.dumps(data))
        assert key in str(error.value), (key, str(error.value))
    with pytest.raises(GatewayConfigError, match="JSON"):
        parse("{")

    bad = tmp_path / "gateway.json"
    bad.write_text(json.dumps({**good, "prot": 8000}))
    result = subprocess.run(
        [sys.executable, "-m", "cardcore.gateway", "--config", str(bad)],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert result.returncode == 2
    assert "prot" in result.stderr and str(bad) in result.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def fake_in_thread(app: FakeApp) -> Iterator[FakeApp]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    asyncio.run_coroutine_threadsafe(app.start(), loop).result(5)
    try:
        yield app
    finally:
        asyncio.run_coroutine_threadsafe(app.stop(), loop).result(5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def _get(url: str, body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=body, method=method)
    value = TOKENS.header_value(method, urllib.parse.urlsplit(url).path)
    if value is not None:
        request.add_header("authorization", value)
    if body is not None:
        request.add_header("content-type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


@pytest.mark.parametrize("server", ["lean", "granian"])
def test_serves_as_one_process_on_either_http_server(tmp_path: Path, server: str) -> None:
    with fake_in_thread(FakeApp("a", {1: (True, "prod"), 2: (True, "dr")})) as app:
        port = _free_port()
        config = tmp_path / "gateway.json"
        config.write_text(
            json.dumps(
                {
                    "site": "samecity",
                    "host": "127.0.0.1",
                    "port": port,
                    "cell_count": 2,
                    "upstreams": {"1": [app.url], "2": [app.url]},
                    "health_interval_ms": 100,
                    "api_tokens_file": str(TOKENS_FILE),
                }
            )
        )
        env = {
            **os.environ,
            "PYTHONPATH": f"{REPO / 'core-app'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
            "WATERTIGHT_HTTP_SERVER": server,
        }
        process = subprocess.Popen(
            [sys.executable, "-m", "cardcore.gateway", "--config", str(config)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            base = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 15
            while True:
                try:
                    if _get(f"{base}/healthz")[0] == 200:
                        break
                except OSError:
                    pass
                assert process.poll() is None, process.stdout.read().decode() if process.stdout else ""
                assert time.monotonic() < deadline, "the gateway did not come up"
                time.sleep(0.05)

            status, headers, body = _get(f"{base}/v1/cards/{ids.new_id(ids.PREFIX_CARD, 2)}?q=1")
            assert status == 200 and json.loads(body)["query"] == "q=1"
            assert headers["x-watertight-cell"] == "2" and headers["x-watertight-site"] == "samecity"
            pan = ids.new_pan(1, 3)
            status, headers, body = _get(f"{base}/v1/authorizations", json.dumps({"pan": pan}).encode())
            assert status == 200 and headers["x-watertight-cell"] == "1"
            assert json.loads(json.loads(body)["body"]) == {"pan": pan}
            status, _, body = _get(f"{base}/v1/routing/cards/{ids.new_id(ids.PREFIX_CARD, 2)}")
            assert json.loads(body) == {"cell": 2, "leader_site": "dr"}
            status, headers, body = _get(f"{base}/metrics")
            assert status == 200 and headers["content-type"].startswith("text/plain")
            assert b'watertight_requests_total{route="/v1/cards/{card_id}",cell="2",site="samecity"' in body
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def test_the_drain_status_command_names_a_gateway_that_does_not_answer(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from cardcore.gateway import drain

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    assert drain.main(["--port", str(port), "--cell", "1"]) == 1
    assert f"drain status of cell 1 at 127.0.0.1:{port}" in capsys.readouterr().err
