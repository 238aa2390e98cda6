"""A small, fast ASGI layer: routes by path template, msgspec bodies, the contract's error body.

Owns: request parsing (bounded body), validation errors that name the field, JSON responses.
Never: echo a request body into a log or an error message (it may hold a card number).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import parse_qs

import msgspec

from cardcore.platform.admission import BODY_TIMEOUT_CODE, SHED_BODY, Admission, ServeLimits
from cardcore.platform.auth import AccessControl

BODY_BYTES_MAX = 64 * 1024

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_JSON_HEADERS = [(b"content-type", b"application/json")]
_encoder = msgspec.json.Encoder()


class ApiError(Exception):
    """An error the client gets as ``{"error": {code, message, field}}``."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field
        self.headers = headers or []

    def body(self) -> dict[str, Any]:
        return {"error": {"code": self.code, "message": self.message, "field": self.field}}


def bad_request(field: str, message: str, code: str = "invalid") -> ApiError:
    return ApiError(400, code, message, field)


def not_found(field: str, message: str) -> ApiError:
    return ApiError(404, "not_found", message, field)


def conflict(code: str, message: str, field: str | None = None) -> ApiError:
    return ApiError(409, code, message, field)


def unprocessable(code: str, message: str, field: str | None = None) -> ApiError:
    return ApiError(422, code, message, field)


_PATH_RE = re.compile(r"`\$((?:\.[A-Za-z_][A-Za-z0-9_]*|\[\d+\])*)`")
_UNKNOWN_RE = re.compile(r"unknown field `([^`]+)`")
_MISSING_RE = re.compile(r"missing required field `([^`]+)`")


def field_of_validation_error(message: str) -> str | None:
    """The dotted field a msgspec validation message points at (``applicant.birth_date``)."""
    path = ""
    match = _PATH_RE.search(message)
    if match:
        path = match.group(1).lstrip(".")
    for pattern in (_UNKNOWN_RE, _MISSING_RE):
        named = pattern.search(message)
        if named:
            return f"{path}.{named.group(1)}" if path else named.group(1)
    return path or None


# msgspec's words for a float where an int (or an optional int: `int | null`) is expected
_FLOAT_FOR_INT = re.compile(r"Expected `(?:[^`]*\| )?int(?: \|[^`]*)?`, got `float`")


_INTEGRAL_DIGITS_MAX = 19  # below 10**19: every int64


def _integral_as_int(text: str) -> int | float:
    """A JSON number written with a fraction or an exponent (``47.0``, ``4.7e1``): the exact
    integer when it is one, else the float."""
    try:
        exact = Decimal(text)
    except ArithmeticError:
        return float(text)
    # bounded before it becomes an int: 1e100000000 would be a hundred million digits (and is no
    # int64 anyway: left a float, it is refused as before)
    if exact.is_finite() and exact.adjusted() < _INTEGRAL_DIGITS_MAX and exact == exact.to_integral_value():
        return int(exact)
    return float(text)


# JSON has one number type and JSON Schema's "integer" is any number without a fractional part,
# so 47.0 is an integer to every client built on the OpenAPI description: an integer field takes it.
# msgspec's own lax mode would also take strings ("47") and is not used. The typed decode above
# stays the fast path; this second pass runs only when it refused a float for an int, and turns
# exactly the integral number literals into ints (exactly: from the text, never through a float,
# so 12345678901234567.0 is not rounded) before the same strict validation. A float field still
# gets a float (msgspec takes an int for a float), and the idempotency digest is of the decoded
# request, so 47.0 and 47 under one key are the same request.
_integral_decoder = msgspec.json.Decoder(float_hook=_integral_as_int)


def _decode_integral_floats(body: bytes, kind: type[Any]) -> Any:
    try:
        return msgspec.convert(_integral_decoder.decode(body), type=kind)
    except msgspec.ValidationError as error:
        message = str(error)
        raise bad_request(field_of_validation_error(message) or "body", message) from None
    except msgspec.DecodeError as error:
        raise bad_request("body", f"malformed JSON: {error}") from None


_NUL_ESCAPE = b"\\u0000"  # the only way JSON text can carry U+0000


