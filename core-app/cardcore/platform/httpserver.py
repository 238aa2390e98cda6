"""A lean HTTP/1.1 server for ASGI apps on the event loop (uvloop) of this one process and thread.

Owns: accepting connections (at most ``connections_max`` open: beyond it the server stops
accepting and new ones wait in the kernel's backlog until one closes, as granian's permits do;
at most ``connections_per_client_max`` from one client address: beyond it a new one is answered
503 and closed at once, so one address cannot hold the whole total),
parsing request heads (bounded by ``HEAD_BYTES_MAX``) and bodies (Content-Length or chunked,
bounded by ``BODY_BYTES_MAX``), keep-alive, calling the ASGI app with an ``http`` scope as soon
as a head has arrived (the body follows through ``receive``; the app bounds that wait: its body
deadline and its admission see a request whose body is slow) and running its lifespan, writing
each answer with a Content-Length, closing a connection whose next request's head has not all
arrived within the header read time after the last answer (or after it connected): this bounds
a client that never finishes its headers and is also the idle keep-alive timeout, as granian's
``header_read_timeout`` is; and a graceful stop (requests in flight finish, at most
``STOP_SECONDS_MAX``). With ``tls`` it also listens with TLS on a second port of the same host
(cardcore.platform.tls): both listeners share the bounds, and a TLS handshake must complete
within the header read time.

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
import errno
import logging
import signal
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any
from urllib.parse import unquote_to_bytes

log = logging.getLogger("cardcore.httpserver")

HEAD_BYTES_MAX = 64 * 1024
BODY_BYTES_MAX = 1024 * 1024
CONNECTIONS_MAX = 8192
CONNECTIONS_PER_CLIENT_MAX = 1024
# what a connection beyond its address's bound is told before it is closed (best effort: a fresh
# socket's send buffer takes it whole)
_REFUSED_BODY = (
    b'{"error":{"code":"overloaded","message":"too many connections from this address","field":null}}'
)
REFUSED_PER_CLIENT = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(_REFUSED_BODY), _REFUSED_BODY)
)
REFUSED_LOG_EVERY_S = 10.0
# a connection whose next request's head has not all arrived this long after the last answer (or
# after it connected) is closed: a client that never finishes its headers, or an idle one
# (ServeLimits.header_read_timeout_ms in the servers, granian's header_read_timeout)
HEADER_READ_TIMEOUT_S = 15.0
SWEEP_SECONDS = 1.0
ACCEPTS_PER_WAKE_MAX = 64  # connections accepted per readiness of the listener (others wait)
ACCEPT_RETRY_S = 0.5  # out of file descriptors: accepting pauses this long
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
    """The contract's error body; a body over the bound is named as the apps name it."""
    text = message.encode("ascii", "replace")
    if status == 413:
        body = b'{"error":{"code":"body_too_large","message":"%s","field":"body"}}' % text
    else:
        body = b'{"error":{"code":"bad_http","message":"%s","field":null}}' % text
    head = b"content-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n" % len(body)
    return _status_line(status) + head + body


class _Request:
    """One request: its head, and its body once all of it arrived (``body`` None until then)."""

    __slots__ = (
        "body",
        "body_waiter",
        "chunks",
        "gone",
        "headers",
        "keep_alive",
        "length",
        "method",
        "query",
        "raw_path",
        "version",
    )

    def __init__(
        self,
        method: str,
        raw_path: bytes,
        query: bytes,
        version: str,
        headers: list[tuple[bytes, bytes]],
        keep_alive: bool,
        length: int,
    ) -> None:
        self.method = method
        self.raw_path = raw_path
        self.query = query
        self.version = version
        self.headers = headers
        self.keep_alive = keep_alive
        self.length = length  # -1: chunked
        self.body: bytes | None = b"" if length == 0 else None
        self.body_waiter: asyncio.Future[bytes | None] | None = None
        self.chunks = _Chunks() if length < 0 else None
        self.gone = False  # the client closed before all of the body arrived: it never will

    def end_body(self) -> None:
        """No more of the body can come: ``receive`` answers a disconnect."""
        if self.body is None:
            self.gone = True
            if self.body_waiter is not None and not self.body_waiter.done():
                self.body_waiter.set_result(None)


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


