"""PostgreSQL for tests: one throwaway server per test session, and a factory for private ones.

Servers run with fast=True (no fsync): fine for tests, never for data that must survive a crash.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from watertight.pg import PostgresServer, free_port, service_tempdir


def new_postgres_server(base_dir: Path) -> PostgresServer:
    """An initialised, not yet started server whose files all live under `base_dir`."""
    server = PostgresServer(
        datadir=base_dir / "data", port=free_port(), socket_dir=base_dir / "socket", fast=True
    )
    server.initdb()
    return server


@pytest.fixture(scope="session")
def postgres() -> Iterator[PostgresServer]:
    """A running PostgreSQL shared by the whole session; create your own database in it."""
    base_dir = service_tempdir("watertight-test-pg-")
    server = new_postgres_server(base_dir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)


@pytest.fixture
def postgres_factory() -> Iterator[Callable[[], PostgresServer]]:
    """Make private servers (initialised, not started); all are stopped and removed after the test."""
    made: list[tuple[PostgresServer, Path]] = []

    def make() -> PostgresServer:
        base_dir = service_tempdir("watertight-test-pg-")
        made.append((new_postgres_server(base_dir), base_dir))
        return made[-1][0]

    yield make
    for server, base_dir in made:
        server.stop()
        shutil.rmtree(base_dir, ignore_errors=True)
