"""The gateway: a raw ASGI 3 app that sends each request to a healthy app server of its cell.

Owns: finding a request's cell (from the id in its path, else from one small body field), choosing
a healthy upstream for it (round-robin, see ``health.py``), forwarding bytes in and bytes out,
fan-out of the all-cell endpoints with their merge, the routing endpoints, draining a cell for
maintenance (new requests for it answered 503 / response code 91 at once, those in flight let
finish: see ``drain.py``), and the gateway's own healthz/readyz/metrics. Never: decode or re-encode JSON on the forwarding path, resend a request
whose bytes may have reached an app server (unless it is a GET), let a down or frozen cell slow the
others, or answer 500 to bad input (a request it cannot route goes to any app server, which
answers the proper 4xx).

Serve it with ``python -m cardcore.gateway --config FILE.json`` (cardcore.platform.serve), or any
ASGI server, e.g. ``granian --interface asgi --factory cardcore.gateway.app:create_app`` with
``WATERTIGHT_GATEWAY_CONFIG=FILE.json``.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qs, quote

import msgspec

from cardcore.common import ids
from cardcore.common.routing import Router
from cardcore.gateway.drain import DrainControl
from cardcore.gateway.health import HealthMonitor, Upstream
from cardcore.gateway.routes import Kind, Route, classify
from cardcore.gateway.settings import GatewaySettings, load_from_env
from cardcore.platform import metrics
from cardcore.platform.admission import BODY_INCOMPLETE_CODE, BODY_TIMEOUT_CODE, SHED_BODY, Admission
from cardcore.platform.auth import AccessControl
from cardcore.platform.http import lifespan
from cardcore.platform.tls import client_context
from cardcore.platform.upstream import (
    Response,
    UpstreamConnectError,
    UpstreamError,
    UpstreamProtocolError,
    UpstreamTimeout,
)

log = logging.getLogger("cardcore.gateway")

# headers of an app server's answer the gateway passes on (the rest it sets itself)
PASSED_ON = (b"allow", b"retry-after", b"www-authenticate")
_passed_on: contextvars.ContextVar[list[tuple[bytes, bytes]]] = contextvars.ContextVar("passed_on")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY_BYTES_MAX = 1024 * 1024  # the app servers accept far less; this only bounds the gateway's memory
TRIES_MAX = 2

JSON = b"application/json"
# ISO 8583 91: issuer (cell) unavailable. A decline, not an error: card networks expect a 200.
AUTH_UNAVAILABLE = b'{"auth_id":null,"approved":false,"response_code":"91","available":null}'

_encode = msgspec.json.Encoder().encode
_decode_any = msgspec.json.Decoder().decode
_PLAIN_PATH = re.compile(r"[A-Za-z0-9/_.~\-:@!$&'()*+,;=]*")  # forwarded as is; else percent-encoded


# -- the small body fields that carry a cell (unknown fields ignored, wrong types: no cell) ------


class _PanBody(msgspec.Struct):
    pan: str | None = None


class _AuthIdBody(msgspec.Struct):
    auth_id: str | None = None


class _AccountBody(msgspec.Struct):
    account_id: str | None = None


class _Applicant(msgspec.Struct):
    id_number: str | None = None


class _ApplicationBody(msgspec.Struct):
    applicant: _Applicant | None = None


class _PricingRuleBody(msgspec.Struct):
    layer: str | None = None
    account_id: str | None = None


class _CycleBody(msgspec.Struct):
    business_date: Any = None


_decode_pan = msgspec.json.Decoder(_PanBody).decode
_decode_auth_id = msgspec.json.Decoder(_AuthIdBody).decode
_decode_account = msgspec.json.Decoder(_AccountBody).decode
_decode_application = msgspec.json.Decoder(_ApplicationBody).decode
_decode_pricing_rule = msgspec.json.Decoder(_PricingRuleBody).decode
_decode_cycle = msgspec.json.Decoder(_CycleBody).decode


class _Failed(Exception):
    """A request that got no usable answer from its cell."""

    def __init__(self, outcome: str, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.outcome = outcome  # "unavailable" | "timeout" | "5xx"
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> bytes:
        return error_body(self.code, self.message)


class _TooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    """The client did not send the whole body in time."""


class _ClientGone(Exception):
    """The client closed its connection before it sent the whole body: nothing is forwarded."""


def error_body(code: str, message: str, field: str | None = None) -> bytes:
    return _encode({"error": {"code": code, "message": message, "field": field}})


def _outcome(status: int) -> str:
    return f"{status // 100}xx"


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _ClientGone
    body: bytes = message.get("body", b"")
    if not message.get("more_body", False):
        if len(body) > BODY_BYTES_MAX:
            raise _TooLarge
        return body
    chunks = [body]
    size = len(body)
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":  # part of a body: never forwarded
            raise _ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


_FORWARDED = (b"content-type", b"authorization")


def _forwarded_headers(scope: Scope) -> list[tuple[bytes, bytes]]:
    """The request headers an app server needs: its content type, and the client's credentials
    (checked again there: a request that reaches an app server across sites is refused there
    without them)."""
    return [(name, bytes(value)) for name, value in scope.get("headers", ()) if name in _FORWARDED]


def _path_target(scope: Scope) -> str:
    raw = scope.get("raw_path")
    if raw:
        return bytes(raw).decode("latin-1")
    path: str = scope["path"]
    if _PLAIN_PATH.fullmatch(path):
        return path
    return quote(path, safe="/:@!$&'()*+,;=~")


def _query_of(scope: Scope) -> str:
    query = scope.get("query_string", b"")
    return query.decode("latin-1") if isinstance(query, bytes) else str(query)


class Gateway:
    """The ASGI application. One instance per worker process."""

    def __init__(self, settings: GatewaySettings) -> None:
        settings.validate()
        self.settings = settings
        self.site = settings.site
        self._site_header = settings.site.encode("utf-8")
        self.router = Router(settings.cell_count, settings.slot_overrides)
        self.cells = self.router.cells
        self.request_timeout = settings.request_timeout_ms / 1000

        self.registry = metrics.Registry()
        self.m_requests = self.registry.counter(
            "watertight_requests_total",
            "Requests answered by the gateway, by route template, cell, site and outcome.",
            ("route", "cell", "site", "outcome"),
        )
        self.m_seconds = self.registry.histogram(
            "watertight_request_seconds",
            "Time from request to answer at the gateway.",
            ("route", "cell", "site"),
        )
        self.m_decisions = self.registry.counter(
            "watertight_authorizations_total",
            "Authorization decisions answered through the gateway, by ISO 8583 response code.",
            ("cell", "site", "response_code"),
        )
        # a series that appears only at its first event is invisible to rate() and increase():
        # the codes the alerts watch (approved, issuer unavailable) exist from the start
        for cell in self.cells:
            for code in ("00", "91"):
                self.m_decisions.inc((str(cell), self.site, code), 0)
        self.m_healthy = self.registry.gauge(
            "watertight_upstream_healthy",
            "1 when the upstream app server can serve the cell (last readyz poll), else 0.",
            ("upstream", "cell"),
        )
        self.health = HealthMonitor(
            settings.cell_upstreams(),
            interval=settings.health_interval_ms / 1000,
            timeout=settings.health_timeout_ms / 1000,
            connect_timeout=settings.connect_timeout_ms / 1000,
            pool_size_max=settings.pool_size_max,
            gauge=self.m_healthy,
            ssl_context=None if settings.tls_ca_file is None else client_context(settings.tls_ca_file),
        )
        self.drain = DrainControl(settings.drain_file, settings.drain_poll_ms / 1000, self.cells)
        self.access = AccessControl(settings.api_tokens_file)
        limits = settings.serve_limits()
        self.admission = Admission(limits)
        self.body_timeout_s = limits.body_read_timeout_ms / 1000
        self._started = False
        self._start_lock = asyncio.Lock()

    # -- lifecycle ------------------------------------------------------------------------------

    async def startup(self) -> None:
        """Poll every upstream once, then keep polling. Idempotent."""
        async with self._start_lock:
            if not self._started:
                await self.health.start()
                await self.drain.start()
                await self.access.start()
                self._started = True
                log.info(
                    "gateway %s: %d cells, upstreams %s",
                    self.site,
                    len(self.cells),
                    ", ".join(self.health.upstreams),
                )

    async def shutdown(self) -> None:
        await self.access.stop()
        await self.drain.stop()
        await self.health.stop()
        self._started = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        await lifespan(receive, send, self.startup, self.shutdown)

    # -- one request ----------------------------------------------------------------------------

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.admission.enter(scope)
        if client is None:
            # shed at once, nothing read: a client cannot hold the others back by opening requests
            await self._send(send, 503, JSON, SHED_BODY, "none", [(b"retry-after", b"1")])
            self.m_requests.inc(
                (classify(scope["method"], scope["path"]).template, "none", self.site, "shed")
            )
            return
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.admission.leave(client)

    async def _send(
        self,
        send: Send,
        status: int,
        content_type: bytes,
        data: bytes,
        cell: str,
        extra: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", content_type),
                    (b"content-length", b"%d" % len(data)),
                    (b"x-watertight-cell", cell.encode("ascii")),
                    (b"x-watertight-site", self._site_header),
                    *(extra or ()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": data})

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        _passed_on.set([])
        if not self._started:
            await self.startup()
        route = classify(scope["method"], scope["path"])
        cell = "none"
        extra: list[tuple[bytes, bytes]] = []
        refused = self.access.check(scope["method"], scope["path"], scope.get("headers", ()))
        try:
            if refused is not None:
                # nothing read, nothing forwarded: the body stays unread
                status, content_type, data, outcome = refused.status, JSON, refused.body(), "4xx"
                extra = refused.headers()
            else:
                try:
                    async with asyncio.timeout(self.body_timeout_s):
                        body = await _read_body(receive)
                except TimeoutError:
                    raise _BodyTimeout from None
                status, content_type, data, cell, outcome = await self._dispatch(route, scope, body)
        except _BodyTimeout:
            status, content_type, outcome = 408, JSON, "4xx"
            message = f"the body did not arrive within {self.body_timeout_s:g} s"
            data = error_body(BODY_TIMEOUT_CODE, message, "body")
        except _ClientGone:
            # no one reads this answer; it is counted as what it is: the client's doing
            status, content_type, outcome = 400, JSON, "4xx"
            data = error_body(BODY_INCOMPLETE_CODE, "the client closed before sending the whole body", "body")
        except _TooLarge:
            status, content_type, outcome = 413, JSON, "4xx"
            data = error_body("body_too_large", f"the body exceeds {BODY_BYTES_MAX} bytes", "body")
        except Exception:  # a gateway bug: say so, keep serving
            log.exception("gateway: unexpected error on %s %s", scope["method"], route.template)
            status, content_type, outcome = 500, JSON, "5xx"
            data = error_body("internal", "the gateway failed to handle the request")
        await self._send(send, status, content_type, data, cell, extra + _passed_on.get([]))
        self.m_requests.inc((route.template, cell, self.site, outcome))
        if route.kind is Kind.BODY_PAN and status == 200:
            self.m_decisions.inc((cell, self.site, _response_code(data)))
        self.m_seconds.observe((route.template, cell, self.site), time.perf_counter() - started)

    async def _dispatch(self, route: Route, scope: Scope, body: bytes) -> tuple[int, bytes, bytes, str, str]:
        """(status, content type, body, cell label, outcome label)."""
        kind = route.kind
        if kind is Kind.PATH_ID:
            cell = self.router.cell_for_id(route.key, route.prefix)
            # an increment is an authorization: a cell that cannot answer declines it with 91
            increment = route.template.endswith("/increment") and cell is not None
            return await self._to_cell(cell, scope, body, authorization=increment)
        if kind in (Kind.BODY_PAN, Kind.BODY_PAN_REFUND, Kind.REVERSAL_BY_KEY):
            pan_cell: int | None = None
            try:
                pan = _decode_pan(body).pan
                pan_cell = self.router.cell_for_pan(pan) if pan else None
            except msgspec.DecodeError:
                pan = None
            if kind is Kind.REVERSAL_BY_KEY and not pan:
                # no card number: the cell that knew the original answers, the others record it
                return await self._fanout(kind, route, scope, body)
            return await self._to_cell(pan_cell, scope, body, authorization=kind is Kind.BODY_PAN)
        if kind is Kind.BODY_AUTH_ID:
            try:
                auth_id = _decode_auth_id(body).auth_id
            except msgspec.DecodeError:
                auth_id = None
            return await self._to_cell(self._id_cell(auth_id, ids.PREFIX_AUTHORIZATION), scope, body)
        if kind is Kind.BODY_ACCOUNT_ID:
            try:
                account_id = _decode_account(body).account_id
            except msgspec.DecodeError:
                account_id = None
            return await self._to_cell(self._id_cell(account_id, ids.PREFIX_ACCOUNT), scope, body)
        if kind is Kind.BODY_APPLICANT:
            applicant_cell: int | None = None
            try:
                applicant = _decode_application(body).applicant
                if applicant is not None and applicant.id_number and applicant.id_number.strip():
                    applicant_cell = self.router.cell_for_applicant(applicant.id_number)
            except msgspec.DecodeError:
                pass
            return await self._to_cell(applicant_cell, scope, body)
        if kind is Kind.PRICING_RULE:
            try:
                rule = _decode_pricing_rule(body)
            except msgspec.DecodeError:
                rule = _PricingRuleBody()
            if rule.layer == "account":
                return await self._to_cell(self._id_cell(rule.account_id, ids.PREFIX_ACCOUNT), scope, body)
            if rule.layer in ("product", "transaction"):
                return await self._fanout(Kind.FANOUT_FIRST, route, scope, body)
            return await self._to_cell(None, scope, body)
        if kind in (
            Kind.FANOUT_FIRST,
            Kind.FANOUT_DEFINE,
            Kind.FANOUT_TAG_CUSTOMERS,
            Kind.FANOUT_RULES,
            Kind.FANOUT_CYCLE,
        ):
            return await self._fanout(kind, route, scope, body)
        if kind is Kind.CELL_QUERY:
            values = parse_qs(_query_of(scope), keep_blank_values=True).get("cell")
            raw = values[-1].strip() if values else ""
            if not raw.isdigit() or int(raw) not in self.cells:
                message = f"query parameter cell must be a cell number in 1..{len(self.cells)}"
                return 400, JSON, error_body("invalid", message, "cell"), "none", "4xx"
            return await self._to_cell(int(raw), scope, body)
        if kind is Kind.ROUTING_CUSTOMER or kind is Kind.ROUTING_CARD:
            return self._routing_answer(route)
        if kind is Kind.HEALTHZ:
            return 200, JSON, b'{"status":"ok"}', "none", "2xx"
        if kind is Kind.READYZ:
            return self._readyz()
        if kind is Kind.METRICS:
            return 200, metrics.CONTENT_TYPE, self.registry.render(), "none", "2xx"
        return await self._to_cell(None, scope, body)

    def _id_cell(self, value: str | None, prefix: str) -> int | None:
        return self.router.cell_for_id(value, prefix) if value else None

    # -- forwarding -----------------------------------------------------------------------------

    async def _to_cell(
        self, cell: int | None, scope: Scope, body: bytes, authorization: bool = False
    ) -> tuple[int, bytes, bytes, str, str]:
        """Forward to a healthy upstream of ``cell`` (None: of any cell) and return its answer as is."""
        if cell is None:
            label = "any"
            candidates = self.health.any_candidates(TRIES_MAX)
        else:
            label = str(cell)
            if cell in self.drain.drained:
                if authorization:
                    return 200, JSON, AUTH_UNAVAILABLE, label, "drained"
                message = f"cell {cell} is drained for maintenance; retry later"
                return 503, JSON, error_body("cell_drained", message), label, "drained"
            candidates = self.health.candidates(cell, TRIES_MAX)
        target = _path_target(scope)
        query = _query_of(scope)
        if query:
            target = f"{target}?{query}"
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        self.drain.begin(cell)
        try:
            response = await self._exchange(
                cell,
                candidates,
                scope["method"],
                target,
                body,
                _forwarded_headers(scope),
                deadline,
                replayable=_replayable(scope["method"], scope["path"]),
            )
        except _Failed as failed:
            if authorization:
                return 200, JSON, AUTH_UNAVAILABLE, label, failed.outcome
            return failed.status, JSON, failed.body(), label, failed.outcome
        finally:
            self.drain.end(cell)
        _passed_on.set([(name, value) for name, value in response.headers if name in PASSED_ON])
        return (
            response.status,
            response.header(b"content-type") or JSON,
            response.body,
            label,
            _outcome(response.status),
        )

    async def _exchange(
        self,
        cell: int | None,
        candidates: list[Upstream],
        method: str,
        target: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
        replayable: bool = False,
    ) -> Response:
        """One request to the first candidate that takes it; a second only if nothing was sent."""
        what = f"cell {cell}" if cell is not None else "the core"
        code = "cell_unavailable" if cell is not None else "unavailable"
        if not candidates:
            raise _Failed(
                "unavailable",
                503,
                code,
                f"{what} is unavailable: no healthy app server; retry later or through another site",
            )
        last: UpstreamError | None = None
        for upstream in candidates:
            try:
                return await upstream.pool.request_until(method, target, body, headers, deadline)
            except UpstreamConnectError as error:
                self.health.mark_down(upstream, str(error))
                last = error
            except UpstreamProtocolError as error:
                if error.sent and not ((method == "GET" or replayable) and not error.responded):
                    raise _Failed(
                        "5xx", 502, "upstream_error", f"{what}: the app server broke the connection"
                    ) from None
                last = error
            except UpstreamTimeout:
                ms = round(self.request_timeout * 1000)
                raise _Failed(
                    "timeout", 504, "upstream_timeout", f"{what} did not answer within {ms} ms"
                ) from None
        raise _Failed(
            "unavailable",
            503,
            code,
            f"{what} is unavailable: {last}; retry later or through another site",
        )

    # -- fan-out --------------------------------------------------------------------------------

    async def _fanout(
        self, kind: Kind, route: Route, scope: Scope, body: bytes
    ) -> tuple[int, bytes, bytes, str, str]:
        method = scope["method"]
        path = _path_target(scope)
        query = _query_of(scope)
        chosen = parse_qs(query, keep_blank_values=True).get("cell")
        if chosen:
            # one cell asked for (e.g. by a gateway in front of this one): no fan-out
            raw = chosen[-1].strip()
            if not raw.isdigit() or int(raw) not in self.cells:
                message = f"query parameter cell must be a cell number in 1..{len(self.cells)}"
                return 400, JSON, error_body("invalid", message, "cell"), "none", "4xx"
            return await self._to_cell(int(raw), scope, body)
        headers = _forwarded_headers(scope)
        deadline = asyncio.get_running_loop().time() + self.request_timeout
        if kind is Kind.REVERSAL_BY_KEY:
            # first only where the original is known, so a refusal writes nothing anywhere; when
            # no cell knows it, the reversal is claimed in every cell
            known = f"{query}&known=only" if query else "known=only"
            first = await self._ask_every_cell(method, path, known, body, headers, deadline)
            decided = self._merge_known(first)
            if decided is not None:
                return decided
        if kind is Kind.FANOUT_DEFINE:
            # first every cell checks for a different definition, writing nothing, so a conflict
            # in one cell leaves every cell as it was
            check = f"{query}&check=only" if query else "check=only"
            checked = await self._ask_every_cell(method, path, check, body, headers, deadline)
            refused = self._merge_check(checked)
            if refused is not None:
                return refused
        answers = await self._ask_every_cell(method, path, query, body, headers, deadline)
        return self._merge(kind, route, body, answers)

    async def _ask_every_cell(
        self,
        method: str,
        path: str,
        query: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]],
        deadline: float,
    ) -> dict[int, Response | _Failed]:
        async def one(cell: int) -> Response | _Failed:
            target = f"{path}?{query}&cell={cell}" if query else f"{path}?cell={cell}"
            try:
                return await self._exchange(
                    cell,
                    self.health.candidates(cell, TRIES_MAX),
                    method,
                    target,
                    body,
                    headers,
                    deadline,
                )
            except _Failed as failed:
                return failed

        answers = await asyncio.gather(*(one(cell) for cell in self.cells))
        return dict(zip(self.cells, answers, strict=True))

    def _merge(
        self, kind: Kind, route: Route, request_body: bytes, answers: dict[int, Response | _Failed]
    ) -> tuple[int, bytes, bytes, str, str]:
        """One answer from every cell's. A cell that refused the request (4xx) is not a cell that
        failed: any refusal is the answer, as the first refusing cell gave it (a retry cannot
        change it; the write fan-outs check every cell before writing any, so a refusal wrote
        nothing). Otherwise any cell that failed (unavailable, timed out, 5xx) makes a 503 with
        the partial result: a retry with the same body heals, as the write fan-outs take "there
        already, the same" as success. A cell that does not define a tag has none of its
        customers: an empty list, not a refusal. On success a write fan-out answers 201 when
        any cell created the thing, else 200 (every cell had it already)."""
        decoded: dict[int, dict[str, Any]] = {}
        failed: dict[int, str] = {}
        rejected: list[Response] = []
        undefined: list[Response] = []  # cells that do not define the tag asked for
        first: Response | None = None
        created = False
        for cell, answer in answers.items():
            if isinstance(answer, _Failed):
                failed[cell] = answer.message
                continue
            if 400 <= answer.status < 500:
                if kind is Kind.FANOUT_TAG_CUSTOMERS and _tag_undefined(answer):
                    undefined.append(answer)
                    decoded[cell] = {"tag": route.key, "customers": []}
                    continue
                rejected.append(answer)
                continue
            if not 200 <= answer.status < 300:
                failed[cell] = f"cell {cell} answered {answer.status}"
                continue
            try:
                value = _decode_any(answer.body)
            except msgspec.DecodeError:
                value = None
            if not isinstance(value, dict):
                failed[cell] = f"cell {cell} answered something other than a JSON object"
                continue
            decoded[cell] = value
            first = first or answer
            created = created or answer.status == 201

        if kind is Kind.REVERSAL_BY_KEY:
            return self._merge_reversal(answers, decoded, rejected, failed)
        if len(undefined) == len(answers):
            rejected = undefined  # no cell defines it: there is no such tag
        if rejected:
            answer = rejected[0]
            return answer.status, answer.header(b"content-type") or JSON, answer.body, "all", "4xx"

        merged: dict[str, Any]
        if kind in (Kind.FANOUT_FIRST, Kind.FANOUT_DEFINE):
            if not failed and first is not None:
                status = 201 if created else first.status
                return status, first.header(b"content-type") or JSON, first.body, "all", _outcome(status)
            merged = {"cells": {str(cell): value for cell, value in decoded.items()}}
        elif kind is Kind.FANOUT_CYCLE:
            try:
                business_date = _decode_cycle(request_body).business_date
            except msgspec.DecodeError:
                business_date = None
            for value in decoded.values():
                business_date = value.get("business_date", business_date)
                break
            merged = {
                "business_date": business_date,
                # an app server answers {"cells": {"N": ...}} for ?cell=N: keep the inner answer
                "cells": {
                    str(cell): value.get("cells", {}).get(str(cell), value)
                    if isinstance(value, dict)
                    else value
                    for cell, value in decoded.items()
                },
            }
        else:
            key = "customers" if kind is Kind.FANOUT_TAG_CUSTOMERS else "rules"
            items: list[Any] = []
            seen: set[str] = set()
            merged = {}
            for cell, value in decoded.items():
                listed = value.get(key)
                if not isinstance(listed, list):
                    failed[cell] = f"cell {cell} answered without a {key} list"
                    continue
                if not merged:
                    merged = dict(value)
                if kind is Kind.FANOUT_RULES:
                    for rule in listed:
                        rule_id = rule.get("rule_id") if isinstance(rule, dict) else None
                        if isinstance(rule_id, str):
                            if rule_id in seen:
                                continue
                            seen.add(rule_id)
                        items.append(rule)
                else:
                    items.extend(listed)
            if kind is Kind.FANOUT_TAG_CUSTOMERS:
                merged.setdefault("tag", route.key)
            merged[key] = items

        if not failed:
            return 200, JSON, _encode(merged), "all", "2xx"
        cells = ", ".join(str(cell) for cell in sorted(failed))
        reasons = "; ".join(failed[cell] for cell in sorted(failed))
        merged["error"] = {
            "code": "cells_unavailable",
            "message": f"cell(s) {cells} failed, results are partial: {reasons}",
            "field": None,
        }
        merged["failed_cells"] = [str(cell) for cell in sorted(failed)]
        return 503, JSON, _encode(merged), "all", "unavailable"

    @staticmethod
    def _merge_check(answers: dict[int, Response | _Failed]) -> tuple[int, bytes, bytes, str, str] | None:
        """The first round of a definition fanned out (``check=only``, nothing written): the first
        refusal (a different definition in some cell: 409); a 503 when a cell could not say;
        None when every cell may take it: second round."""
        failed: list[int] = []
        for cell, answer in answers.items():
            if isinstance(answer, _Failed) or answer.status >= 500:
                failed.append(cell)
            elif answer.status >= 300:
                return answer.status, answer.header(b"content-type") or JSON, answer.body, str(cell), "4xx"
        if failed:
            cells = ", ".join(str(cell) for cell in sorted(failed))
            message = f"cell(s) {cells} could not be asked; nothing was written; retry"
            return 503, JSON, error_body("cells_unavailable", message), "all", "unavailable"
        return None

    @staticmethod
    def _merge_known(answers: dict[int, Response | _Failed]) -> tuple[int, bytes, bytes, str, str] | None:
        """The first round of a reversal by key (``known=only``): the answer of the cell that knew
        the original (a refusal too: nothing was written anywhere); a 503 when a cell could not
        say; None when no cell knows it (or only recorded this reversal before): second round."""
        failed: list[int] = []
        for cell, answer in answers.items():
            if isinstance(answer, _Failed) or answer.status >= 500:
                failed.append(cell)
                continue
            try:
                value = _decode_any(answer.body)
            except msgspec.DecodeError:
                value = None
            if not isinstance(value, dict):
                failed.append(cell)
                continue
            error = value.get("error")
            if answer.status == 404 and isinstance(error, dict) and error.get("code") == "original_unknown":
                continue
            if answer.status >= 300 or value.get("original") != "absent":
                outcome = _outcome(answer.status)
                return answer.status, answer.header(b"content-type") or JSON, answer.body, str(cell), outcome
        if failed:
            cells = ", ".join(str(cell) for cell in sorted(failed))
            message = f"cell(s) {cells} could not be asked; retry the reversal with the same idempotency_key"
            return 503, JSON, error_body("cells_unavailable", message), "all", "unavailable"
        return None

    @staticmethod
    def _merge_reversal(
        answers: dict[int, Response | _Failed],
        decoded: dict[int, dict[str, Any]],
        rejected: list[Response],
        failed: dict[int, str],
    ) -> tuple[int, bytes, bytes, str, str]:
        """A reversal by key asked of every cell: the cell that knew the original answers (its
        refusal too); else any failure is a 503 (retry: the cells that recorded it answer the
        same again); else the first cell's "recorded"."""
        for refused in rejected:
            return refused.status, refused.header(b"content-type") or JSON, refused.body, "all", "4xx"
        found = [cell for cell, value in decoded.items() if value.get("original") != "absent"]
        if not found and failed:
            cells = ", ".join(str(cell) for cell in sorted(failed))
            message = f"cell(s) {cells} could not be asked; retry the reversal with the same idempotency_key"
            return 503, JSON, error_body("cells_unavailable", message), "all", "unavailable"
        cell = found[0] if found else next(iter(decoded))
        answer = answers[cell]
        assert isinstance(answer, Response)
        return answer.status, answer.header(b"content-type") or JSON, answer.body, str(cell), "2xx"

    # -- answered here --------------------------------------------------------------------------

    def _routing_answer(self, route: Route) -> tuple[int, bytes, bytes, str, str]:
        if route.kind is Kind.ROUTING_CUSTOMER:
            field, prefix, noun = "customer_id", ids.PREFIX_CUSTOMER, "customer"
        else:
            field, prefix, noun = "card_id", ids.PREFIX_CARD, "card"
        cell = self.router.cell_for_id(route.key, prefix)
        if cell is None:
            message = f"not a {noun} id of this core (expected {prefix}<cell><16 characters>)"
            return 404, JSON, error_body("not_found", message, field), "none", "4xx"
        answer = {"cell": cell, "leader_site": self.health.leader_site(cell)}
        return 200, JSON, _encode(answer), str(cell), "2xx"

    def _readyz(self) -> tuple[int, bytes, bytes, str, str]:
        cells: dict[str, Any] = {}
        for cell in self.cells:
            healthy = [u.url for u in self.health.by_cell.get(cell, ()) if u.healthy_for(cell)]
            cells[str(cell)] = {
                "ready": bool(healthy),
                "leader_site": self.health.leader_site(cell),
                "upstreams": healthy,
                "drained": cell in self.drain.drained,
                "in_flight": self.drain.in_flight(cell),
            }
        ready = any(value["ready"] for value in cells.values())
        body = _encode(
            {"ready": ready, "site": self.site, "cells": cells, "upstreams": self.health.describe()}
        )
        status = 200 if ready else 503
        return status, JSON, body, "none", _outcome(status)


