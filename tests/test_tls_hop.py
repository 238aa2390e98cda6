"""The HTTP hop between sites over TLS (cardcore.platform.tls): the lean server's TLS listener beside
its clear one, and the gateway's upstream client verifying it against the run's CA, on uvloop as
the servers run. What must hold: the request and its answer cross over TLS 1.3; a server the CA
did not sign, or one presenting a certificate for another address, is refused before a byte of the
request is sent; a client that never completes its handshake is dropped after the header read
time; bad settings fail naming the file or key."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import ssl
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import uvloop
from cardcore.gateway import settings as gateway_settings
from cardcore.platform import httpserver
from cardcore.platform import settings as app_settings
from cardcore.platform import tls as hop_tls
from cardcore.platform.http import lifespan
from cardcore.platform.upstream import UpstreamConnectError, UpstreamPool

from watertight import tls

pytestmark = pytest.mark.timeout(60)

SCHEMES: list[str] = []


async def nothing() -> None:
    pass


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await lifespan(receive, send, nothing, nothing)
        return
    body = (await receive()).get("body", b"")
    SCHEMES.append(scope["scheme"])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"%s %s" % (scope["scheme"].encode(), body)})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def pki(tmp_path: Path, addresses: list[str], ca: dict[str, str] | None = None) -> tuple[Path, Path, Path]:
    """The run CA's certificate and a server certificate and key for ``addresses``, as files."""
    ca = ca or tls.make_ca()
    server = tls.make_server(ca, addresses)
    files = tmp_path / "ca.crt", tmp_path / "server.crt", tmp_path / "server.key"
    for path, text in zip(files, (ca["cert"], server["cert"], server["key"]), strict=True):
        path.write_text(text)
    return files


def with_tls_server(
    tmp_path: Path,
    scenario: Callable[[httpserver.Server, int], Awaitable[None]],
    addresses: tuple[str, ...] = ("127.0.0.1",),
    **options: Any,
) -> Path:
    """Run ``scenario`` (given the server and its TLS port) on uvloop against a server in clear
    and with TLS on loopback; returns the CA file its certificate verifies with."""
    ca_file, cert_file, key_file = pki(tmp_path, list(addresses))
    tls_port = _free_port()

    async def main() -> None:
        context = hop_tls.server_context(str(cert_file), str(key_file))
        running = httpserver.Server(app, "127.0.0.1", _free_port(), tls=(tls_port, context), **options)
        task = asyncio.create_task(running.serve())
        for _ in range(250):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", tls_port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        try:
            await scenario(running, tls_port)
        finally:
            running.stop()
            await asyncio.wait_for(task, 15)

    uvloop.run(main())
    return ca_file


