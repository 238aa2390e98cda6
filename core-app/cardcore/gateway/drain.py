"""Cells drained for maintenance, and how many requests each cell has in flight at this gateway.

Owns: the drain file ``{"drained_cells": [2]}`` named in the settings (read at start and again
whenever its modification time or size changes, checked every ``poll_s``), the set of drained
cells, and the in-flight count per cell that an operator waits on before maintenance. Never: fail
the gateway over a bad drain file (it keeps the last good set and logs why), or block a request.

A file is the control, not an HTTP endpoint, so every worker and every restart of a gateway sees
the same set, and a drain survives the gateway's restart; on Kubernetes it is a mounted ConfigMap.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Iterable

import msgspec

log = logging.getLogger("cardcore.gateway.drain")


class DrainFile(msgspec.Struct, forbid_unknown_fields=True):
    drained_cells: list[int] = []


_decode = msgspec.json.Decoder(DrainFile).decode


class DrainFileError(ValueError):
    """The drain file is unreadable or names a cell that does not exist."""


def read_drain_file(path: str, cells: Iterable[int]) -> frozenset[int]:
    """The drained cells the file names; a missing file drains nothing."""
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return frozenset()
    except OSError as error:
        raise DrainFileError(f"{path}: cannot read: {error.strerror or error}") from None
    try:
        wanted = _decode(data).drained_cells
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise DrainFileError(f"{path}: {error}") from None
    known = set(cells)
    unknown = sorted(set(wanted) - known)
    if unknown:
        raise DrainFileError(f"{path}: drained_cells: no cell {unknown[0]} (cells are 1..{len(known)})")
    return frozenset(wanted)


class DrainControl:
    def __init__(self, path: str | None, poll_s: float, cells: Iterable[int]) -> None:
        self.path = path
        self.poll_s = poll_s
        self.cells = list(cells)
        self.drained: frozenset[int] = frozenset()
        self._in_flight: dict[int, int] = {}
        self._seen: tuple[int, int] | None = None
        self._task: asyncio.Task[None] | None = None

    def refresh(self) -> None:
        """Read the file again if it changed since the last look."""
        if self.path is None:
            return
        try:
            stat = os.stat(self.path)
            seen: tuple[int, int] | None = (stat.st_mtime_ns, stat.st_size)
        except FileNotFoundError:
            seen = None
        if seen == self._seen:
            return
        try:
            drained = read_drain_file(self.path, self.cells)
        except DrainFileError as error:
            log.error(
                "drain file ignored, keeping cells %s drained: %s", sorted(self.drained) or "none", error
            )
            self._seen = seen
            return
        self._seen = seen
        if drained != self.drained:
            log.info(
                "drained cells now %s (were %s)", sorted(drained) or "none", sorted(self.drained) or "none"
            )
        self.drained = drained

    async def start(self) -> None:
        self.refresh()
        if self.path is not None and self._task is None:
            self._task = asyncio.create_task(self._poll_loop(), name="drain-file")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.refresh()

    def begin(self, cell: int | None) -> None:
        if cell is not None:
            self._in_flight[cell] = self._in_flight.get(cell, 0) + 1

    def end(self, cell: int | None) -> None:
        if cell is not None:
            self._in_flight[cell] -= 1

    def in_flight(self, cell: int) -> int:
        return self._in_flight.get(cell, 0)


STATUS_TIMEOUT_S = 3.0


def status(url: str, cell: int, timeout_s: float = STATUS_TIMEOUT_S) -> dict[str, object]:
    """What one gateway reports for ``cell`` on its /readyz (``url``): ``{"drained": bool,
    "in_flight": n}``. Raises OSError when the gateway does not answer and ValueError when its
    answer is not JSON or does not know the cell."""
    import json
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            body = response.read()
    except urllib.error.HTTPError as error:  # 503 when not ready: the body still says it
        body = error.read()
    report = (json.loads(body).get("cells") or {}).get(str(cell))
    if not isinstance(report, dict):
        raise ValueError(f"the gateway at {url} reports no cell {cell}")
    return {"drained": bool(report.get("drained")), "in_flight": int(report.get("in_flight", 0))}


def main(argv: list[str] | None = None) -> int:
    """``python -m cardcore.gateway.drain --port P --cell N``: the drain state of one cell at the
    gateway on this host, as JSON (what the drain-cell runbook waits on inside a gateway pod)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(prog="python -m cardcore.gateway.drain", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--cell", type=int, required=True)
    args = parser.parse_args(argv)
    try:
        print(json.dumps(status(f"http://{args.host}:{args.port}/readyz", args.cell)))
    except (OSError, ValueError) as error:
        print(f"drain status of cell {args.cell} at {args.host}:{args.port}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
