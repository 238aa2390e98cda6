"""A minimal asyncio HTTP/1.1 client with a bounded keep-alive pool per upstream base URL.

Owns: connecting (bounded by a connect timeout), writing one request, reading the status line,
headers (at most ``HEADER_BYTES_MAX``) and a Content-Length, chunked or read-to-close body, and
keeping the connection when HTTP/1.1 allows it. Every wait is bounded by the request deadline.
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
import time
from collections import deque
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


class _Connection:
    __slots__ = ("idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.idle_since = 0.0

    def usable(self, now: float) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and now - self.idle_since < IDLE_SECONDS_MAX
        )

    def close(self) -> None:
        try:
            self.writer.close()
        except Exception:  # already broken: nothing left to release
            pass


class _Broken(Exception):
    """Internal: the response could not be read; the message says why."""

    def __init__(self, message: str, responded: bool) -> None:
        super().__init__(message)
        self.responded = responded


def parse_base_url(base_url: str) -> tuple[str, int]:
    """``http://host:port`` -> (host, port); raises ValueError naming what is wrong."""
    parts = urlsplit(base_url)
    if parts.scheme != "http":
        raise ValueError(f"{base_url!r}: only http:// upstreams are supported")
    if not parts.hostname:
        raise ValueError(f"{base_url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ValueError(f"{base_url!r}: must be scheme://host:port without a path")
    try:
        port = parts.port or 80
    except ValueError:
        raise ValueError(f"{base_url!r}: invalid port") from None
    return parts.hostname, port


class UpstreamPool:
    """Keep-alive connections to one ``http://host:port``, at most ``size_max`` at a time."""

    def __init__(self, base_url: str, *, size_max: int = 64, connect_timeout: float = 0.3) -> None:
        self.base_url = base_url.rstrip("/")
        self.host, self.port = parse_base_url(self.base_url)
        host_header = self.host if self.port == 80 else f"{self.host}:{self.port}"
        if ":" in self.host:  # IPv6 literal
            host_header = f"[{self.host}]:{self.port}"
        self._host_header = host_header.encode("ascii")
        self.size_max = size_max
        self.connect_timeout = connect_timeout
        self._slots = asyncio.Semaphore(size_max)
        self._idle: deque[_Connection] = deque()
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
        head = [
            b"%s %s HTTP/1.1\r\nhost: %s\r\n"
            % (method.encode("ascii"), target.encode("latin-1"), self._host_header)
        ]
        if body or method not in ("GET", "HEAD", "DELETE"):
            head.append(b"content-length: %d\r\n" % len(body))
        if headers:
            for name, value in headers:
                head.append(b"%s: %s\r\n" % (name, value))
        head.append(b"\r\n")
        data = b"".join(head) + body

        phase = "pool"
        acquired = False
        conn: _Connection | None = None
        keep = False
        try:
            async with asyncio.timeout_at(deadline):
                await self._slots.acquire()
                acquired = True
                conn = self._take_idle()
                if conn is None:
                    phase = "connect"
                    conn = await self._connect()
                phase = "write"
                conn.writer.write(data)
                await conn.writer.drain()
                phase = "read"
                response, keep = await self._read_response(conn.reader, method)
                return response
        except TimeoutError:
            sent = phase in ("write", "read")
            raise UpstreamTimeout(self.base_url, f"no answer within the deadline ({phase})", sent) from None
        except _Broken as error:
            raise UpstreamProtocolError(
                self.base_url, str(error), sent=True, responded=error.responded
            ) from None
        except (OSError, RuntimeError) as error:  # reset, broken pipe, transport closed
            raise UpstreamProtocolError(
                self.base_url, f"{type(error).__name__}: {error}", sent=phase in ("write", "read")
            ) from None
        finally:
            if conn is not None:
                if keep:
                    conn.idle_since = time.monotonic()
                    self._idle.append(conn)
                else:
                    conn.close()
            if acquired:
                self._slots.release()

    def _take_idle(self) -> _Connection | None:
        now = time.monotonic()
        idle = self._idle
        while idle:
            conn = idle.pop()  # most recently used first: the warmest connection
            if conn.usable(now):
                return conn
            conn.close()
        return None

    async def _connect(self) -> _Connection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, limit=HEADER_BYTES_MAX)
        except TimeoutError:
            raise UpstreamConnectError(
                self.base_url, f"connect timed out after {self.connect_timeout * 1000:.0f} ms"
            ) from None
        except OSError as error:
            raise UpstreamConnectError(self.base_url, f"connect failed: {error.strerror or error}") from None
        self.opened += 1
        return _Connection(reader, writer)

    async def _read_response(self, reader: asyncio.StreamReader, method: str) -> tuple[Response, bool]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as error:
            raise _Broken("connection closed before a complete response head", bool(error.partial)) from None
        except asyncio.LimitOverrunError:
            raise _Broken(f"response head exceeds {HEADER_BYTES_MAX} bytes", True) from None
        lines = head[:-4].split(b"\r\n")
        status_line = lines[0].split(b" ", 2)
        if len(status_line) < 2 or not status_line[0].startswith(b"HTTP/1."):
            raise _Broken("not an HTTP/1.x status line", True)
        try:
            status = int(status_line[1])
        except ValueError:
            raise _Broken("invalid status code", True) from None
        keep = status_line[0] == b"HTTP/1.1"
        headers: list[tuple[bytes, bytes]] = []
        length: int | None = None
        chunked = False
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
            elif name == b"transfer-encoding":
                chunked = value.lower().endswith(b"chunked")
            elif name == b"connection":
                token = value.lower()
                if b"close" in token:
                    keep = False
                elif b"keep-alive" in token:
                    keep = True
            headers.append((name, value))
        try:
            if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
                body = b""
            elif chunked:
                body = await self._read_chunked(reader)
            elif length is not None:
                body = await reader.readexactly(length)
            else:
                keep = False
                body = await self._read_to_close(reader)
        except asyncio.IncompleteReadError:
            raise _Broken("connection closed in the middle of the body", True) from None
        except (asyncio.LimitOverrunError, ValueError):
            raise _Broken("malformed chunked body", True) from None
        return Response(status, headers, body), keep

    async def _read_chunked(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            size = int(line[:-2].split(b";", 1)[0].strip(), 16)
            if size == 0:
                while (await reader.readuntil(b"\r\n")) != b"\r\n":  # trailers, ignored
                    pass
                return b"".join(parts)
            total += size
            if total > BODY_BYTES_MAX:
                raise ValueError("chunked body too large")
            chunk = await reader.readexactly(size + 2)
            if chunk[-2:] != b"\r\n":
                raise ValueError("chunk not terminated by CRLF")
            parts.append(chunk[:-2])

    async def _read_to_close(self, reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        total = 0
        while True:
            chunk = await reader.read(65536)
            if not chunk:
                return b"".join(parts)
            total += len(chunk)
            if total > BODY_BYTES_MAX:
                raise ValueError("body too large")
            parts.append(chunk)

    async def close(self) -> None:
        while self._idle:
            conn = self._idle.pop()
            conn.close()
            try:
                await asyncio.wait_for(conn.writer.wait_closed(), 0.2)
            except (TimeoutError, OSError):
                pass
