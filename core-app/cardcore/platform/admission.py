"""Hostile and careless clients: what a server lets in, and for how long it waits on a client.

Owns: the serving limits (``ServeLimits``: connections in total, the time to read a request's
headers, both enforced by the HTTP server, cardcore.platform.httpserver or granian, see
cardcore.platform.serve; the time to read its body; requests in flight per client
address and in total) and ``Admission``, which sheds the requests above the in-flight bounds at
once (503 ``overloaded`` with Retry-After) instead of queueing them, so a client that opens many
requests and never finishes them cannot starve the others. The probes (``/healthz``,
``/readyz``) are never shed: an orchestrator must see the process alive while it sheds.

Connections are bounded by the HTTP server, before a request's headers arrive: in total
(``connections_max``, far above what it takes to hold the normal load), per client address
(``connections_per_client_max``: the lean server answers a connection beyond it 503 and closes it;
granian, the A/B alternative, has no such bound), and in time (the header read time: a connection
whose headers do not all arrive in it is closed).
Never: read a body without a deadline; let the in-flight count of a client leak (``leave`` in a
``finally``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec

PROBES = frozenset({"/healthz", "/readyz"})


# the servers close a connection whose next request's headers have not all arrived this long after
# the last answer (or the connection): it bounds a slow client, and it is also the idle keep-alive
# timeout. Clients
# must not reuse a connection idle that long (the gateways' pools drop theirs after 10 s, httpx
# after 5 s): at 5 s, a client's 5 s expiry met the server's close in flight ("server
# disconnected without sending a response" in the tests on a loaded machine)
HEADER_READ_TIMEOUT_MS = 15_000


@dataclass(frozen=True, slots=True)
class ServeLimits:
    connections_max: int = 8192
    connections_per_client_max: int = 1024
    header_read_timeout_ms: int = HEADER_READ_TIMEOUT_MS
    body_read_timeout_ms: int = 5000
    requests_in_flight_max: int = 4096
    requests_per_client_max: int = 512


class ServeLimitSettings(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The serving limits as settings keys, shared by the gateway's and the app server's settings
    (each may change a default); ``serve_limits`` hands them to the server. Connections in total
    and per client address and the time to read a request's headers are the HTTP server's; the
    time to read its body and the requests in flight per client address and in total (above
    them: 503 overloaded at once) are ``Admission``'s."""

    connections_max: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 4096
    connections_per_client_max: Annotated[int, msgspec.Meta(ge=16, le=1_000_000)] = 1024
    header_read_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=600_000)] = HEADER_READ_TIMEOUT_MS
    body_read_timeout_ms: Annotated[int, msgspec.Meta(ge=100, le=600_000)] = 5000
    requests_in_flight_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 4096
    requests_per_client_max: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 1024

    def serve_limits(self) -> ServeLimits:
        return ServeLimits(
            connections_max=self.connections_max,
            connections_per_client_max=self.connections_per_client_max,
            header_read_timeout_ms=self.header_read_timeout_ms,
            body_read_timeout_ms=self.body_read_timeout_ms,
            requests_in_flight_max=self.requests_in_flight_max,
            requests_per_client_max=self.requests_per_client_max,
        )


SHED_BODY = msgspec.json.encode(
    {
        "error": {
            "code": "overloaded",
            "message": "too many requests in flight from this client or in total; retry in a second",
            "field": None,
        }
    }
)
BODY_TIMEOUT_CODE = "body_timeout"
# the client closed before its whole body arrived: part of a body is never handled as all of it
BODY_INCOMPLETE_CODE = "body_incomplete"


class Admission:
    """Requests in flight, per client address and in total; ``enter`` says whether one may start."""

    def __init__(self, limits: ServeLimits) -> None:
        self.total_max = limits.requests_in_flight_max
        self.per_client_max = limits.requests_per_client_max
        self.total = 0
        self.by_client: dict[str, int] = {}
        self.shed = 0

    def enter(self, scope: dict[str, Any]) -> str | None:
        """The client key when the request may go on (give it to ``leave`` after; "" for a probe,
        which is neither counted nor shed), None when it is shed."""
        if scope.get("path") in PROBES:
            return ""
        client = scope.get("client")
        key = str(client[0]) if client else "-"
        mine = self.by_client.get(key, 0)
        if self.total >= self.total_max or mine >= self.per_client_max:
            self.shed += 1
            return None
        self.total += 1
        self.by_client[key] = mine + 1
        return key

    def leave(self, key: str) -> None:
        if not key:
            return
        self.total -= 1
        left = self.by_client[key] - 1
        if left:
            self.by_client[key] = left
        else:
            del self.by_client[key]


async def within(seconds: float, read: Callable[[], Awaitable[bytes]]) -> bytes:
    """``read()`` (a request body), or TimeoutError after ``seconds``."""
    async with asyncio.timeout(seconds):
        return await read()
