"""A lean HTTP/1.1 server for ASGI apps on the event loop (uvloop) of this one process and thread.

Owns: accepting connections, parsing request heads (bounded by ``HEAD_BYTES_MAX``) and bodies
(Content-Length or chunked, bounded by ``BODY_BYTES_MAX``), keep-alive, calling the ASGI app with
an ``http`` scope and running its lifespan, writing each answer with a Content-Length, closing
connections idle for ``IDLE_SECONDS_MAX``, and a graceful stop (requests in flight finish, at
most ``STOP_SECONDS_MAX``).

Why not granian (used before): granian serves from Rust threads and hands every request to the
Python event loop across threads (a wake-up and a context switch each way). At the rates of a
cell (hundreds to a few thousand requests per second, not the tens of thousands where those
wake-ups batch) that hand-off cost more than the app: a do-nothing app cost 150-430 us of CPU
per request on granian at 300-800 requests/s on this 2-core machine (README, performance).

Never: fork or start threads (the runtime counts and signals the server by its PID), read a
request without a bound, log a request body or target (either may hold a card number), or let one
request's failure close other connections.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import unquote_to_bytes

log = logging.getLogger("cardcore.httpserver")

HEAD_BYTES_MAX = 64 * 1024
BODY_BYTES_MAX = 1024 * 1024
IDLE_SECONDS_MAX = 60.0
SWEEP_SECONDS = 5.0
STOP_SECONDS_MAX = 10.0
LIFESPAN_SECONDS_MAX = 120.0
BACKLOG = 2048

Message = dict[str, Any]
App = Callable[
    [dict[str, Any], Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]], Awaitable[None]
]

_REASONS = {
    200: b"OK",
    201: b"Created",
    204: b"No Content",
    400: b"Bad Request",
    401: b"Unauthorized",
    403: b"Forbidden",
    404: b"Not Found",
    405: b"Method Not Allowed",
    409: b"Conflict",
    413: b"Content Too Large",
    422: b"Unprocessable Content",
    431: b"Request Header Fields Too Large",
    500: b"Internal Server Error",
    501: b"Not Implemented",
    502: b"Bad Gateway",
    503: b"Service Unavailable",
    504: b"Gateway Timeout",
    505: b"HTTP Version Not Supported",
}
_STATUS_LINES: dict[int, bytes] = {}
_ASGI = {"version": "3.0", "spec_version": "2.3"}
_SKIPPED_HEADERS = frozenset({b"content-length", b"connection", b"transfer-encoding"})
_INTERNAL = b'{"error":{"code":"internal","message":"internal error","field":null}}'


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = _STATUS_LINES[status] = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS.get(status, b"Status"))
    return line


def _path_of(raw: bytes) -> str:
    if b"%" not in raw:
        return raw.decode("latin-1")
    return unquote_to_bytes(raw).decode("utf-8", "replace")


class _BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error_bytes(status: int, message: str) -> bytes:
    body = b'{"error":{"code":"bad_http","message":"%s","field":null}}' % message.encode("ascii", "replace")
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return _status_line(status) + head + body


class _Request:
    __slots__ = ("body", "headers", "keep_alive", "method", "query", "raw_path", "version")

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        body: bytes,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.body = body


class _Response:
    """What the app sent, gathered: written in one piece with a Content-Length."""

    __slots__ = ("chunks", "headers", "started", "status")

    def __init__(self) -> None:
        self.status = 500
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []
        self.started = False

    async def send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.status = int(message["status"])
            self.headers = list(message.get("headers", ()))
            self.started = True
        elif kind == "http.response.body":
            chunk = message.get("body", b"")
            if chunk:
                self.chunks.append(chunk)


def _parse(buffer: bytearray) -> _Request | None:
    """The first complete request in ``buffer`` (removed from it), or None while incomplete."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        if len(buffer) > HEAD_BYTES_MAX:
            raise _BadRequest(431, "request head too large")
        return None
    if end > HEAD_BYTES_MAX:
        raise _BadRequest(431, "request head too large")
    lines = bytes(buffer[:end]).split(b"\r\n")
    request_line = lines[0].split(b" ")
    if len(request_line) != 3:
        raise _BadRequest(400, "malformed request line")
    method, target, version = request_line
    if version == b"HTTP/1.1":
        keep_alive = True
    elif version == b"HTTP/1.0":
        keep_alive = False
    else:
        raise _BadRequest(505 if version.startswith(b"HTTP/") else 400, "unsupported HTTP version")
    headers: list[tuple[bytes, bytes]] = []
    length = -1
    chunked = False
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name[-1:] in (b" ", b"\t"):
            raise _BadRequest(400, "malformed header line")
        name = name.lower()
        value = value.strip()
        if name == b"content-length":
            if not value.isdigit() or (length >= 0 and int(value) != length):
                raise _BadRequest(400, "invalid content-length")
            length = int(value)
        elif name == b"transfer-encoding":
            if value.lower() != b"chunked":
                raise _BadRequest(501, "only the chunked transfer-encoding is supported")
            chunked = True
        elif name == b"connection":
            token = value.lower()
            if b"close" in token:
                keep_alive = False
            elif b"keep-alive" in token:
                keep_alive = True
        headers.append((name, value))
    if chunked and length >= 0:
        raise _BadRequest(400, "both content-length and transfer-encoding")
    start = end + 4
    if chunked:
        parsed = _dechunk(buffer, start)
        if parsed is None:
            return None
        body, consumed = parsed
    else:
        length = max(length, 0)
        if length > BODY_BYTES_MAX:
            raise _BadRequest(413, "request body too large")
        if len(buffer) - start < length:
            return None
        body = bytes(buffer[start : start + length])
        consumed = start + length
    del buffer[:consumed]
    raw_path, _, query = target.partition(b"?")
    return _Request(
        method.decode("ascii", "replace"),
        raw_path,
        query,
        "1.1" if version == b"HTTP/1.1" else "1.0",
        headers,
        keep_alive,
        body,
    )


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """The body of a chunked request from ``start`` and the bytes it took (trailers included);
    None while incomplete."""
    parts: list[bytes] = []
    size_total = 0
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            if len(buffer) - at > 1024:
                raise _BadRequest(400, "malformed chunk size")
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _BadRequest(400, "malformed chunk size") from None
        if size < 0:
            raise _BadRequest(400, "malformed chunk size")
        at = line_end + 2
        if size == 0:
            while True:  # trailers, ignored, up to the empty line
                trailer_end = buffer.find(b"\r\n", at)
                if trailer_end < 0:
                    if len(buffer) - at > HEAD_BYTES_MAX:
                        raise _BadRequest(431, "trailers too large")
                    return None
                if trailer_end == at:
                    return b"".join(parts), trailer_end + 2
                at = trailer_end + 2
        size_total += size
        if size_total > BODY_BYTES_MAX:
            raise _BadRequest(413, "request body too large")
        if len(buffer) < at + size + 2:
            return None
        if buffer[at + size : at + size + 2] != b"\r\n":
            raise _BadRequest(400, "chunk not terminated by CRLF")
        parts.append(bytes(buffer[at : at + size]))
        at += size + 2