def _parse_head(buffer: bytearray, scanned: int = 0) -> _Request | None:
    """The head of the first request in ``buffer`` (removed from it), or None while incomplete
    (``scanned``: bytes already searched for its end, so a head that trickles in is not searched
    again from its start on every read). Its body stays in the buffer: ``_Request.length``
    bytes, or chunked (``length`` -1)."""
    end = buffer.find(b"\r\n\r\n", max(0, scanned - 3))
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
    if length > BODY_BYTES_MAX:
        raise _BadRequest(413, "request body too large")
    del buffer[: end + 4]
    raw_path, _, query = target.partition(b"?")
    return _Request(
        method.decode("ascii", "replace"),
        raw_path,
        query,
        "1.1" if version == b"HTTP/1.1" else "1.0",
        headers,
        keep_alive,
        -1 if chunked else max(length, 0),
    )


class _Chunks:
    """A chunked body being received: the chunks whole so far (taken out of the buffer as each
    completes, so a body that trickles in is parsed once, not again on every read)."""

    __slots__ = ("parts", "size_total")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size_total = 0

    def take(self, buffer: bytearray) -> bytes | None:
        """Consume the complete chunks at the start of ``buffer``; the whole body once the last
        chunk and the trailers arrived, else None."""
        while True:
            line_end = buffer.find(b"\r\n")
            if line_end < 0:
                if len(buffer) > 1024:
                    raise _BadRequest(400, "malformed chunk size")
                return None
            try:
                size = int(bytes(buffer[:line_end]).split(b";", 1)[0].strip(), 16)
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
                        del buffer[: trailer_end + 2]
                        return b"".join(self.parts)
                    at = trailer_end + 2
            if self.size_total + size > BODY_BYTES_MAX:
                raise _BadRequest(413, "request body too large")
            if len(buffer) < at + size + 2:
                return None
            if buffer[at + size : at + size + 2] != b"\r\n":
                raise _BadRequest(400, "chunk not terminated by CRLF")
            self.parts.append(bytes(buffer[at : at + size]))
            self.size_total += size
            del buffer[: at + size + 2]


