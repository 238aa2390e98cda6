"""Connecting to a cell's writable member when another member accepts TCP but never answers (a
frozen PostgreSQL, or one behind a partition that drops packets): trying the members in turn
within one timeout, as a multi-host DSN does, never reaches the primary behind it."""

from __future__ import annotations

import asyncio
import shutil
import time
import warnings
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from cardcore.platform import db

from watertight.pg import PostgresServer, free_port, service_tempdir

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


@pytest.fixture
def primary_without_its_standby() -> Iterator[PostgresServer]:
    """A primary whose one synchronous standby never connects: every commit waits on it."""
    base_dir = service_tempdir("watertight-test-pg-")
    server = PostgresServer(
        datadir=base_dir / "data",
        port=free_port(),
        socket_dir=base_dir / "socket",
        fast=True,
        settings={"synchronous_standby_names": "ghost"},
    )
    try:
        server.initdb()
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


async def cancel_when_waiting(admin: asyncpg.Connection, victim: asyncpg.Connection) -> None:
    """Cancel the victim's session once its commit waits on the sync standby (as an operator's
    pg_cancel_backend does), within 10 s."""
    pid = victim.get_server_pid()
    deadline = time.monotonic() + 10
    while not await admin.fetchval("SELECT wait_event = 'SyncRep' FROM pg_stat_activity WHERE pid = $1", pid):
        assert time.monotonic() < deadline, "the commit never waited on the sync standby"
        await asyncio.sleep(0.05)
    assert await admin.fetchval("SELECT pg_cancel_backend($1)", pid)


async def commit(conn: asyncpg.Connection, value: int, table: str = "t") -> None:
    async with conn.transaction():
        await conn.execute(f"INSERT INTO {table} VALUES ($1)", value)


def test_a_commit_the_sync_standby_never_confirmed_is_not_a_success(
    primary_without_its_standby: PostgresServer,
) -> None:
    """An operator cancels the sessions stuck behind a lost sync standby (pg_cancel_backend), and
    PostgreSQL ends their wait with only a WARNING, the commits durable on the primary alone: a
    plain connection reports success (an acknowledgement a failover would take back); the app's
    connection raises instead, and stays usable."""
    server = primary_without_its_standby
    dsn = f"postgresql://postgres@{server.host}:{server.port}/postgres"
    waits = {"synchronous_commit": "on"}

    async def scenario() -> None:
        admin = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "local"})
        plain = await asyncpg.connect(dsn, server_settings=waits)
        guarded = await db.connect_writable(dsn, [], server_settings=waits)
        try:
            await admin.execute("CREATE TABLE t (v int)")
            # the hazard: the cancelled wait reads as a commit
            await asyncio.wait_for(asyncio.gather(commit(plain, 1), cancel_when_waiting(admin, plain)), 20)
            assert await admin.fetchval("SELECT count(*) FROM t WHERE v = 1") == 1

            outcome = await asyncio.wait_for(
                asyncio.gather(
                    commit(guarded, 2), cancel_when_waiting(admin, guarded), return_exceptions=True
                ),
                20,
            )
            assert isinstance(outcome[0], db.CommitNotConfirmedError), outcome
            assert "sync standby" in str(outcome[0])
            # an autocommit write through fetch* is held to the same rule
            outcome = await asyncio.wait_for(
                asyncio.gather(
                    guarded.fetchval("INSERT INTO t VALUES (3) RETURNING v"),
                    cancel_when_waiting(admin, guarded),
                    return_exceptions=True,
                ),
                20,
            )
            assert isinstance(outcome[0], db.CommitNotConfirmedError), outcome
            # the connection goes on: reads, and writes that do not wait on the standby
            assert await guarded.fetchval("SELECT count(*) FROM t") == 3
            await guarded.execute("SET synchronous_commit = local")
            await commit(guarded, 4)
            assert await guarded.fetchval("SELECT count(*) FROM t WHERE v = 4") == 1
        finally:
            for conn in (admin, plain, guarded):
                await conn.close()

    asyncio.run(scenario())