class HttpProtocol(asyncio.Protocol):
    """One client connection: requests are answered one at a time, in order (pipelined ones
    wait in the buffer; reading pauses while it holds more than a request's bound)."""

    def __init__(self, server: Server) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.busy = False
        self.closing = False
        self.paused = False
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        self.last_active = time.monotonic()
        if len(self.buffer) > HEAD_BYTES_MAX + BODY_BYTES_MAX and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        if not self.busy:
            self._next()

    def eof_received(self) -> bool | None:
        if not self.busy and self.transport is not None:
            self.transport.close()
        return True  # half-closed: an answer in progress is still written

    def _next(self) -> None:
        if self.closing or self.transport is None:
            return
        try:
            request = _parse(self.buffer)
        except _BadRequest as error:
            self._fail(error.status, str(error))
            return
        if request is None:
            if self.paused:
                self.transport.resume_reading()
                self.paused = False
            return
        self.busy = True
        self.server.loop.create_task(self._answer(request))

    async def _answer(self, request: _Request) -> None:
        server = self.server
        response = _Response()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": request.body, "more_body": False}
            await server.stopped.wait()  # nothing more comes for this request
            return {"type": "http.disconnect"}

        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": request.version,
            "method": request.method,
            "scheme": "http",
            "path": _path_of(request.raw_path),
            "raw_path": request.raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "server": server.address,
            "client": None,
        }
        server.in_flight += 1
        try:
            await server.app(scope, receive, response.send)
        except Exception:
            log.exception("the app failed on a %s request", request.method)
            response = _Response()
            response.headers = [(b"content-type", b"application/json")]
            response.chunks = [_INTERNAL]
        finally:
            server.in_flight -= 1
            if not server.in_flight:
                server.drained.set()
        if not response.started:
            response.status = 500
            response.headers = [(b"content-type", b"application/json")]
            response.chunks = [_INTERNAL]
        keep_alive = request.keep_alive and not server.stopping
        self._write(response, keep_alive, request.method == "HEAD")
        self.busy = False
        if not keep_alive:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
        elif self.buffer:
            self._next()
        elif self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False

    def _write(self, response: _Response, keep_alive: bool, head_only: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        chunks = response.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        parts = [_status_line(response.status)]
        for name, value in response.headers:
            if name.lower() not in _SKIPPED_HEADERS:
                parts.append(b"%s: %s\r\n" % (name, value))
        parts.append(
            b"content-length: %d\r\n\r\n" % len(body)
            if keep_alive
            else b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body)
        )
        if not head_only:
            parts.append(body)
        transport.write(b"".join(parts))
        self.last_active = time.monotonic()

    def _fail(self, status: int, message: str) -> None:
        self.closing = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.write(_error_bytes(status, message))
            self.transport.close()


