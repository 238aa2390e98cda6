"""The card core for tests: app servers and a gateway as real processes on a real PostgreSQL.

``core`` (session): cells 1 and 2 as two databases, one app server serving both, one gateway in
front; tests talk to the gateway (``core.client``) as users do. ``core_factory`` builds private
stacks (e.g. one app server per cell, to stop one cell) that are torn down after the test.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from cardcore.platform.auth import ClientTokens

from tests import api_auth
from tests.api_auth import ANONYMOUS, RouteTokenAuth, new_tokens, write_tokens_file
from watertight.pg import PostgresServer, free_port

READY_TIMEOUT_S = 30.0
_database_numbers = itertools.count(1)


@dataclass
class ServerProcess:
    name: str
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout_s: float = 10.0) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=timeout_s)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


def spawn_server(
    name: str, module: str, config: dict[str, Any], workdir: Path, ready_path: str, ready_status: int = 200
) -> ServerProcess:
    config_path = workdir / f"{name}.json"
    config_path.write_text(json.dumps(config))
    log_path = workdir / f"{name}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, "--config", str(config_path)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    server = ServerProcess(name, f"http://{config['host']}:{config['port']}", process, log_path)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode}:\n{server.log()}")
        try:
            if httpx.get(server.url + ready_path, timeout=1.0).status_code == ready_status:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    server.stop(signal.SIGKILL)
    raise RuntimeError(f"{name} not ready within {READY_TIMEOUT_S} s:\n{server.log()}")


@dataclass
class CoreStack:
    postgres: PostgresServer
    workdir: Path
    pan_key_hex: str
    cell_count: int
    databases: dict[int, str]
    # the token of each client kind (acquirer, channel, operator); the servers accept them
    api_tokens: dict[str, str] = field(default_factory=new_tokens)
    apps: list[ServerProcess] = field(default_factory=list)
    gateway: ServerProcess | None = None
    _client: httpx.Client | None = None

    @property
    def url(self) -> str:
        assert self.gateway is not None
        return self.gateway.url

    @property
    def tokens(self) -> ClientTokens:
        return ClientTokens(self.api_tokens)

    @property
    def auth(self) -> RouteTokenAuth:
        """An httpx auth that sends each request with the token of its route."""
        return RouteTokenAuth(self.tokens)

    @property
    def tokens_file(self) -> Path:
        """The servers' tokens file (digests of ``api_tokens``), written on first use."""
        path = self.workdir / "api-tokens.json"
        if not path.exists():
            write_tokens_file(path, {kind: [token] for kind, token in self.api_tokens.items()})
        return path

    @property
    def secrets_file(self) -> Path:
        """The clients' side, as `watertight up` writes it: ``{"api_tokens": {kind: token}}``, 0600."""
        path = self.workdir / "secrets.json"
        if not path.exists():
            path.touch(mode=0o600)
            path.write_text(json.dumps({"api_tokens": self.api_tokens}))
        return path

    @property
    def client(self) -> httpx.Client:
        """A client of the gateway that sends every request with its route's token."""
        if self._client is None:
            self._client = self.new_client()
        return self._client

    def new_client(self) -> httpx.Client:
        """A client of the gateway of its own, with the route's token on every request (one per
        thread: see ``in_parallel``)."""
        return httpx.Client(base_url=self.url, timeout=30.0, auth=self.auth)

    def anonymous_client(self) -> httpx.Client:
        """A client of the gateway without credentials (close it after use)."""
        return httpx.Client(base_url=self.url, timeout=30.0, auth=ANONYMOUS)

    def _register(self, server: ServerProcess) -> ServerProcess:
        api_auth.register(server.url, lambda: self.tokens)
        return server

    def app_config(self, cells: list[int], site: str = "prod", **overrides: Any) -> dict[str, Any]:
        return {
            "site": site,
            "host": "127.0.0.1",
            "port": free_port(),
            "cell_count": self.cell_count,
            "pan_key_hex": self.pan_key_hex,
            "api_tokens_file": str(self.tokens_file),
            "cells": {
                str(c): {"dsn": self.postgres.dsn(self.databases[c]), "leader_site": site} for c in cells
            },
            **overrides,
        }

    def start_app(self, cells: list[int], **overrides: Any) -> ServerProcess:
        config = self.app_config(cells, **overrides)
        app = self._register(
            spawn_server(f"app{len(self.apps) + 1}", "cardcore", config, self.workdir, "/readyz")
        )
        self.apps.append(app)
        return app

    def start_gateway(
        self, upstreams: dict[int, list[str]], site: str = "prod", **overrides: Any
    ) -> ServerProcess:
        config = {
            "site": site,
            "host": "127.0.0.1",
            "port": free_port(),
            "cell_count": self.cell_count,
            "upstreams": {str(cell): urls for cell, urls in upstreams.items()},
            "api_tokens_file": str(self.tokens_file),
            "health_interval_ms": 200,
            **overrides,
        }
        self.gateway = self._register(
            spawn_server("gateway", "cardcore.gateway", config, self.workdir, "/readyz")
        )
        return self.gateway

    def psql(self, cell: int, sql: str, *args: Any) -> list[Any]:
        """Read the cell's database directly (for assertions on what was written)."""
        import asyncio

        import asyncpg

        async def run() -> list[Any]:
            conn = await asyncpg.connect(self.postgres.dsn(self.databases[cell]))
            try:
                return list(await conn.fetch(sql, *args))
            finally:
                await conn.close()

        return asyncio.run(run())

    def close(self) -> None:
        """Stop its servers and delete its directory (their settings hold the stack's PAN key)."""
        if self._client is not None:
            self._client.close()
        for server in [self.gateway, *self.apps]:
            if server is not None:
                server.stop()
        shutil.rmtree(self.workdir, ignore_errors=True)