def refuse_nul(value: Any, path: str = "") -> None:
    """400 naming the first string (or key) of ``value`` that holds U+0000: PostgreSQL stores no
    such text (neither text nor jsonb), and no name, key or description needs it."""
    if isinstance(value, str):
        if "\x00" in value:
            raise bad_request(path or "body", "text must not contain U+0000 (NUL)")
    elif isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in key:
                raise bad_request(where, "text must not contain U+0000 (NUL)")
            refuse_nul(item, where)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            refuse_nul(item, f"{path}[{index}]")


@dataclass(slots=True)
class Request:
    method: str
    path: str
    params: dict[str, str]
    query: dict[str, str]
    body: bytes
    route: Route

    def decode(self, kind: type[Any]) -> Any:
        if not self.body:
            raise bad_request("body", "a JSON body is required")
        try:
            decoded = msgspec.json.decode(self.body, type=kind)
        except msgspec.ValidationError as error:
            message = str(error)
            if not _FLOAT_FOR_INT.search(message):
                raise bad_request(field_of_validation_error(message) or "body", message) from None
            decoded = _decode_integral_floats(self.body, kind)
        except msgspec.DecodeError as error:
            raise bad_request("body", f"malformed JSON: {error}") from None
        if _NUL_ESCAPE in self.body:  # rare: a byte search keeps the common case free
            refuse_nul(msgspec.json.decode(self.body))
        return decoded

    def expect_no_fields(self) -> None:
        """For endpoints without a body: none, or an empty object; any field is unknown."""
        if not self.body.strip():
            return
        try:
            value = msgspec.json.decode(self.body)
        except msgspec.DecodeError as error:
            raise bad_request("body", f"malformed JSON: {error}") from None
        if not isinstance(value, dict):
            raise bad_request("body", "expected a JSON object")
        if value:
            field = next(iter(value))
            raise bad_request(field, f"unknown field {field!r}: this endpoint takes no fields")


Handler = Callable[[Request], Awaitable[tuple[int, Any]]]


@dataclass(slots=True)
class Route:
    method: str
    template: str
    handler: Handler
    summary: str
    request_type: type[Any] | None = None
    response_type: Any = None
    tag: str = "core"
    segments: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.segments = tuple(self.template.strip("/").split("/"))

    def match(self, parts: list[str]) -> dict[str, str] | None:
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for expected, actual in zip(self.segments, parts, strict=True):
            if expected.startswith("{"):
                if not actual:
                    return None
                params[expected[1:-1]] = actual
            elif expected != actual:
                return None
        return params


class RouteTable:
    def __init__(self, routes: Iterable[Route]) -> None:
        self.routes = list(routes)
        self._by_length: dict[int, list[Route]] = {}
        for route in self.routes:
            self._by_length.setdefault(len(route.segments), []).append(route)

    def resolve(self, method: str, path: str) -> tuple[Route, dict[str, str]]:
        parts = path.strip("/").split("/")
        allowed: list[str] = []
        for route in self._by_length.get(len(parts), ()):
            params = route.match(parts)
            if params is None:
                continue
            if route.method == method:
                return route, params
            allowed.append(route.method)
        if allowed:
            methods = ", ".join(sorted(set(allowed))).encode("ascii")
            raise ApiError(
                405, "method_not_allowed", f"{method} is not allowed on {path}", None, [(b"allow", methods)]
            )
        raise ApiError(404, "not_found", f"no such endpoint: {method} {path}", "path")


async def read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > BODY_BYTES_MAX:
            raise ApiError(413, "body_too_large", f"the body exceeds {BODY_BYTES_MAX} bytes", "body")
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


async def read_body_within(receive: Receive, seconds: float) -> bytes:
    """``read_body``, or 408 when the client has not sent the whole body after ``seconds``."""
    try:
        async with asyncio.timeout(seconds):
            return await read_body(receive)
    except TimeoutError:
        raise ApiError(
            408, BODY_TIMEOUT_CODE, f"the body did not arrive within {seconds:g} s", "body"
        ) from None