class HttpProtocol(asyncio.Protocol):
    """One client connection. The app is called as soon as a request's head has arrived (so its
    admission and its body deadline see a request whose body is slow); the body is handed over
    by ``receive`` once all of it arrived. Requests are answered one at a time, in order."""

    def __init__(self, server: Server, client_address: str = "", scheme: str = "http") -> None:
        self.server = server
        self.client_address = client_address  # what the server counts it under
        self.scheme = scheme
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.buffer = bytearray()
        self.scanned = 0  # bytes at the start of the buffer searched for a head's end
        self.current: _Request | None = None
        self.closing = False
        self.paused = False
        # connected, or the last answer written: the next head must have arrived within the
        # header read time after it
        self.last_active = time.monotonic()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport
        peer = transport.get_extra_info("peername")
        self.client = (str(peer[0]), int(peer[1])) if isinstance(peer, tuple) and len(peer) >= 2 else None
        self.last_active = time.monotonic()
        self.server.connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self.server.released(self.client_address)
        self.transport = None
        if self.current is not None:
            self.current.end_body()  # the app hears a disconnect

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if len(self.buffer) > HEAD_BYTES_MAX + BODY_BYTES_MAX and self.transport is not None:
            self.transport.pause_reading()
            self.paused = True
        if self.current is None:
            self._next()
        elif self.current.body is None:
            self._take_body(self.current)

    def eof_received(self) -> bool | None:
        if self.current is None:
            if self.transport is not None:
                self.transport.close()
        else:
            self.current.end_body()  # a body still incomplete will never be: the app hears so
        # half-closed: an answer in progress is still written. TLS has no half-close (the
        # transport closes itself, and warns at every close when told otherwise)
        return self.scheme == "http"

    def _next(self) -> None:
        """Start the next request whose head is complete in the buffer."""
        if self.closing or self.transport is None:
            return
        try:
            request = _parse_head(self.buffer, self.scanned)
        except _BadRequest as error:
            self._fail(error.status, str(error))
            return
        if request is None:
            self.scanned = len(self.buffer)
            self._resume()
            return
        self.scanned = 0
        self.current = request
        if request.body is None:
            self._take_body(request)
        self.server.spawn(self._answer(request))

    def _take_body(self, request: _Request) -> None:
        """Move the body out of the buffer once all of it arrived; wake ``receive``."""
        buffer = self.buffer
        try:
            if request.chunks is None:
                if len(buffer) < request.length:
                    self._resume()
                    return
                body: bytes | None = bytes(buffer[: request.length])
                del buffer[: request.length]
            else:
                body = request.chunks.take(buffer)
                if body is None:
                    self._resume()
                    return
        except _BadRequest as error:
            self._fail(error.status, str(error))
            request.end_body()
            return
        request.body = body
        request.chunks = None
        if request.body_waiter is not None and not request.body_waiter.done():
            request.body_waiter.set_result(body)

    def _resume(self) -> None:
        if self.paused and self.transport is not None:
            self.transport.resume_reading()
            self.paused = False

    async def _answer(self, request: _Request) -> None:
        server = self.server
        response = _Response()
        delivered = False

        async def receive() -> Message:
            nonlocal delivered
            if not delivered:
                body = request.body
                if body is None and not request.gone:
                    if request.body_waiter is None:
                        request.body_waiter = server.loop.create_future()
                    body = await request.body_waiter  # the app bounds this wait (its body deadline)
                if body is not None:
                    delivered = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return {"type": "http.disconnect"}
            await server.stopped.wait()  # nothing more comes for this request
            return {"type": "http.disconnect"}

        scope = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": request.version,
            "method": request.method,
            "scheme": self.scheme,
            "path": _path_of(request.raw_path),
            "raw_path": request.raw_path,
            "query_string": request.query,
            "root_path": "",
            "headers": request.headers,
            "server": server.address,
            "client": self.client,
        }
        server.in_flight += 1
        try:
            await server.app(scope, receive, response.send)
        except Exception:
            log.exception("the app failed on a %s request", request.method)
            response = _Response()
            response.started = True
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
        # a body the app answered without (a timeout, a rejection) may still be on its way: the
        # connection cannot be read past it safely, so it closes after this answer
        keep_alive = request.keep_alive and request.body is not None and not server.stopping
        self._write(response, keep_alive, request.method == "HEAD")
        self.current = None
        if not keep_alive:
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return
        if self.buffer:
            self._next()
        else:
            self._resume()

    def _write(self, response: _Response, keep_alive: bool, head_only: bool) -> None:
        transport = self.transport
        self.last_active = time.monotonic()
        if transport is None or transport.is_closing():
            return
        chunks = response.chunks
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        parts = [_status_line(response.status)]
        for name, value in response.headers:
            if name.lower() not in _SKIPPED_HEADERS:
                parts.append(b"%s: %s\r\n" % (name, value))
        if keep_alive:
            parts.append(b"content-length: %d\r\n\r\n" % len(body))
        else:
            parts.append(b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body))
        if not head_only:
            parts.append(body)
        transport.write(b"".join(parts))

    def _fail(self, status: int, message: str) -> None:
        self.closing = True
        self.buffer.clear()
        if self.transport is not None:
            self.transport.write(_error_bytes(status, message))
            self.transport.close()

    def expired(self, now: float, header_read_timeout_s: float) -> bool:
        """No request in progress, and the next one's head not all there within the header read
        time after the last answer (or the connection): a head never finished, or idle."""
        if self.current is not None:
            return False  # the app bounds its own waits (its body deadline)
        return now - self.last_active > header_read_timeout_s


