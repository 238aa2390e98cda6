"""Run an ASGI app in this process on uvloop: one process per server, so the runtime's PID is the
server (kill -9 of that PID is the loss of that server).

The server is ``cardcore.platform.httpserver`` (socket, parsing and app on one thread); setting
``WATERTIGHT_HTTP_SERVER=granian`` serves with granian's embedded server instead, the server used
before, kept to compare the two on one machine (README, performance).

Owns: the connection bounds both servers enforce (``ServeLimits``: connections in total, the time
to read a request's headers, after which a client that never finishes them is disconnected) and
the open-files limit they need.
Never: fork workers (the topology counts and signals processes by PID).
"""

from __future__ import annotations

import importlib
import logging
import os
import resource
from collections.abc import Callable
from typing import Any

from cardcore.platform.admission import ServeLimits
from cardcore.platform.tls import TlsListen, server_context

log = logging.getLogger("cardcore.serve")
FILES_SPARE = 512  # open files beyond the client connections: upstreams, databases, logs
SERVER_ENV = "WATERTIGHT_HTTP_SERVER"
SERVERS = ("lean", "granian")


def _connections_allowed(wanted: int) -> int:
    """Raise the open-files limit as far as the hard limit allows; the connections that fit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted + FILES_SPARE if hard == resource.RLIM_INFINITY else min(hard, wanted + FILES_SPARE)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    allowed = wanted if soft == resource.RLIM_INFINITY else max(64, min(wanted, soft - FILES_SPARE))
    if allowed < wanted:
        log.warning("open files limited to %d: at most %d client connections (not %d)", soft, allowed, wanted)
    return allowed


def load_factory(target: str) -> Callable[[], Any]:
    module_name, _, attribute = target.partition(":")
    factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attribute)
    return factory


def server_choice() -> str:
    choice = os.environ.get(SERVER_ENV, "lean") or "lean"
    if choice not in SERVERS:
        raise SystemExit(f"{SERVER_ENV}={choice!r}: must be one of {', '.join(SERVERS)}")
    return choice


def serve(
    target: str, host: str, port: int, limits: ServeLimits | None = None, tls: TlsListen | None = None
) -> None:
    """Serve ``module:factory`` on host:port (and with ``tls``, with TLS on its port too) until
    SIGTERM or SIGINT."""
    choice = server_choice()
    if tls is not None and choice != "lean":
        raise SystemExit(
            f"{SERVER_ENV}={choice}: serves one listener, and these settings ask for a TLS one too "
            f"(port {tls.port}); unset {SERVER_ENV} to serve both"
        )
    limits = limits or ServeLimits()
    connections_max = _connections_allowed(limits.connections_max)
    app = load_factory(target)()
    if choice == "lean":
        from cardcore.platform import httpserver

        httpserver.run(
            app,
            host,
            port,
            connections_max=connections_max,
            header_read_timeout_s=limits.header_read_timeout_ms / 1000,
            connections_per_client_max=min(limits.connections_per_client_max, connections_max),
            tls=None if tls is None else (tls.port, server_context(tls.cert_file, tls.key_file)),
        )
        return

    from granian.constants import HTTPModes, Interfaces
    from granian.http import HTTP1Settings
    from granian.server.embed import Server

    from cardcore.platform.httpserver import run_until_signalled

    run_until_signalled(
        lambda: Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.ASGI,
            http=HTTPModes.http1,
            backlog=2048,
            # granian holds one permit per connection from accept to close: the total bound
            backpressure=connections_max,
            # a client that does not send a request's headers in time (or stays idle that long
            # between requests) is disconnected, and its permit freed
            http1_settings=HTTP1Settings(header_read_timeout=limits.header_read_timeout_ms),
            log_access=False,
        )
    )
