"""An app server serves a cell only from the very PostgreSQL its lock holder's Patroni reported.

The engine tells that PostgreSQL by ``pg_postmaster_start_time()``, which Patroni's ``/primary``
answer carries, not by the server's address: on Kubernetes a member is a Service name and the
server sees its pod's address, so an address check refused every member there (every app pod
stayed unready). Here the member is named ``localhost`` while the server sees 127.0.0.1, as on
Kubernetes, and a fake Patroni answers ``/primary`` for it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from cardcore.platform.engine import CellEngine, postmaster_started
from cardcore.platform.service import KeyRing
from cardcore.platform.settings import AppSettings, CellSettings

from watertight.pg import PostgresServer

_numbers = itertools.count(1)
READY_WAIT_S = 20.0


async def fake_patroni(answer: Callable[[], dict[str, Any]]) -> tuple[asyncio.Server, str]:
    """An HTTP server answering every request with 200 and ``answer()`` as JSON (keep-alive)."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                body = json.dumps(answer()).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return server, f"http://127.0.0.1:{port}"


async def run_engine(
    postgres: PostgresServer, answer: Callable[[str], dict[str, Any]], until_s: float
) -> CellEngine:
    """A cell engine whose only member is ``localhost:<port>``, probed for ``until_s`` (or until
    ready); ``answer`` gets the server's real postmaster start time as Patroni writes it."""
    database = f"fencing{next(_numbers)}"
    postgres.create_database(database)
    conn = await asyncpg.connect(postgres.dsn(database))
    try:
        started = str(await conn.fetchval("SELECT pg_postmaster_start_time()"))
    finally:
        await conn.close()
    server, url = await fake_patroni(lambda: answer(started))
    member = f"localhost:{postgres.port}"
    dsn = postgres.dsn(database).replace(f"{postgres.host}:", "localhost:")
    settings = AppSettings(
        site="prod",
        cells={"1": CellSettings(dsn=dsn, member_sites={member: "prod"}, patroni_urls={member: url})},
        cell_count=1,
        api_tokens_file="unused",
        pan_key_hex=secrets.token_hex(32),
        probe_interval_ms=100,
    )
    engine = CellEngine(1, settings.cells["1"], settings, KeyRing(settings))
    await engine.start()
    try:
        for _ in range(int(until_s / 0.05)):  # the engine has no event for readiness: poll it
            if engine.ready:
                break
            await asyncio.sleep(0.05)
    finally:
        await engine.stop()
        server.close()
    return engine


def patroni_answer(started: str | None) -> dict[str, Any]:
    body: dict[str, Any] = {"state": "running", "role": "primary", "patroni": {"name": "pg-cell1-prod"}}
    if started is not None:
        body["postmaster_start_time"] = started
    return body


def test_a_member_named_otherwise_than_the_address_the_server_sees_is_served(
    postgres: PostgresServer,
) -> None:
    engine = asyncio.run(run_engine(postgres, patroni_answer, READY_WAIT_S))
    assert engine.ready, engine.last_error
    assert engine.serving_member == f"localhost:{postgres.port}" and engine.leader_site == "prod"


@pytest.mark.parametrize(
    "case",
    ["another PostgreSQL", "no start time", "not a time"],
)
def test_a_server_that_is_not_the_lock_holders_postgresql_is_never_served(
    postgres: PostgresServer, case: str
) -> None:
    def answer(started: str) -> dict[str, Any]:
        if case == "another PostgreSQL":  # the lock holder's PostgreSQL started a second earlier
            return patroni_answer(str(datetime.fromisoformat(started) - timedelta(seconds=1)))
        return patroni_answer(None if case == "no start time" else "yesterday")

    engine = asyncio.run(run_engine(postgres, answer, 3.0))
    assert not engine.ready
    assert "not the lock holder" in engine.last_error, engine.last_error


def test_the_start_time_is_read_as_patroni_writes_it() -> None:
    started = postmaster_started(b'{"postmaster_start_time": "2026-12-01 07:08:57.853386+00:00"}')
    assert started is not None and started.isoformat() == "2026-12-01T07:08:57.853386+00:00"
    # the same instant written in another zone is the same start
    assert postmaster_started(b'{"postmaster_start_time": "2026-12-01 15:08:57.853386+08:00"}') == started
    for body in (
        b"{}",
        b"[]",
        b"not json",
        b'{"postmaster_start_time": 5}',
        b'{"postmaster_start_time": "2026-12-01 07:08:57"}',
    ):
        assert postmaster_started(body) is None, body
