"""A minimal asyncio HTTP/1.1 client with a bounded keep-alive pool per upstream base URL.

Owns: connecting (bounded by a connect timeout), writing one request, reading the status line,
headers (at most ``HEADER_BYTES_MAX``) and a Content-Length, chunked or read-to-close body, and
keeping the connection when HTTP/1.1 allows it. Every wait is bounded by the request deadline.
Each connection is an ``asyncio.Protocol`` that parses the answer as its bytes arrive: a request
is one write and one wake-up (no stream reader, no timeout context per request).
Never: resend anything itself (the caller decides, knowing what was sent), log bodies, or use more
than ``size_max`` connections per upstream.

Errors say how far the request got:
- ``UpstreamConnectError``: nothing was sent (connection refused, connect timed out).
- ``UpstreamTimeout``: the deadline passed; ``sent`` says whether request bytes were written.
- ``UpstreamProtocolError``: the connection broke or the answer was not HTTP/1.x we understand;
  ``sent`` as above, ``responded`` whether any byte of an answer arrived.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import Any
from urllib.parse import urlsplit

HEADER_BYTES_MAX = 64 * 1024
BODY_BYTES_MAX = 16 * 1024 * 1024
IDLE_SECONDS_MAX = 10.0  # below the servers' keep-alive timeouts: never reuse a connection they are closing


class UpstreamError(Exception):
    sent = False
    responded = False

    def __init__(self, upstream: str, message: str) -> None:
        super().__init__(f"{upstream}: {message}")
        self.upstream = upstream


class UpstreamConnectError(UpstreamError):
    """The connection could not be opened: nothing was sent."""


class UpstreamTimeout(UpstreamError):
    def __init__(self, upstream: str, message: str, sent: bool) -> None:
        super().__init__(upstream, message)
        self.sent = sent


class UpstreamProtocolError(UpstreamError):
    def __init__(self, upstream: str, message: str, sent: bool, responded: bool = False) -> None:
        super().__init__(upstream, message)
        self.sent = sent
        self.responded = responded


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status = status
        self.headers = headers  # lower-case names, in the order received
        self.body = body

    def header(self, name: bytes) -> bytes | None:
        for key, value in self.headers:
            if key == name:
                return value
        return None


class _Broken(Exception):
    """Internal: the response could not be read; the message says why."""

    def __init__(self, message: str, responded: bool) -> None:
        super().__init__(message)
        self.responded = responded


class _Connection(asyncio.Protocol):
    """One keep-alive connection: bytes arrive in ``data_received`` and the answer is parsed there,
    so a request costs one write and one wake-up of the waiting coroutine (no stream reader)."""

    __slots__ = (
        "body_at",
        "buffer",
        "chunked",
        "closed",
        "headers",
        "idle_since",
        "keep",
        "length",
        "no_body",
        "status",
        "transport",
        "waiter",
    )

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.waiter: asyncio.Future[tuple[Response, bool]] | None = None
        self.closed = False
        self.idle_since = 0.0
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.body_at = -1  # where the body starts in the buffer once the head is parsed
        self.length: int | None = None
        self.chunked = False
        self.keep = False
        self.no_body = False

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's TCPTransport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.waiter is not None:
            self._advance()

    def eof_received(self) -> bool | None:
        self.closed = True
        if self.waiter is not None:
            self._advance(eof=True)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.waiter is not None and not self.waiter.done():
            self._advance(eof=True)

    # -- one exchange -------------------------------------------------------------------------

    def usable(self, now: float) -> bool:
        transport = self.transport
        return (
            not self.closed
            and transport is not None
            and not transport.is_closing()
            and not self.buffer  # nothing unasked for arrived while idle
            and now - self.idle_since < IDLE_SECONDS_MAX
        )

    def send(self, data: bytes, head_only: bool, waiter: asyncio.Future[tuple[Response, bool]]) -> None:
        self._reset()
        self.no_body = head_only
        self.waiter = waiter
        assert self.transport is not None
        self.transport.write(data)

    def _finish(self, response: Response | None, error: BaseException | None = None) -> None:
        waiter, self.waiter = self.waiter, None
        if waiter is None or waiter.done():
            return
        if error is not None:
            waiter.set_exception(error)
        else:
            assert response is not None
            waiter.set_result((response, self.keep))

    def _advance(self, eof: bool = False) -> None:
        """Parse what arrived; resolve the waiter once the answer is complete or broken."""
        try:
            response = self._parse(eof)
        except _Broken as error:
            self.closed = True
            self._finish(None, error)
            return
        if response is not None:
            self._finish(response)
        elif eof:
            self._finish(
                None, _Broken("connection closed before a complete response head", bool(self.buffer))
            )

    def _parse(self, eof: bool) -> Response | None:
        buffer = self.buffer
        if self.body_at < 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                if len(buffer) > HEADER_BYTES_MAX:
                    raise _Broken(f"response head exceeds {HEADER_BYTES_MAX} bytes", True)
                return None
            self._parse_head(bytes(buffer[:end]))
            self.body_at = end + 4
        start = self.body_at
        if self.no_body:
            body = b""
            consumed = start
        elif self.chunked:
            parsed = _dechunk(buffer, start)
            if parsed is None:
                if eof:
                    raise _Broken("connection closed in the middle of the body", True)
                return None
            body, consumed = parsed
        elif self.length is not None:
            if len(buffer) - start < self.length:
                if eof:
                    raise _Broken("connection closed in the middle of the body", True)
                return None
            consumed = start + self.length
            body = bytes(buffer[start:consumed])
        else:  # read to close
            if len(buffer) - start > BODY_BYTES_MAX:
                raise _Broken("malformed chunked body", True)
            if not eof:
                return None
            consumed = len(buffer)
            body = bytes(buffer[start:])
            self.keep = False
        del buffer[:consumed]
        self.body_at = -1
        return Response(self.status, self.headers, body)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise _Broken("not an HTTP/1.x status line", True)
        try:
            status = int(status_line[1])
        except ValueError:
            raise _Broken("invalid status code", True) from None
        keep = status_line[0] == b"HTTP/1.1"
        headers: list[tuple[bytes, bytes]] = []
        for line in lines[1:]:
            name, sep, value = line.partition(b":")
            if not sep:
                raise _Broken("malformed header line", True)
            name = name.strip().lower()
            value = value.strip()
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise _Broken("invalid content-length", True) from None
                if length < 0 or length > BODY_BYTES_MAX:
                    raise _Broken("content-length out of bounds", True)
                self.length = length
            elif name == b"transfer-encoding":
                self.chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                token = value.lower()
                if b"close" in token:
                    keep = False
                elif b"keep-alive" in token:
                    keep = True
            headers.append((name, value))
        if status in (204, 304) or 100 <= status < 200:
            self.no_body = True
        self.status = status
        self.headers = headers
        self.keep = keep

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            try:
                self.transport.close()
            except Exception:  # already broken: nothing left to release
                pass


def _dechunk(buffer: bytearray, start: int) -> tuple[bytes, int] | None:
    """A chunked body from ``start`` and the bytes it took (trailers included); None while
    incomplete; raises _Broken when malformed or larger than BODY_BYTES_MAX."""
    parts: list[bytes] = []
    total = 0
    at = start
    while True:
        line_end = buffer.find(b"\r\n", at)
        if line_end < 0:
            if len(buffer) - at > 1024:
                raise _Broken("malformed chunked body", True)
            return None
        try:
            size = int(bytes(buffer[at:line_end]).split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise _Broken("malformed chunked body", True) from None
        at = line_end + 2
        if size == 0:
            while True:  # trailers, ignored
                trailer_end = buffer.find(b"\r\n", at)
                if trailer_end < 0:
                    if len(buffer) - at > HEADER_BYTES_MAX:
                        raise _Broken("malformed chunked body", True)
                    return None
                if trailer_end == at:
                    return b"".join(parts), trailer_end + 2
                at = trailer_end + 2
        total += size
        if size < 0 or total > BODY_BYTES_MAX:
            raise _Broken("malformed chunked body", True)
        if len(buffer) < at + size + 2:
            return None
        if buffer[at + size : at + size + 2] != b"\r\n":
            raise _Broken("malformed chunked body", True)
        parts.append(bytes(buffer[at : at + size]))
        at += size + 2


def parse_base_url(base_url: str) -> tuple[str, int]:
    """``http://host:port`` or ``https://host:port`` -> (host, port); raises ValueError naming
    what is wrong."""
    parts = urlsplit(base_url)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{base_url!r}: only http:// and https:// upstreams are supported")
    if not parts.hostname:
        raise ValueError(f"{base_url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{base_url!r}: must be scheme://host:port without a path")
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ValueError(f"{base_url!r}: invalid port") from None
    return parts.hostname, port


def is_tls(base_url: str) -> bool:
    return urlsplit(base_url).scheme == "https"


class UpstreamPool:
    """Keep-alive connections to one ``http://host:port``, at most ``size_max`` at a time; to an
    ``https://`` one over TLS, verifying the server with ``ssl_context`` for the host dialled (a
    handshake that fails is a connect error: nothing was sent)."""

    def __init__(
        self,
        base_url: str,
        *,
        size_max: int = 64,
        connect_timeout: float = 0.3,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.host, self.port = parse_base_url(self.base_url)
        if is_tls(self.base_url) and ssl_context is None:
            raise ValueError(f"{base_url!r}: an https:// upstream needs a CA to verify it with")
        self.ssl_context = ssl_context if is_tls(self.base_url) else None
        default_port = 443 if self.ssl_context is not None else 80
        host_header = self.host if self.port == default_port else f"{self.host}:{self.port}"
        if ":" in self.host:  # IPv6 literal
            host_header = f"[{self.host}]:{self.port}"
        self._host_header = host_header.encode("ascii")
        self.size_max = size_max
        self.connect_timeout = connect_timeout
        self._idle: deque[_Connection] = deque()
        # a slot is taken for each request; when all are, callers queue here (FIFO)
        self._queued: deque[asyncio.Future[None]] = deque()
        self.in_use = 0
        self.opened = 0

    async def request(
        self,
        method: str,
        target: str,
        body: bytes = b"",
        headers: list[tuple[bytes, bytes]] | None = None,
        seconds: float = 5.0,
    ) -> Response:
        """Send one request and read its answer, within ``seconds`` overall."""
        loop = asyncio.get_running_loop()
        return await self.request_until(method, target, body, headers, loop.time() + seconds)

    async def request_until(
        self,
        method: str,
        target: str,
        body: bytes,
        headers: list[tuple[bytes, bytes]] | None,
        deadline: float,
    ) -> Response:
        """As ``request``, with an absolute ``loop.time()`` deadline."""
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n" % (
            method.encode("ascii"),
            target.encode("latin-1"),
            self._host_header,
        )
        if body or method not in ("GET", "HEAD", "DELETE"):
            head += b"content-length: %d\r\n" % len(body)
        if headers:
            for name, value in headers:
                head += b"%s: %s\r\n" % (name, value)
        data = head + b"\r\n" + body

        loop = asyncio.get_running_loop()
        phase = "pool"
        acquired = False
        conn: _Connection | None = None
        keep = False
        try:
            await self._acquire(loop, deadline)
            acquired = True
            conn = self._take_idle()
            if conn is None:
                phase = "connect"
                conn = await self._connect(loop, deadline)
            phase = "read"
            waiter: asyncio.Future[tuple[Response, bool]] = loop.create_future()
            timer = loop.call_at(deadline, _expire, waiter)
            try:
                conn.send(data, method == "HEAD", waiter)
                response, keep = await waiter
            finally:
                timer.cancel()
            return response
        except TimeoutError:
            raise UpstreamTimeout(
                self.base_url, f"no answer within the deadline ({phase})", phase == "read"
            ) from None
        except _Broken as error:
            raise UpstreamProtocolError(
                self.base_url, str(error), sent=True, responded=error.responded
            ) from None
        except (OSError, RuntimeError) as error:  # reset, broken pipe, transport closed
            raise UpstreamProtocolError(
                self.base_url, f"{type(error).__name__}: {error}", sent=phase == "read"
            ) from None
        finally:
            if conn is not None:
                if keep and not conn.closed:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.waiter = None
                    conn.close()
            if acquired:
                self._release()

    async def _acquire(self, loop: asyncio.AbstractEventLoop, deadline: float) -> None:
        if self.in_use < self.size_max and not self._queued:
            self.in_use += 1
            return
        turn: asyncio.Future[None] = loop.create_future()
        self._queued.append(turn)
        timer = loop.call_at(deadline, _expire, turn)
        try:
            await turn  # _release hands its slot over: in_use already counts this request
        except BaseException:
            if turn.done() and not turn.cancelled() and turn.exception() is None:
                self._release()  # the slot arrived together with the timeout or a cancel
            else:
                try:
                    self._queued.remove(turn)
                except ValueError:
                    pass
            raise
        finally:
            timer.cancel()

    def _release(self) -> None:
        while self._queued:
            turn = self._queued.popleft()
            if not turn.done():
                turn.set_result(None)  # the slot passes on: in_use unchanged
                return
        self.in_use -= 1

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # most recently used first: the warmest connection
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self, loop: asyncio.AbstractEventLoop, deadline: float) -> _Connection:
        seconds = min(self.connect_timeout, max(0.0, deadline - loop.time()))
        try:
            async with asyncio.timeout(seconds):
                _, conn = await loop.create_connection(
                    _Connection,
                    self.host,
                    self.port,
                    ssl=self.ssl_context,
                    server_hostname=self.host if self.ssl_context is not None else None,
                )
        except TimeoutError:
            if seconds < self.connect_timeout:
                raise  # the request's deadline, not the connect timeout
            raise UpstreamConnectError(
                self.base_url, f"connect timed out after {self.connect_timeout * 1000:.0f} ms"
            ) from None
        except OSError as error:
            raise UpstreamConnectError(self.base_url, f"connect failed: {error.strerror or error}") from None
        self.opened += 1
        return conn

    async def close(self) -> None:
        while self._idle:
            self._idle.pop().close()


def _expire(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())
