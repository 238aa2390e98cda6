"""Connecting to a cell's writable member when another member accepts TCP but never answers (a
frozen PostgreSQL, or one behind a partition that drops packets): trying the members in turn
within one timeout, as a multi-host DSN does, never reaches the primary behind it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from cardcore.platform import db

from watertight.pg import PostgresServer

TIMEOUT_S = 1.5


@asynccontextmanager
async def silent_member() -> AsyncIterator[str]:
    """A TCP listener that takes connections and never says a word."""
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"127.0.0.1:{port}"
    finally:
        for writer in held:
            writer.close()
        server.close()


def test_a_silent_member_first_does_not_hide_the_primary(postgres: PostgresServer) -> None:
    primary = f"{postgres.host}:{postgres.port}"

    async def scenario() -> None:
        async with silent_member() as silent:
            dsn = f"postgresql://postgres@{silent},{primary}/postgres"
            # what a multi-host DSN does: the silent member eats the whole timeout
            started = time.monotonic()
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await asyncpg.connect(dsn, timeout=TIMEOUT_S, target_session_attrs="read-write")
            assert time.monotonic() - started >= TIMEOUT_S * 0.9

            started = time.monotonic()
            conn = await db.connect_writable(dsn, [silent, primary], timeout=TIMEOUT_S)
            try:
                assert time.monotonic() - started < TIMEOUT_S
                assert await conn.fetchval("SELECT NOT pg_is_in_recovery()") is True
            finally:
                await conn.close()

    asyncio.run(scenario())


def test_no_member_answering_fails_within_the_timeout() -> None:
    async def scenario() -> None:
        async with silent_member() as first, silent_member() as second:
            started = time.monotonic()
            with pytest.raises((TimeoutError, asyncio.TimeoutError)):
                await db.connect_writable(
                    f"postgresql://postgres@{first},{second}/postgres", [first, second], timeout=0.5
                )
            assert time.monotonic() - started < 2.0

    asyncio.run(scenario())