def create_app(settings: GatewaySettings | None = None) -> Gateway:
    """The ASGI app; without ``settings`` reads the file named by WATERTIGHT_GATEWAY_CONFIG."""
    if settings is None:
        settings = load_from_env()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return Gateway(settings)


_RESPONSE_CODE = b'"response_code":"'


def _tag_undefined(answer: Response) -> bool:
    """A cell's 404 for a tag it does not define (as against any other refusal)."""
    if answer.status != 404:
        return False
    try:
        value = _decode_any(answer.body)
    except msgspec.DecodeError:
        return False
    error = value.get("error") if isinstance(value, dict) else None
    return isinstance(error, dict) and error.get("field") == "tag"


def _response_code(answer: bytes) -> str:
    """The ISO 8583 code of an authorization answer, found without decoding the JSON."""
    at = answer.find(_RESPONSE_CODE)
    if at < 0:
        return "unknown"
    start = at + len(_RESPONSE_CODE)
    return answer[start : start + 2].decode("ascii", "replace")


# financial requests carry an idempotency key: sending one again cannot post twice
_FINANCIAL_PATHS = frozenset(
    {
        "/v1/authorizations",
        "/v1/clearing",
        "/v1/repayments",
        "/v1/installments",
        "/v1/refunds",
        "/v1/authorizations/reversal",
    }
)


def _replayable(method: str, path: str) -> bool:
    """A request that may be sent to a second app server when the first broke the connection
    before answering: reads, and financial writes (their idempotency key makes a resend safe)."""
    if method == "GET":
        return True
    return method == "POST" and (
        path in _FINANCIAL_PATHS or path.endswith(("/reversal", "/payoff", "/increment"))
    )