def test_a_request_crosses_over_tls_1_3_and_the_clear_port_still_serves(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    SCHEMES.clear()
    ca_file = tmp_path / "ca.crt"

    async def scenario(server: httpserver.Server, tls_port: int) -> None:
        pool = UpstreamPool(
            f"https://127.0.0.1:{tls_port}",
            ssl_context=hop_tls.client_context(str(ca_file)),
            connect_timeout=5,
        )
        answers = [await pool.request("POST", "/v1/authorizations", b'{"pan": "x"}') for _ in range(3)]
        assert [(a.status, a.body) for a in answers] == [(200, b'https {"pan": "x"}')] * 3
        assert pool.opened == 1  # kept alive: one handshake for the three
        (conn,) = pool._idle
        assert conn.transport is not None
        assert conn.transport.get_extra_info("ssl_object").version() == "TLSv1.3"
        await pool.close()
        clear = UpstreamPool(f"http://127.0.0.1:{server.address[1]}", connect_timeout=5)
        assert (await clear.request("GET", "/x")).body == b"http "
        await clear.close()

    with caplog.at_level(logging.WARNING):
        with_tls_server(tmp_path, scenario)
    assert SCHEMES == ["https", "https", "https", "http"]
    # a client closing its TLS connection is no event (no half-close warning at every close)
    assert not [r for r in caplog.records if "eof_received" in r.getMessage()], caplog.records


@pytest.mark.parametrize("wrong", ["another CA", "another address"])
def test_a_server_that_does_not_verify_is_refused_before_anything_is_sent(tmp_path: Path, wrong: str) -> None:
    SCHEMES.clear()
    other = tmp_path / "other"
    other.mkdir()
    other_ca, _, _ = pki(other, ["127.0.0.1"])
    addresses = ("127.0.0.1",) if wrong == "another CA" else ("127.0.2.1",)

    async def scenario(server: httpserver.Server, tls_port: int) -> None:
        ca_file = other_ca if wrong == "another CA" else tmp_path / "ca.crt"
        pool = UpstreamPool(
            f"https://127.0.0.1:{tls_port}",
            ssl_context=hop_tls.client_context(str(ca_file)),
            connect_timeout=5,
        )
        with pytest.raises(UpstreamConnectError, match="certificate verify failed") as caught:
            await pool.request("POST", "/v1/authorizations", b'{"pan": "x"}')
        assert not caught.value.sent
        await pool.close()

    with_tls_server(tmp_path, scenario, addresses=addresses)
    assert SCHEMES == []  # the app never saw the request


def test_clear_text_to_the_tls_port_gets_no_answer_and_a_stalled_handshake_is_dropped(tmp_path: Path) -> None:
    SCHEMES.clear()

    async def scenario(server: httpserver.Server, tls_port: int) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", tls_port)
        writer.write(b"GET /x HTTP/1.1\r\nhost: a\r\n\r\n")
        assert b"HTTP/1.1" not in await asyncio.wait_for(reader.read(100), 5)
        writer.close()
        stalled_reader, stalled_writer = await asyncio.open_connection("127.0.0.1", tls_port)
        started = asyncio.get_running_loop().time()
        assert await asyncio.wait_for(stalled_reader.read(10), 10) == b""  # never sent a ClientHello
        assert asyncio.get_running_loop().time() - started < 5
        stalled_writer.close()
        for _ in range(100):  # the bounds count them no more
            if server.open == 0:
                break
            await asyncio.sleep(0.02)
        assert server.open == 0 and not server.by_client

    with_tls_server(tmp_path, scenario, header_read_timeout_s=0.5)
    assert SCHEMES == []


def test_an_https_upstream_needs_a_ca(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a CA"):
        UpstreamPool("https://127.0.0.1:1")
    with pytest.raises(ValueError, match="only http:// and https://"):
        UpstreamPool("ftp://127.0.0.1:1")


def test_bad_tls_settings_fail_naming_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "tokens.json").write_text(
        json.dumps({"acquirer": ["a" * 64], "channel": ["b" * 64], "operator": ["c" * 64]})
    )
    gateway = {
        "site": "prod",
        "cell_count": 1,
        "upstreams": {"1": ["https://127.0.0.1:9"]},
        "api_tokens_file": "tokens.json",
    }
    with pytest.raises(gateway_settings.GatewayConfigError, match=r"upstreams\.1: .* tls_ca_file is not set"):
        gateway_settings.parse(json.dumps(gateway))
    path = tmp_path / "gateway.json"
    path.write_text(json.dumps(gateway | {"tls_ca_file": "missing.crt"}))
    with pytest.raises(
        gateway_settings.GatewayConfigError, match=r"tls_ca_file: .*missing\.crt: no such file"
    ):
        gateway_settings.load(path)
    (tmp_path / "junk.crt").write_text("not a certificate")
    path.write_text(json.dumps(gateway | {"tls_ca_file": "junk.crt"}))
    with pytest.raises(gateway_settings.GatewayConfigError, match=r"junk\.crt: not a usable certificate"):
        gateway_settings.load(path)

    with pytest.raises(ValueError, match=r"server\.crt: no such file"):
        hop_tls.server_context(str(tmp_path / "server.crt"), str(tmp_path / "server.key"))
    with pytest.raises(ValueError, match="not a usable certificate and key"):
        hop_tls.server_context(str(tmp_path / "junk.crt"), str(tmp_path / "junk.crt"))
    with pytest.raises(ssl.SSLError):  # the standard library's own check, for comparison
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(tmp_path / "junk.crt")


def test_the_app_server_checks_its_tls_listener_at_load(tmp_path: Path) -> None:
    """The settings of an app server with a TLS listener: its files relative to the settings file,
    checked before it starts; the TLS port cannot be the clear one."""
    _, cert_file, key_file = pki(tmp_path, ["127.0.0.1"])
    (tmp_path / "tokens.json").write_text(
        json.dumps({"acquirer": ["a" * 64], "channel": ["b" * 64], "operator": ["c" * 64]})
    )
    base = {
        "site": "prod",
        "cells": {"1": {"dsn": "postgresql://u@127.0.0.1:1/db"}},
        "cell_count": 1,
        "pan_key_hex": "00" * 32,
        "api_tokens_file": "tokens.json",
        "port": 8100,
    }
    path = tmp_path / "app.json"
    path.write_text(
        json.dumps(base | {"tls": {"port": 8143, "cert_file": "server.crt", "key_file": "server.key"}})
    )
    loaded = app_settings.load(path)
    assert (
        loaded.tls is not None
        and loaded.tls.cert_file == str(cert_file)
        and loaded.tls.key_file == str(key_file)
    )
    path.write_text(
        json.dumps(base | {"tls": {"port": 8100, "cert_file": "server.crt", "key_file": "server.key"}})
    )
    with pytest.raises(ValueError, match=r"tls\.port 8100 is the port served in clear"):
        app_settings.load(path)
    path.write_text(
        json.dumps(base | {"tls": {"port": 8143, "cert_file": "nope.crt", "key_file": "server.key"}})
    )
    with pytest.raises(ValueError, match=r"nope\.crt: no such file"):
        app_settings.load(path)