async def send_bytes(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    await send({"type": "http.response.start", "status": status, "headers": headers or _JSON_HEADERS})
    await send({"type": "http.response.body", "body": body})


def encode(value: Any) -> bytes:
    return _encoder.encode(value)


def parse_query(raw: bytes) -> dict[str, str]:
    if not raw:
        return {}
    # a blank value is a value (``?layer=`` is not an absent layer): the handler refuses it
    return {
        key: values[-1] for key, values in parse_qs(raw.decode("latin-1"), keep_blank_values=True).items()
    }


async def lifespan(
    receive: Receive,
    send: Send,
    startup: Callable[[], Awaitable[None]],
    shutdown: Callable[[], Awaitable[None]],
) -> None:
    """The ASGI lifespan protocol around a startup and a shutdown step."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            try:
                await startup()
            except Exception as error:  # reported to the server, which exits
                await send({"type": "lifespan.startup.failed", "message": repr(error)})
                return
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await shutdown()
            await send({"type": "lifespan.shutdown.complete"})
            return


Observer = Callable[[Route | None, int, float], None]


class JsonApp:
    """The ASGI callable: resolves, decodes, calls the handler, encodes; errors as the contract says."""

    def __init__(
        self,
        routes: RouteTable,
        observe: Observer | None = None,
        on_error: Callable[[Exception], ApiError | None] | None = None,
        access: AccessControl | None = None,
        limits: ServeLimits | None = None,
    ) -> None:
        self.routes = routes
        self.observe = observe
        limits = limits or ServeLimits()
        self.admission = Admission(limits)
        self.body_timeout_s = limits.body_read_timeout_ms / 1000
        # the bearer tokens (None only for a bare JsonApp in a unit test: the app server always has one)
        self.access = access
        # turns an exception a handler let through into the answer it stands for (a database
        # that went away mid-request is a 503, not a 500); None: it is a bug, let it be a 500
        self.on_error = on_error
        self.startup: list[Callable[[], Awaitable[None]]] = []
        self.shutdown: list[Callable[[], Awaitable[None]]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        async def startup() -> None:
            if self.access is not None:
                await self.access.start()
            for hook in self.startup:
                await hook()

        async def shutdown() -> None:
            for hook in self.shutdown:
                await hook()
            if self.access is not None:
                await self.access.stop()

        await lifespan(receive, send, startup, shutdown)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = self.admission.enter(scope)
        if client is None:
            await send_bytes(send, 503, SHED_BODY, [*_JSON_HEADERS, (b"retry-after", b"1")])
            if self.observe is not None:
                self.observe(None, 503, 0.0)
            return
        try:
            await self._admitted(scope, receive, send)
        finally:
            self.admission.leave(client)

    async def _admitted(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.perf_counter()
        route: Route | None = None
        if self.access is not None:
            refused = self.access.check(scope["method"], scope["path"], scope.get("headers", ()))
            if refused is not None:
                # before the route is resolved (no hint of what exists) and the body read
                await send_bytes(send, refused.status, refused.body(), _JSON_HEADERS + refused.headers())
                if self.observe is not None:
                    self.observe(None, refused.status, time.perf_counter() - started)
                return
        try:
            route, params = self.routes.resolve(scope["method"], scope["path"])
            body = await read_body_within(receive, self.body_timeout_s)
            request = Request(
                scope["method"],
                scope["path"],
                params,
                parse_query(scope.get("query_string", b"")),
                body,
                route,
            )
            status, payload = await route.handler(request)
            data = payload if isinstance(payload, bytes) else encode(payload)
            headers = _JSON_HEADERS
            if isinstance(payload, RawText):
                headers = [(b"content-type", payload.content_type)]
                data = payload.data
        except ApiError as error:
            status, data, headers = error.status, encode(error.body()), _JSON_HEADERS + error.headers
        except Exception as error:
            mapped = self.on_error(error) if self.on_error is not None else None
            if mapped is None:
                raise
            status, data, headers = mapped.status, encode(mapped.body()), _JSON_HEADERS
        await send_bytes(send, status, data, headers)
        if self.observe is not None:
            self.observe(route, status, time.perf_counter() - started)


class RawText(bytes):
    """A non-JSON response body (Prometheus text)."""

    content_type: bytes = b"text/plain; version=0.0.4; charset=utf-8"

    @property
    def data(self) -> bytes:
        return bytes(self)
