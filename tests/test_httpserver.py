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


async def echo(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = (await receive())["body"]
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


def with_server(scenario: Callable[[httpserver.Server], Awaitable[None]]) -> None:
    """Run ``scenario`` against a server on a free loopback port, then stop the server."""

    async def main() -> None:
        running = httpserver.Server(echo, "127.0.0.1", _free_port())
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
        assert b'"error":{"code":"bad_http"' in answer

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
