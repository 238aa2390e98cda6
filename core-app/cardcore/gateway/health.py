"""Which app server can serve which cell right now, from polling each one's ``GET /readyz``.

Owns: one poll task per upstream base URL (every ``interval``, each poll bounded by ``timeout``),
the (upstream, cell) health table, round-robin choice among a cell's healthy upstreams, and each
cell's leader site as the app servers report it. Never: block a request on a poll, or let one
upstream's poll wait on another's.

The app server's readyz body (status 200 when any cell is ready, else 503; read either way)::

    {"ready": true, "site": "prod",
     "cells": {"1": {"ready": true, "leader_site": "prod"},
               "2": {"ready": false, "leader_site": null}}}

(upstream, cell) is healthy when the last poll of the upstream succeeded and it reported that
cell ready; a connection refused on the request path marks the upstream down until its next
successful poll. A poll that only timed out counts against an upstream when ``POLL_MISSES_MAX``
in a row did (as a load balancer's fall count): on a starved machine one slow answer marked both
app servers down at once and a cell answered 503 with both alive; a refused or broken poll, or an
answer that says not ready, counts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time

import msgspec

from cardcore.platform.metrics import Gauge
from cardcore.platform.upstream import UpstreamError, UpstreamPool, UpstreamTimeout

log = logging.getLogger("cardcore.gateway.health")

POLL_MISSES_MAX = 2


class CellReport(msgspec.Struct):
    ready: bool = False
    leader_site: str | None = None


class ReadyReport(msgspec.Struct):
    ready: bool = False
    site: str | None = None
    cells: dict[str, CellReport] = {}


_decode_report = msgspec.json.Decoder(ReadyReport).decode


class Upstream:
    """One app server base URL: its request pool, its probe connection and its last report."""

    def __init__(self, url: str, cells: list[int], pool: UpstreamPool, probe: UpstreamPool) -> None:
        self.url = url
        self.cells = cells  # the cells this gateway sends to it (configured)
        self.pool = pool
        self.probe = probe
        self.ok = False  # last poll succeeded and no connection was refused since
        self.site: str | None = None
        self.ready_cells: frozenset[int] = frozenset()
        self.leader_sites: dict[int, str | None] = {}
        self.last_error = "not polled yet"
        self.misses = 0  # polls in a row that timed out
        self.last_ok_at = 0.0

    def healthy_for(self, cell: int) -> bool:
        return self.ok and cell in self.ready_cells


class HealthMonitor:
    def __init__(
        self,
        cell_upstreams: dict[int, list[str]],
        *,
        interval: float,
        timeout: float,
        connect_timeout: float,
        pool_size_max: int,
        gauge: Gauge | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.interval = interval
        self.timeout = timeout
        self.gauge = gauge
        self.upstreams: dict[str, Upstream] = {}
        self.by_cell: dict[int, list[Upstream]] = {}
        for cell in sorted(cell_upstreams):
            for url in cell_upstreams[cell]:
                upstream = self.upstreams.get(url)
                if upstream is None:
                    pool = UpstreamPool(
                        url, size_max=pool_size_max, connect_timeout=connect_timeout, ssl_context=ssl_context
                    )
                    probe = UpstreamPool(
                        url,
                        size_max=1,
                        connect_timeout=min(connect_timeout, timeout),
                        ssl_context=ssl_context,
                    )
                    upstream = self.upstreams[url] = Upstream(url, [], pool, probe)
                upstream.cells.append(cell)
                self.by_cell.setdefault(cell, []).append(upstream)
        self._all = list(self.upstreams.values())
        self._rr: dict[int, int] = dict.fromkeys(self.by_cell, 0)
        self._rr_any = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._publish_all()

    # -- choosing -------------------------------------------------------------------------------

    def candidates(self, cell: int, limit: int = 2) -> list[Upstream]:
        """Up to ``limit`` healthy upstreams of ``cell``; empty when the cell is down.

        Upstreams in the site that leads the cell come first (round-robin among them): one app
        server then writes each cell, so its group commits are as large as they can be, and
        nothing crosses a site it need not. The others follow as the second choice."""
        ring = self.by_cell.get(cell)
        if not ring:
            return []
        start = self._rr[cell]
        self._rr[cell] = start + 1
        size = len(ring)
        healthy = [ring[(start + offset) % size] for offset in range(size)]
        healthy = [u for u in healthy if u.ok and cell in u.ready_cells]
        healthy.sort(key=lambda u: u.site is None or u.site != u.leader_sites.get(cell))
        return healthy[:limit]

    def any_candidates(self, limit: int = 2) -> list[Upstream]:
        """Upstreams for requests of no particular cell: ones with a ready cell first, then any alive."""
        ring = self._all
        start = self._rr_any
        self._rr_any = start + 1
        size = len(ring)
        ordered = [ring[(start + offset) % size] for offset in range(size)]
        chosen = [u for u in ordered if u.ok and u.ready_cells]
        chosen += [u for u in ordered if u.ok and not u.ready_cells]
        return chosen[:limit]

    def cell_ready(self, cell: int) -> bool:
        return any(u.ok and cell in u.ready_cells for u in self.by_cell.get(cell, ()))

    def leader_site(self, cell: int) -> str | None:
        """The cell's leader site as reported by a live upstream; ready reports win."""
        fallback: str | None = None
        for upstream in self.by_cell.get(cell, ()):
            if not upstream.ok:
                continue
            site = upstream.leader_sites.get(cell)
            if site is None:
                continue
            if cell in upstream.ready_cells:
                return site
            fallback = fallback or site
        return fallback

    def mark_down(self, upstream: Upstream, reason: str) -> None:
        if upstream.ok:
            log.warning("upstream %s: down until its next successful poll: %s", upstream.url, reason)
        upstream.ok = False
        upstream.last_error = reason
        self._publish(upstream)

    # -- polling --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Poll every upstream once (bounded by the poll timeout), then keep polling in the background."""
        if self._tasks:
            return
        await asyncio.gather(*(self.poll(upstream) for upstream in self._all))
        for upstream in self._all:
            if not upstream.ok:
                log.warning("upstream %s: not reachable at start: %s", upstream.url, upstream.last_error)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._poll_loop(upstream)) for upstream in self._all]

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for upstream in self._all:
            await upstream.pool.close()
            await upstream.probe.close()

    async def _poll_loop(self, upstream: Upstream) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time() + self.interval
        while True:
            await asyncio.sleep(max(0.0, next_at - loop.time()))
            next_at = loop.time() + self.interval
            try:
                await self.poll(upstream)
            except asyncio.CancelledError:
                raise
            except Exception as error:  # a bug here must not stop the polling of this upstream
                log.exception("upstream %s: poll failed unexpectedly", upstream.url)
                self._set_down(upstream, f"poll failed: {error!r}")

    async def poll(self, upstream: Upstream) -> None:
        try:
            response = await upstream.probe.request("GET", "/readyz", seconds=self.timeout)
        except UpstreamTimeout as error:
            upstream.misses += 1
            if upstream.misses >= POLL_MISSES_MAX or not upstream.ok:
                self._set_down(upstream, f"{error} ({upstream.misses} polls in a row)")
            return
        except UpstreamError as error:
            self._set_down(upstream, str(error))
            return
        upstream.misses = 0
        if response.status not in (200, 503):
            self._set_down(upstream, f"readyz answered {response.status}")
            return
        try:
            report = _decode_report(response.body)
        except msgspec.DecodeError as error:
            self._set_down(upstream, f"readyz body not understood: {error}")
            return
        ready: set[int] = set()
        leaders: dict[int, str | None] = {}
        for key, cell_report in report.cells.items():
            if not key.isdigit():
                continue
            cell = int(key)
            if cell not in upstream.cells:
                continue
            leaders[cell] = cell_report.leader_site
            if cell_report.ready:
                ready.add(cell)
        was = (upstream.ok, upstream.ready_cells)
        upstream.ok = True
        upstream.site = report.site
        upstream.ready_cells = frozenset(ready)
        upstream.leader_sites = leaders
        upstream.last_error = ""
        upstream.last_ok_at = time.time()
        if was != (True, upstream.ready_cells):
            log.info("upstream %s: alive, ready cells %s", upstream.url, sorted(ready) or "none")
        self._publish(upstream)

    def _set_down(self, upstream: Upstream, reason: str) -> None:
        if upstream.ok:
            log.warning("upstream %s: unhealthy: %s", upstream.url, reason)
        upstream.ok = False
        upstream.last_error = reason
        self._publish(upstream)

    def _publish(self, upstream: Upstream) -> None:
        if self.gauge is None:
            return
        for cell in upstream.cells:
            self.gauge.set((upstream.url, str(cell)), 1 if upstream.healthy_for(cell) else 0)

    def _publish_all(self) -> None:
        for upstream in self._all:
            self._publish(upstream)

    def describe(self) -> dict[str, dict[str, object]]:
        """Per upstream: ok, site, ready cells, last error (for readyz and status)."""
        return {
            u.url: {
                "ok": u.ok,
                "site": u.site,
                "cells": u.cells,
                "ready_cells": sorted(u.ready_cells),
                "last_error": u.last_error or None,
            }
            for u in self._all
        }
