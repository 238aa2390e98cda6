"""The lean HTTP/1.1 server (cardcore.platform.httpserver) on a real loopback socket: what a
client of the core sends it, well-formed or not, and how it stops."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from cardcore.platform import httpserver

pytestmark = pytest.mark.timeout(60)


STARTED: list[str] = []  # paths whose app call began, in order
HEARD: list[str] = []  # what /patient received


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    STARTED.append(scope["path"])
    if scope["path"] == "/client":
        body = repr(scope["client"]).encode()
    elif scope["path"] == "/patient":  # waits long for its body; records what it heard
        HEARD.append((await asyncio.wait_for(receive(), 30))["type"])
        body = b""
    elif scope["path"] == "/impatient":  # an app that bounds the wait for the body, as JsonApp does
        try:
            async with asyncio.timeout(0.3):
                body = (await receive())["body"]
        except TimeoutError:
            await send({"type": "http.response.start", "status": 408, "headers": []})
            await send({"type": "http.response.body", "body": b"timeout"})
            return
    else:
        body = (await receive()).get("body", b"")
    if scope["path"] == "/boom":
        raise RuntimeError("a bug in the app")
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    answer = b"%s %s %s %s" % (scope["method"].encode(), scope["raw_path"], scope["query_string"], body)
    await send({"type": "http.response.start", "status": 201, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": answer})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def with_server(scenario: Callable[[httpserver.Server], Awaitable[None]], **options: Any) -> None:
    """Run ``scenario`` against a server on a free loopback port, then stop the server."""

    async def main() -> None:
        running = httpserver.Server(echo, "127.0.0.1", _free_port(), **options)
        task = asyncio.create_task(running.serve())
        for _ in range(250):
            try:
                _, writer = await asyncio.open_connection(*running.address)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        try:
            await scenario(running)
        finally:
            running.stop()
            await asyncio.wait_for(task, 15)

    asyncio.run(main())


async def exchange(server: httpserver.Server, data: bytes, answers: int = 1) -> list[bytes]:
    """Send raw bytes, read ``answers`` responses (each with its Content-Length body)."""
    reader, writer = await asyncio.open_connection(*server.address)
    writer.write(data)
    found = []
    try:
        for _ in range(answers):
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            found.append(head + await reader.readexactly(length))
    finally:
        writer.close()
    return found


def test_a_request_with_a_body_is_answered_with_its_length_and_the_connection_kept() -> None:
    async def scenario(server: httpserver.Server) -> None:
        (answer,) = await exchange(
            server, b"POST /v1/x?a=1 HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\n\r\nabcd"
        )
        assert answer.startswith(b"HTTP/1.1 201 Created\r\n")
        assert b"content-length: 19\r\n" in answer and b"connection: close" not in answer
        assert answer.endswith(b"POST /v1/x a=1 abcd")

    with_server(scenario)


def test_pipelined_requests_are_answered_in_order_on_one_connection() -> None:
    async def scenario(server: httpserver.Server) -> None:
        data = b"GET /slow HTTP/1.1\r\nHost: h\r\n\r\n" + b"GET /two HTTP/1.1\r\nHost: h\r\n\r\n"
        first, second = await exchange(server, data, answers=2)
        assert first.endswith(b"GET /slow  ") and second.endswith(b"GET /two  ")

    with_server(scenario)


def test_a_chunked_body_is_joined() -> None:
    async def scenario(server: httpserver.Server) -> None:
        data = b"POST /c HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n"
        (answer,) = await exchange(server, data)
        assert answer.endswith(b"POST /c  abcde")

    with_server(scenario)


def test_http_1_0_gets_its_answer_and_the_connection_closed() -> None:
    async def scenario(server: httpserver.Server) -> None:
        (answer,) = await exchange(server, b"GET /old HTTP/1.0\r\n\r\n")
        assert b"connection: close\r\n" in answer

    with_server(scenario)


@pytest.mark.parametrize(
    ("data", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"505"),
        (b"GET / HTTP/1.1\r\nNo-Colon\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n", b"400"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
        (b"POST / HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (httpserver.BODY_BYTES_MAX + 1), b"413"),
        (b"GET / HTTP/1.1\r\nX: " + b"a" * (httpserver.HEAD_BYTES_MAX + 10) + b"\r\n\r\n", b"431"),
    ],
)
def test_malformed_requests_get_a_json_error_and_the_connection_closed(data: bytes, status: bytes) -> None:
    async def scenario(server: httpserver.Server) -> None:
        (answer,) = await exchange(server, data)
        assert answer.startswith(b"HTTP/1.1 " + status) and b"connection: close" in answer
        code = b"body_too_large" if status == b"413" else b"bad_http"
        assert b'"error":{"code":"%s"' % code in answer

    with_server(scenario)


def test_an_app_failure_is_a_500_and_the_connection_serves_the_next_request() -> None:
    async def scenario(server: httpserver.Server) -> None:
        data = b"GET /boom HTTP/1.1\r\n\r\n" + b"GET /after HTTP/1.1\r\n\r\n"
        failed, after = await exchange(server, data, answers=2)
        assert failed.startswith(b"HTTP/1.1 500") and b'"code":"internal"' in failed
        assert after.startswith(b"HTTP/1.1 201") and after.endswith(b"GET /after  ")

    with_server(scenario)


def test_stop_lets_the_request_in_flight_finish_and_accepts_nothing_new() -> None:
    async def scenario(server: httpserver.Server) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /slow HTTP/1.1\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        server.stop()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 201") and b"connection: close" in head
        writer.close()
        await asyncio.sleep(0.1)
        with pytest.raises(OSError):
            await asyncio.open_connection(*server.address)

    with_server(scenario)


def test_the_app_sees_a_request_before_its_body_and_bounds_the_wait_itself() -> None:
    """So the app's admission counts a request whose body is slow, and its body deadline answers
    it (408): the connection is closed after, since the rest of the body may still come."""

    async def scenario(server: httpserver.Server) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"POST /impatient HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        await writer.drain()
        await asyncio.sleep(0.1)
        assert STARTED[-1] == "/impatient"  # called with 3 of 10 body bytes there
        answer = await asyncio.wait_for(reader.read(4096), 5)
        assert answer.startswith(b"HTTP/1.1 408") and b"connection: close" in answer
        assert await asyncio.wait_for(reader.read(10), 5) == b""  # closed
        writer.close()
        # a body that completes in time is handed over whole
        (answer,) = await exchange(server, b"POST /impatient HTTP/1.1\r\nContent-Length: 3\r\n\r\nxyz")
        assert answer.startswith(b"HTTP/1.1 201") and answer.endswith(b"POST /impatient  xyz")

    with_server(scenario)


def test_a_client_that_closes_before_its_body_arrived_is_heard_at_once_as_a_disconnect() -> None:
    """Not after the app's body deadline: its admission slot is given back as soon as the client
    is gone (a half-close as much as a reset)."""

    async def scenario(server: httpserver.Server) -> None:
        for stop in ("half-close", "close"):
            _reader, writer = await asyncio.open_connection(*server.address)
            writer.write(b"POST /patient HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
            await writer.drain()
            await asyncio.sleep(0.1)
            heard = len(HEARD)
            if stop == "half-close":
                writer.write_eof()
            else:
                writer.close()
            for _ in range(100):
                if len(HEARD) > heard:
                    break
                await asyncio.sleep(0.05)
            assert HEARD[heard:] == ["http.disconnect"], stop
            assert server.in_flight == 0
            writer.close()

    with_server(scenario)


def test_the_app_is_told_the_client_address() -> None:
    async def scenario(server: httpserver.Server) -> None:
        (answer,) = await exchange(server, b"GET /client HTTP/1.1\r\n\r\n")
        assert b"('127.0.0.1', " in answer

    with_server(scenario)


def test_a_head_never_finished_and_an_idle_connection_are_closed_after_the_header_read_time() -> None:
    async def scenario(server: httpserver.Server) -> None:
        slow_reader, slow_writer = await asyncio.open_connection(*server.address)
        slow_writer.write(b"GET /never HTTP/1.1\r\nX-Slow: 1\r\n")
        idle_reader, idle_writer = await asyncio.open_connection(*server.address)
        await slow_writer.drain()
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(slow_reader.read(10), 10) == b""
        assert await asyncio.wait_for(idle_reader.read(10), 10) == b""
        waited = asyncio.get_running_loop().time() - started
        assert 0.4 <= waited <= 5, waited
        assert "/never" not in STARTED
        slow_writer.close()
        idle_writer.close()

    with_server(scenario, header_read_timeout_s=0.5)


def test_connections_beyond_the_bound_wait_unanswered_until_one_closes_then_are_served() -> None:
    """As granian's permits: at the bound the server stops accepting; the kernel's backlog holds
    the next connection (not refused, not answered) until a connection closes."""

    async def scenario(server: httpserver.Server) -> None:
        held = [await asyncio.open_connection(*server.address) for _ in range(2)]
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /third HTTP/1.1\r\n\r\n")
        await writer.drain()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(10), 0.5)  # neither answered nor closed
        assert "/third" not in STARTED and server.open == 2
        held[0][1].write(b"GET /first HTTP/1.1\r\n\r\n")  # the connections held are served
        answer = await asyncio.wait_for(held[0][0].readuntil(b"GET /first  "), 5)
        assert answer.startswith(b"HTTP/1.1 201")
        held[1][1].close()  # one closes: the waiting one is accepted and answered
        answer = await asyncio.wait_for(reader.readuntil(b"GET /third  "), 5)
        assert answer.startswith(b"HTTP/1.1 201")
        writer.close()
        held[0][1].close()

    with_server(scenario, connections_max=2)


def test_one_address_holds_at_most_its_bound_and_the_others_are_served() -> None:
    """Issue 16, hostile clients: connections from one client address beyond
    ``connections_per_client_max`` are answered 503 (Retry-After) and closed at once, before
    anything of theirs is read; another address is served, and the address gets a connection
    again once one of its own closed."""

    async def scenario(server: httpserver.Server) -> None:
        held = [await asyncio.open_connection(*server.address, local_addr=("127.0.0.2", 0)) for _ in range(3)]
        for _, writer in held:  # heads that never end: what a slowloris holds
            writer.write(b"POST /v1/x HTTP/1.1\r\n")
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(*server.address, local_addr=("127.0.0.2", 0))
        answer = await asyncio.wait_for(reader.read(), 5)  # answered, then closed
        assert answer.startswith(b"HTTP/1.1 503 ") and b"retry-after: 1" in answer, answer
        assert b'"code":"overloaded"' in answer
        writer.close()
        assert server.refused_per_client == 1 and server.by_client == {"127.0.0.2": 3}
        other = await exchange(server, b"GET /other HTTP/1.1\r\n\r\n")  # 127.0.0.1
        assert other[0].startswith(b"HTTP/1.1 201"), other
        held[0][1].close()
        await asyncio.sleep(0.2)
        reader, writer = await asyncio.open_connection(*server.address, local_addr=("127.0.0.2", 0))
        writer.write(b"GET /again HTTP/1.1\r\n\r\n")
        answer = await asyncio.wait_for(reader.readuntil(b"GET /again  "), 5)
        assert answer.startswith(b"HTTP/1.1 201")
        writer.close()
        for _, holder in held[1:]:
            holder.close()

    with_server(scenario, connections_per_client_max=3)


def test_an_idle_keep_alive_connection_is_closed_the_header_read_time_after_its_last_answer() -> None:
    async def scenario(server: httpserver.Server) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"GET /one HTTP/1.1\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"GET /one  "), 5)
        answered = asyncio.get_running_loop().time()
        await asyncio.sleep(0.3)
        writer.write(b"GET /late-head HTTP/1.1\r\n")  # a head begun late and never finished
        await writer.drain()
        assert await asyncio.wait_for(reader.read(10), 10) == b""
        waited = asyncio.get_running_loop().time() - answered
        assert waited >= 0.6, waited
        assert "/late-head" not in STARTED
        writer.close()

    with_server(scenario, header_read_timeout_s=0.6)


def test_the_header_read_time_counts_from_the_last_answer_not_from_a_late_heads_first_byte() -> None:
    """As granian's header_read_timeout: a client cannot stretch the deadline by starting a head
    late and trickling it in."""

    async def scenario() -> None:
        server = httpserver.Server(echo, "127.0.0.1", 1, header_read_timeout_s=10.0)
        conn = httpserver.HttpProtocol(server)
        conn.last_active = 1000.0  # the last answer
        assert not conn.expired(1009.0, 10.0)
        conn.data_received(b"GET /late HTTP/1.1\r\n")  # at 1009: the head begins, unfinished
        assert conn.current is None and conn.buffer
        assert conn.expired(1010.5, 10.0)
        conn.current = object()  # type: ignore[assignment]  # a request in progress: the app's deadline
        assert not conn.expired(1100.0, 10.0)

    asyncio.run(scenario())


def test_a_chunked_body_that_trickles_in_is_joined() -> None:
    async def scenario(server: httpserver.Server) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        writer.write(b"POST /trickle HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n")
        for piece in (b"3\r", b"\nab", b"c\r\n", b"2\r\nde\r\n0\r\n", b"X-T: 1\r\n", b"\r\n"):
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(piece)
        answer = await asyncio.wait_for(reader.readuntil(b"abcde"), 5)
        assert answer.startswith(b"HTTP/1.1 201") and answer.endswith(b"POST /trickle  abcde")
        writer.write(b"GET /next HTTP/1.1\r\n\r\n")  # the trailers were consumed: the next request is read
        assert (await asyncio.wait_for(reader.readuntil(b"GET /next  "), 5)).startswith(b"HTTP/1.1 201")
        writer.close()

    with_server(scenario)


def test_a_head_that_trickles_in_byte_by_byte_is_parsed() -> None:
    async def scenario(server: httpserver.Server) -> None:
        reader, writer = await asyncio.open_connection(*server.address)
        for byte in b"GET /bytes?x=1 HTTP/1.1\r\nHost: h\r\n\r\n":
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.002)
        answer = await asyncio.wait_for(reader.readuntil(b"GET /bytes x=1 "), 5)
        assert answer.startswith(b"HTTP/1.1 201")
        writer.close()

    with_server(scenario)


def test_the_serving_limits_reach_the_lean_server(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every bound ServeLimits gives a server is handed to it: the connections and the header
    read time to the server, the body time and the in-flight bounds to the app it serves."""
    from cardcore.platform import serve
    from cardcore.platform.admission import ServeLimits

    seen: dict[str, Any] = {}

    def fake_run(app: Any, host: str, port: int, **options: Any) -> None:
        seen.update(options, app=app)

    monkeypatch.setattr(httpserver, "run", fake_run)
    monkeypatch.setenv(serve.SERVER_ENV, "lean")
    monkeypatch.setattr(serve, "load_factory", lambda target: lambda: "the app")
    serve.serve(
        "x:y",
        "127.0.0.1",
        1,
        ServeLimits(connections_max=100, header_read_timeout_ms=2500, connections_per_client_max=40),
    )
    assert seen == {
        "app": "the app",
        "connections_max": 100,
        "header_read_timeout_s": 2.5,
        "connections_per_client_max": 40,
        "tls": None,
    }


def test_granian_refuses_settings_that_ask_for_a_tls_listener(monkeypatch: pytest.MonkeyPatch) -> None:
    """granian serves one listener: rather than serve the clear one only (the other center's
    gateway would find nothing), it refuses to start, naming the way out."""
    from cardcore.platform import serve
    from cardcore.platform.tls import TlsListen

    monkeypatch.setenv(serve.SERVER_ENV, "granian")
    with pytest.raises(SystemExit, match=r"TLS one too \(port 8143\); unset WATERTIGHT_HTTP_SERVER"):
        serve.serve("x:y", "127.0.0.1", 1, tls=TlsListen(port=8143, cert_file="c", key_file="k"))


def test_a_server_with_a_bound_that_cannot_hold_is_refused() -> None:
    async def scenario() -> None:
        for options in (
            {"connections_max": 0},
            {"header_read_timeout_s": 0.0},
            {"connections_per_client_max": 0},
        ):
            with pytest.raises(ValueError, match="connections_max"):
                httpserver.Server(echo, "127.0.0.1", 1, **options)

    asyncio.run(scenario())