class Server:
    """Serves one ASGI app on host:port until ``stop``."""

    def __init__(self, app: App, host: str, port: int) -> None:
        self.app = app
        self.address = (host, port)
        self.connections: set[HttpProtocol] = set()
        self.in_flight = 0
        self.stopping = False
        self.stopped = asyncio.Event()
        self.drained = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self._to_app: asyncio.Queue[Message] = asyncio.Queue(maxsize=4)
        self._from_app: asyncio.Queue[Message] = asyncio.Queue(maxsize=4)

    async def _lifespan_step(self, message_type: str) -> None:
        await self._to_app.put({"type": message_type})
        answer = await asyncio.wait_for(self._from_app.get(), timeout=LIFESPAN_SECONDS_MAX)
        if answer["type"].endswith(".failed"):
            raise RuntimeError(f"{message_type} failed: {answer.get('message', '')}")

    async def _run_lifespan(self) -> None:
        async def receive() -> Message:
            return await self._to_app.get()

        async def send(message: Message) -> None:
            await self._from_app.put(message)

        try:
            await self.app({"type": "lifespan", "asgi": _ASGI}, receive, send)
        except Exception as error:
            log.exception("the app's lifespan failed")
            await self._from_app.put({"type": "lifespan.startup.failed", "message": repr(error)})

    def stop(self) -> None:
        self.stopping = True
        self.stopped.set()

    async def serve(self) -> None:
        lifespan = self.loop.create_task(self._run_lifespan())
        await self._lifespan_step("lifespan.startup")
        listener = await self.loop.create_server(
            lambda: HttpProtocol(self), self.address[0], self.address[1], backlog=BACKLOG, reuse_address=True
        )
        log.info("listening on http://%s:%d", self.address[0], self.address[1])
        sweeper = self.loop.create_task(self._sweep())
        try:
            await self.stopped.wait()
        finally:
            listener.close()
            sweeper.cancel()
            for conn in list(self.connections):
                if not conn.busy and conn.transport is not None:
                    conn.transport.close()
            if self.in_flight:
                self.drained.clear()
                try:
                    await asyncio.wait_for(self.drained.wait(), timeout=STOP_SECONDS_MAX)
                except TimeoutError:
                    log.warning("stopping with %d requests still in flight", self.in_flight)
            for conn in list(self.connections):
                if conn.transport is not None:
                    conn.transport.close()
            try:
                await self._lifespan_step("lifespan.shutdown")
            except (RuntimeError, TimeoutError):
                log.warning("the app's shutdown did not complete")
            lifespan.cancel()

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(SWEEP_SECONDS)
            now = time.monotonic()
            for conn in list(self.connections):
                if not conn.busy and now - conn.last_active > IDLE_SECONDS_MAX and conn.transport is not None:
                    conn.transport.close()


def run(app: App, host: str, port: int) -> None:
    """Serve ``app`` on host:port on uvloop until SIGTERM or SIGINT."""

    async def main() -> None:
        server = Server(app, host, port)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