def in_parallel(stack: CoreStack, calls: list[Any], threads: int = 32) -> list[httpx.Response]:
    """Run each ``call(client)`` on a pool of threads, each thread with its own client: one
    httpx.Client shared by 32 threads once failed a request with "ReadError: [Errno 9] Bad file
    descriptor" (a pooled connection closed by one thread while another read from it), which is
    the client's trouble, not the core's."""
    local = threading.local()
    clients: list[httpx.Client] = []
    guard = threading.Lock()

    def run(call: Any) -> httpx.Response:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = stack.new_client()
            with guard:
                clients.append(client)
        response: httpx.Response = call(client)
        return response

    try:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            return list(pool.map(run, calls))
    finally:
        for client in clients:
            client.close()


def new_stack(postgres: PostgresServer, cell_count: int = 2) -> CoreStack:
    workdir = Path(tempfile.mkdtemp(prefix="watertight-core-"))
    databases = {}
    for cell in range(1, cell_count + 1):
        name = f"core{next(_database_numbers)}_cell{cell}"
        postgres.create_database(name)
        databases[cell] = name
    return CoreStack(postgres, workdir, secrets.token_hex(32), cell_count, databases)


@pytest.fixture(scope="session")
def core(postgres: PostgresServer) -> Iterator[CoreStack]:
    """Two cells behind one app server and one gateway, shared by the session."""
    stack = new_stack(postgres)
    try:
        app = stack.start_app([1, 2])
        stack.start_gateway({1: [app.url], 2: [app.url]})
        yield stack
    finally:
        stack.close()


@pytest.fixture
def core_factory(postgres: PostgresServer) -> Iterator[Callable[[], CoreStack]]:
    """Private stacks with fresh databases, stopped after the test."""
    made: list[CoreStack] = []

    def make() -> CoreStack:
        made.append(new_stack(postgres))
        return made[-1]

    yield make
    for stack in made:
        stack.close()