class Server:
    """Serves one ASGI app on host:port until ``stop``."""

    def __init__(
        self,
        app: App,
        host: str,
        port: int,
        connections_max: int = CONNECTIONS_MAX,
        header_read_timeout_s: float = HEADER_READ_TIMEOUT_S,
        connections_per_client_max: int = CONNECTIONS_PER_CLIENT_MAX,
        tls: tuple[int, ssl.SSLContext] | None = None,
    ) -> None:
        if connections_max < 1 or header_read_timeout_s <= 0 or connections_per_client_max < 1:
            raise ValueError(
                f"connections_max {connections_max} and connections_per_client_max "
                f"{connections_per_client_max} must be >= 1, header_read_timeout_s "
                f"{header_read_timeout_s} > 0"
            )
        self.app = app
        self.address = (host, port)
        self.connections_max = connections_max
        # open connections per client address: one address cannot take the whole total
        self.connections_per_client_max = connections_per_client_max
        self.by_client: dict[str, int] = {}
        self.refused_per_client = 0
        self._refused_logged_at = 0.0
        self.header_read_timeout_s = header_read_timeout_s
        self.connections: set[HttpProtocol] = set()
        self.open = 0  # connections accepted and not yet closed (adopted by a protocol or not)
        self.accepting = False
        self.in_flight = 0
        self.stopping = False
        self.stopped = asyncio.Event()
        self.drained = asyncio.Event()
        self.loop = asyncio.get_running_loop()
        self.tls = tls  # (port, context): the TLS listener beside the clear one
        # each listener with its TLS context (None: in clear)
        self._listeners: list[tuple[socket.socket, ssl.SSLContext | None]] = []
        # the tasks running (the loop keeps only weak references to tasks)
        self._tasks: set[asyncio.Task[None]] = set()
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

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        """Run ``work`` as a task held until it ends."""
        task = self.loop.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- accepting, at most connections_max open ------------------------------------------------

    def _listen(self, port: int) -> socket.socket:
        host = self.address[0]
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        listener = socket.socket(family, kind, proto)
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(address)
            listener.listen(BACKLOG)
            listener.setblocking(False)
        except OSError:
            listener.close()
            raise
        return listener

    def _start_accepting(self) -> None:
        if not self.accepting and not self.stopping and self._listeners:
            for listener, context in self._listeners:
                self.loop.add_reader(listener.fileno(), self._accept, listener, context)
            self.accepting = True

    def _stop_accepting(self) -> None:
        if self.accepting:
            for listener, _ in self._listeners:
                self.loop.remove_reader(listener.fileno())
        self.accepting = False

    def _accept(self, listener: socket.socket, context: ssl.SSLContext | None) -> None:
        """Accept what waits, up to the bound; at the bound, stop listening for more (they wait
        in the kernel's backlog, then are refused by it) until a connection closes."""
        for _ in range(ACCEPTS_PER_WAKE_MAX):
            if self.open >= self.connections_max:
                self._stop_accepting()
                return
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as error:
                if error.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    raise
                log.warning("cannot accept a connection (%s): pausing %.1f s", error.strerror, ACCEPT_RETRY_S)
                self._stop_accepting()
                self.loop.call_later(ACCEPT_RETRY_S, self._start_accepting)
                return
            client = str(peer[0]) if isinstance(peer, tuple) and peer else ""
            if self.by_client.get(client, 0) >= self.connections_per_client_max:
                self._refuse(conn, client, tell=context is None)
                continue
            self.by_client[client] = self.by_client.get(client, 0) + 1
            self.open += 1
            try:
                conn.setblocking(False)
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                conn.close()
                self.released(client)
                continue
            self.spawn(self._adopt(conn, client, context))

    def _refuse(self, conn: socket.socket, client: str, tell: bool = True) -> None:
        """A connection beyond its address's bound: told so (503, Retry-After; in clear only: a
        TLS client is closed without an answer) and closed at once, before anything of it is read;
        the connections of other addresses are not touched."""
        self.refused_per_client += 1
        try:
            conn.setblocking(False)
            if tell:
                conn.send(REFUSED_PER_CLIENT)
        except OSError:
            pass
        finally:
            conn.close()
        now = time.monotonic()
        if now - self._refused_logged_at >= REFUSED_LOG_EVERY_S:
            self._refused_logged_at = now
            log.warning(
                "client %s holds %d connections, the most one address may: refusing more (%d so far)",
                client,
                self.connections_per_client_max,
                self.refused_per_client,
            )

    async def _adopt(self, conn: socket.socket, client: str, context: ssl.SSLContext | None) -> None:
        scheme = "http" if context is None else "https"
        # a TLS client that never completes its handshake is dropped as one that never sends its
        # headers (the protocol, and so the sweeper, sees a connection only once it completed)
        tls: dict[str, Any] = (
            {} if context is None else {"ssl": context, "ssl_handshake_timeout": self.header_read_timeout_s}
        )
        try:
            await self.loop.connect_accepted_socket(lambda: HttpProtocol(self, client, scheme), conn, **tls)
        except OSError:  # the client went away before it was adopted, or its handshake failed
            conn.close()
            self.released(client)

    def released(self, client: str) -> None:
        """A connection of ``client`` closed: accept again if a bound had stopped it."""
        left = self.by_client.get(client, 0) - 1
        if left > 0:
            self.by_client[client] = left
        else:
            self.by_client.pop(client, None)
        self.open -= 1
        if not self.accepting and self.open < self.connections_max:
            self._start_accepting()

    async def serve(self) -> None:
        lifespan = self.loop.create_task(self._run_lifespan())
        await self._lifespan_step("lifespan.startup")
        self._listeners = [(self._listen(self.address[1]), None)]
        log.info("listening on http://%s:%d", self.address[0], self.address[1])
        if self.tls is not None:
            try:
                self._listeners.append((self._listen(self.tls[0]), self.tls[1]))
            except OSError:
                self._listeners[0][0].close()
                raise
            log.info("listening on https://%s:%d (TLS)", self.address[0], self.tls[0])
        self._start_accepting()
        sweeper = self.loop.create_task(self._sweep())
        try:
            await self.stopped.wait()
        finally:
            self._stop_accepting()
            for listener, _ in self._listeners:
                listener.close()
            sweeper.cancel()
            for conn in list(self.connections):
                if conn.current is None and conn.transport is not None:
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
        """Close connections whose next request's head has not all arrived within the header read
        time (a client that never finishes its headers, or an idle one)."""
        interval_s = min(SWEEP_SECONDS, self.header_read_timeout_s / 4)
        while True:
            await asyncio.sleep(interval_s)
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.transport is not None and conn.expired(now, self.header_read_timeout_s):
                    conn.closing = True
                    conn.transport.close()


def run(
    app: App,
    host: str,
    port: int,
    connections_max: int = CONNECTIONS_MAX,
    header_read_timeout_s: float = HEADER_READ_TIMEOUT_S,
    connections_per_client_max: int = CONNECTIONS_PER_CLIENT_MAX,
    tls: tuple[int, ssl.SSLContext] | None = None,
) -> None:
    """Serve ``app`` on host:port (and with ``tls`` on its port too) on uvloop until SIGTERM or
    SIGINT."""
    run_until_signalled(
        lambda: Server(
            app, host, port, connections_max, header_read_timeout_s, connections_per_client_max, tls
        )
    )


def run_until_signalled(make_server: Callable[[], Any]) -> None:
    """Run the server ``make_server`` builds on the event loop (anything with ``serve()`` and
    ``stop()``: this module's, or granian's embedded one) on uvloop until SIGTERM or SIGINT."""

    async def main() -> None:
        server = make_server()
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
