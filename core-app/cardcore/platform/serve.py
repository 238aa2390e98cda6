"""Run an ASGI app in this process on uvloop: one process per server, so the runtime's PID is the
server (kill -9 of that PID is the loss of that server).

The server is ``cardcore.platform.httpserver`` (socket, parsing and app on one thread); setting
``WATERTIGHT_HTTP_SERVER=granian`` serves with granian's embedded server instead, the server used
before, kept to compare the two on one machine (README, performance).

Never: fork workers (the topology counts and signals processes by PID).
"""

from __future__ import annotations

import asyncio
import importlib
import os
import signal
from collections.abc import Callable
from typing import Any

SERVER_ENV = "WATERTIGHT_HTTP_SERVER"
SERVERS = ("lean", "granian")


def load_factory(target: str) -> Callable[[], Any]:
    module_name, _, attribute = target.partition(":")
    factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attribute)
    return factory


def server_choice() -> str:
    choice = os.environ.get(SERVER_ENV, "lean") or "lean"
    if choice not in SERVERS:
        raise SystemExit(f"{SERVER_ENV}={choice!r}: must be one of {', '.join(SERVERS)}")
    return choice


def serve(target: str, host: str, port: int) -> None:
    """Serve ``module:factory`` on host:port until SIGTERM or SIGINT."""
    choice = server_choice()
    app = load_factory(target)()
    if choice == "lean":
        from cardcore.platform import httpserver

        httpserver.run(app, host, port)
        return

    from granian.constants import HTTPModes, Interfaces
    from granian.server.embed import Server

    async def main() -> None:
        server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            http=HTTPModes.http1,
            backlog=2048,
            log_access=False,
        )
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, server.stop)
        await server.serve()

    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main())
    else:
        uvloop.run(main())
