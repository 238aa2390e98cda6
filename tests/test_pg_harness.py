"""The PostgreSQL harness: the server tests and the local runtime build on."""

from __future__ import annotations

import asyncio
import os
import pwd
from collections.abc import Callable
from pathlib import Path

import asyncpg
import pytest

from watertight.pg import PostgresServer, service_user


def _proc_ids(pid: int, field: str) -> list[int]:
    """The Uid/Gid/Groups line of /proc/PID/status as integers."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, values = line.partition(":")
        if name == field:
            return [int(value) for value in values.split()]
    raise AssertionError(f"/proc/{pid}/status has no {field} line")


def _children(pid: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                children.append(int(entry.name))
    return children


async def _fetch_value(dsn: str, sql: str, *args: object) -> object:
    connection = await asyncpg.connect(dsn, timeout=10)
    try:
        return await connection.fetchval(sql, *args)
    finally:
        await connection.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="only root hands PostgreSQL to another user")
def test_postgres_runs_as_the_unprivileged_service_user_when_root(postgres: PostgresServer) -> None:
    user = service_user()
    assert user is not None
    account = pwd.getpwnam(user)
    pid = postgres.pid
    assert pid is not None
    for process in [pid, *_children(pid)]:
        assert set(_proc_ids(process, "Uid")) == {account.pw_uid}, f"PID {process} runs with a foreign uid"
        assert set(_proc_ids(process, "Gid")) == {account.pw_gid}, f"PID {process} runs with a foreign gid"
        assert 0 not in _proc_ids(process, "Groups"), f"PID {process} kept root's supplementary group"


def test_postgres_runs_as_the_caller_when_not_root(postgres: PostgresServer) -> None:
    if os.geteuid() == 0:
        pytest.skip("root hands PostgreSQL to the service user")
    pid = postgres.pid
    assert pid is not None
    assert set(_proc_ids(pid, "Uid")) == {os.geteuid()}


def test_server_accepts_connections_on_its_dsn(postgres: PostgresServer) -> None:
    assert postgres.is_running()
    assert asyncio.run(_fetch_value(postgres.dsn("postgres"), "SELECT 1")) == 1


def test_create_database_twice_is_harmless(postgres: PostgresServer) -> None:
    postgres.create_database("harness_idempotent")
    postgres.create_database("harness_idempotent")
    dsn = postgres.dsn("harness_idempotent")
    assert asyncio.run(_fetch_value(dsn, "SELECT current_database()")) == "harness_idempotent"


def test_create_database_quotes_awkward_names(postgres: PostgresServer) -> None:
    name = "Harness O'Brien; DROP"
    postgres.create_database(name)
    postgres.create_database(name)
    found = asyncio.run(
        _fetch_value(postgres.dsn(), "SELECT count(*) FROM pg_database WHERE datname = $1", name)
    )
    assert found == 1


def test_stop_leaves_no_postgres_process(postgres_factory: Callable[[], PostgresServer]) -> None:
    server = postgres_factory()
    server.start()
    pid = server.pid
    assert pid is not None
    children = _children(pid)
    assert children, "a running postmaster has background workers"

    server.stop()

    assert not server.is_running()
    assert server.pid is None
    for process in [pid, *children]:
        assert not Path(f"/proc/{process}").exists(), f"PID {process} outlived the stop"


def test_start_twice_keeps_the_same_postmaster(postgres: PostgresServer) -> None:
    pid = postgres.pid
    postgres.start()
    assert postgres.pid == pid


def test_a_second_handle_on_the_datadir_finds_the_running_server(postgres: PostgresServer) -> None:
    other = PostgresServer(datadir=postgres.datadir, port=postgres.port, socket_dir=postgres.socket_dir)
    assert other.is_running()
    assert other.pid == postgres.pid