@pytest.fixture
def promoted() -> Iterator[PostgresServer]:
    """A primary on timeline 2: started as a standby of nothing, then promoted (what Patroni
    does to the sync standby after a failover)."""
    base_dir = service_tempdir("watertight-test-pg-")
    server = PostgresServer(
        datadir=base_dir / "data", port=free_port(), socket_dir=base_dir / "socket", fast=True
    )
    try:
        server.initdb()
        (server.datadir / "standby.signal").touch()
        server.start()
        server.psql("SELECT pg_promote(true, 30)")
        yield server
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


def test_of_two_writable_members_the_newest_timeline_wins(
    postgres: PostgresServer, promoted: PostgresServer
) -> None:
    """A deposed primary whose Patroni is gone stays writable beside the one a promotion made:
    without the leader lock, new connections go to the newer timeline, whichever answers first."""
    deposed = f"{postgres.host}:{postgres.port}"
    newer = f"{promoted.host}:{promoted.port}"

    async def scenario() -> None:
        for members in ([deposed, newer], [newer, deposed]):
            conn = await db.connect_writable(
                f"postgresql://postgres@{deposed},{newer}/postgres", members, timeout=TIMEOUT_S
            )
            try:
                assert await conn.fetchval("SELECT inet_server_port()") == promoted.port
                assert (await conn.fetchval(db.TIMELINE_SQL)).startswith("00000002")
            finally:
                await conn.close()

    asyncio.run(scenario())


def test_the_one_member_named_is_the_only_one_tried(postgres: PostgresServer) -> None:
    """The app names one member (the leader lock's holder) while the cell's DSN lists both centers,
    the deposed primary first: a frozen one there must not eat the timeout (issue 13/17: after a
    site freeze the app served cell 1 again only when the site thawed)."""
    primary = f"{postgres.host}:{postgres.port}"

    async def scenario() -> None:
        async with silent_member() as frozen:
            started = time.monotonic()
            conn = await db.connect_writable(
                f"postgresql://postgres@{frozen},{primary}/postgres", [primary], timeout=TIMEOUT_S
            )
            try:
                assert time.monotonic() - started < TIMEOUT_S / 2
                assert await conn.fetchval("SELECT inet_server_port()") == postgres.port
            finally:
                await conn.close()

    asyncio.run(scenario())


def test_a_pooled_connection_keeps_refusing_an_unconfirmed_commit_after_its_first_release(
    primary_without_its_standby: PostgresServer,
) -> None:
    """The app server's pool (the engine's: ConfirmedCommitConnection, its reset without a query)
    hands each connection out many times, and opening an account, changing a limit or a pricing
    rule commits through it. asyncpg clears a connection's log listeners at every release, so a
    guard kept as a listener held only for the connection's first use: afterwards a cancelled
    sync wait read as a commit again. It must hold on every use, and a release must not warn."""
    from cardcore.platform import engine

    server = primary_without_its_standby
    dsn = f"postgresql://postgres@{server.host}:{server.port}/postgres"

    async def scenario() -> None:
        admin = await asyncpg.connect(dsn, server_settings={"synchronous_commit": "local"})
        pool = await asyncpg.create_pool(
            dsn, min_size=1, max_size=1, server_settings={"synchronous_commit": "on"},
            reset=engine._keep_session, connection_class=db.ConfirmedCommitConnection,
        )  # fmt: skip
        try:
            await admin.execute("CREATE TABLE IF NOT EXISTS pooled (v int)")
            for use in range(3):  # the same connection each time (max_size 1), released in between
                async with pool.acquire() as conn:
                    outcome = await asyncio.wait_for(
                        asyncio.gather(
                            commit(conn, use, "pooled"),
                            cancel_when_waiting(admin, conn),
                            return_exceptions=True,
                        ),
                        20,
                    )
                    assert isinstance(outcome[0], db.CommitNotConfirmedError), (use, outcome)
        finally:
            pool.terminate()
            await admin.close()

    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always", asyncpg.InterfaceWarning)
        asyncio.run(scenario())
    # asyncpg's "is being released to the pool but has 1 active log listener", at every release
    assert [str(w.message) for w in warned if issubclass(w.category, asyncpg.InterfaceWarning)] == []
