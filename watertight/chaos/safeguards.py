"""Chaos Toolkit control of the watertight extension: safeguards that stop an experiment when the
system breaks worse than planned, and the kill switch of every drill in flight on a topology.

Declared in every experiment of chaos/experiments (so a plain ``chaos run`` has it too)::

    "controls": [{"name": "watertight-safeguards", "provider": {"type": "python",
        "module": "watertight.chaos.safeguards", "arguments": {"limits": "${safeguards}",
        "timeline_path": "${timeline_path}", "ack_log_path": "${ack_log_path}"}}}]

``limits`` is ``KEY=VALUE,...`` (from $WATERTIGHT_SAFEGUARDS, or ``watertight drill --safeguard``):

| limit | crossed when, during the method |
| --- | --- |
| ``unaffected_error_ratio=R`` | the cells the fault must not touch fail more than R of their requests over the last ``window_s`` (default 5 s; needs the load's timeline) |
| ``missing_acknowledged=N`` | more than N acknowledged transactions of the ack log are not in their cell's ledger (a cell whose primary cannot be reached is not judged until it can) |
| ``writable_primaries=N`` | a cell has more than N writable primaries (asked of every member) |

When one is crossed, or when the stop file (``<run dir>/chaos/stop``, written by ``watertight drill
--stop``) is newer than the experiment, it writes why and when to ``<marks dir>/aborted.json`` and
asks Chaos Toolkit to leave the method now, gracefully (``chaoslib.exit.exit_gracefully``: the
rollbacks run, the journal says "interrupted"). Owns: one watcher thread per experiment, from the
method's start to the rollbacks' start. Never: run the rollbacks itself, watch outside the method,
or check more often than ``CHECK_INTERVAL_S``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watertight import faults
from watertight.chaos import controls, probes, targets

__all__ = [
    "after_experiment_control",
    "before_experiment_control",
    "before_method_control",
    "before_rollback_control",
]

CHECK_INTERVAL_S = 0.5
LEDGER_CHECK_INTERVAL_S = 2.0
ABORT_FILE = "aborted.json"
STOP_FILE = "stop"
WINDOW_S_DEFAULT = 5.0
LIMIT_NAMES = ("unaffected_error_ratio", "missing_acknowledged", "writable_primaries", "window_s")

logger = logging.getLogger("chaostoolkit")


class SafeguardError(ValueError):
    """A limit is not one of LIMIT_NAMES or not a number; the message names it."""


def parse_limits(text: str | Mapping[str, Any] | None) -> dict[str, float]:
    """``"unaffected_error_ratio=0.005,writable_primaries=1"`` (or a mapping) as numbers."""
    if not text:
        return {}
    items = (
        text.items()
        if isinstance(text, Mapping)
        else (part.split("=", 1) for part in str(text).split(",") if part.strip())
    )
    limits: dict[str, float] = {}
    for item in items:
        if len(item) != 2:
            raise SafeguardError(f"safeguard {item[0]!r}: expected NAME=LIMIT")
        name, value = str(item[0]).strip(), item[1]
        if name not in LIMIT_NAMES:
            raise SafeguardError(f"unknown safeguard {name!r}; known: {', '.join(LIMIT_NAMES)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise SafeguardError(f"safeguard {name}: {value!r} is not a number") from None
        if number < 0:
            raise SafeguardError(f"safeguard {name}: must not be negative, got {value}")
        limits[name] = number
    return limits


def stop_path(run_dir: Path) -> Path:
    """The kill switch of every drill on a run directory's topology."""
    return run_dir / "chaos" / STOP_FILE


def abort_path(marks_path: Path) -> Path:
    return marks_path.parent / ABORT_FILE


def read_abort(marks_path: Path) -> dict[str, Any] | None:
    """Why and when the safeguards stopped the experiment whose marks are at ``marks_path``."""
    try:
        loaded: dict[str, Any] = json.loads(abort_path(marks_path).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return loaded


@dataclass
class Watch:
    limits: dict[str, float]
    run_dir: Path
    target: str
    marks: Path
    timeline: Path | None
    ack_log: Path | None
    started: float
    unaffected: list[int] = field(default_factory=list)
    stopping: threading.Event = field(default_factory=threading.Event)
    checked_keys: set[str] = field(default_factory=set)
    missing: set[str] = field(default_factory=set)
    last_ledger_check: float = 0.0

    def breach(self) -> str | None:
        """Why the experiment must stop now, or None."""
        stop = stop_path(self.run_dir)
        if stop.exists() and stop.stat().st_mtime >= self.started - 1.0:
            return "stopped by `watertight drill --stop` (the kill switch)"
        limit = self.limits.get("writable_primaries")
        if limit is not None:
            counts = probes.writable_primaries_by_cell(self.target, str(self.run_dir))
            over = {cell: n for cell, n in counts.items() if n > limit}
            if over:
                return f"writable primaries {over} above the safeguard of {limit:g} per cell"
        limit = self.limits.get("unaffected_error_ratio")
        if limit is not None and self.timeline is not None and self.unaffected:
            window = self.limits.get("window_s", WINDOW_S_DEFAULT)
            ratio = probes.load_error_ratio(str(self.timeline), window, self.unaffected)
            if ratio > limit:
                cells = ", ".join(f"cell-{c}" for c in self.unaffected)
                return f"error ratio {ratio:.4f} of the cells the fault must not touch ({cells}) over {window:g} s, above the safeguard of {limit:g}"
        limit = self.limits.get("missing_acknowledged")
        now = time.monotonic()
        if (
            limit is not None
            and self.ack_log is not None
            and now - self.last_ledger_check >= LEDGER_CHECK_INTERVAL_S
        ):
            self.last_ledger_check = now
            self.check_ledgers()
            if len(self.missing) > limit:
                shown = ", ".join(sorted(self.missing)[:3])
                return f"{len(self.missing)} acknowledged transactions missing from the ledgers mid-run ({shown}), above the safeguard of {limit:g}"
        return None

    def check_ledgers(self) -> None:
        """Look the ack log's new entries up in their cells' ledgers (entries already found are
        not asked again; a cell that cannot be reached now is asked again next time)."""
        from watertight_load.ack_log import read_ack_log

        from watertight import drill

        assert self.ack_log is not None
        runtime = targets.runtime(self.target, str(self.run_dir))
        keys_by_cell: dict[int, list[str]] = {}
        for entry in read_ack_log(self.ack_log):
            key = str(entry.get("idempotency_key", ""))
            if key and key not in self.checked_keys:
                keys_by_cell.setdefault(int(entry["cell"]), []).append(key)
        for cell, keys in keys_by_cell.items():
            try:
                found = asyncio.run(drill.keys_in_ledgers(runtime, {cell: keys}))
            except Exception:  # the cell's primary is not reachable now: judge it later
                continue
            self.checked_keys.update(found)
            self.missing.update(key for key in keys if key not in found)
            self.missing.difference_update(found)

    def run(self) -> None:
        while not self.stopping.wait(CHECK_INTERVAL_S):
            try:
                reason = self.breach()
            except Exception as error:  # a probe that fails is a gap in the watch, not a breach
                logger.warning(f"watertight safeguards: a check failed: {error}")
                continue
            if reason is not None:
                abort(self.marks, reason)
                return


def abort(marks: Path, reason: str) -> None:
    """Say why, then leave the method gracefully: Chaos Toolkit runs the rollbacks."""
    from chaoslib.exit import exit_gracefully

    record = {"reason": reason, "at": time.time()}
    path = abort_path(marks)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")
    logger.error(f"watertight safeguards: aborting the experiment: {reason}")
    exit_gracefully()


# the watch of the experiment this process runs (Chaos Toolkit runs one per process)
_WATCHES: dict[int, Watch] = {}


def before_experiment_control(
    context: dict[str, Any],
    limits: str | None = None,
    timeline_path: str | None = None,
    ack_log_path: str | None = None,
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Read the limits (an unknown one fails the experiment before anything is broken)."""
    configuration = configuration or {}
    run_dir = targets.run_dir_of(str(configuration.get("run_dir") or "") or None)
    marks = controls.marks_path_of(marks_path or str(configuration.get("marks_path") or ""), configuration)
    try:
        abort_path(marks).unlink()
    except FileNotFoundError:
        pass
    _WATCHES[0] = Watch(
        limits=parse_limits(limits or os.environ.get("WATERTIGHT_SAFEGUARDS")),
        run_dir=run_dir,
        target=str(configuration.get("target") or targets.LOCAL),
        marks=marks,
        timeline=Path(timeline_path) if timeline_path else None,
        ack_log=Path(ack_log_path) if ack_log_path else None,
        started=time.time(),
    )


def before_method_control(
    context: dict[str, Any], configuration: dict[str, Any] | None = None, **_: Any
) -> None:
    """Start watching: the fault comes next. The cells the fault must not touch are those the
    experiment's ``watertight_fault`` does not interrupt, given who leads each cell now."""
    watch = _WATCHES.get(0)
    if watch is None:
        return
    raw = (configuration or {}).get("watertight_fault")
    if isinstance(raw, Mapping) and "kind" in raw:
        try:
            runtime = targets.runtime(watch.target, str(watch.run_dir))
            leaders = {cell: runtime.cell_view(cell)["leader_site"] for cell in runtime.topology.cell_numbers}
            fault = faults.Fault.from_configuration(raw)
            affected = fault.affected_cells(leaders)
            watch.unaffected = [cell for cell in leaders if cell not in affected]
        except Exception as error:
            logger.warning(
                f"watertight safeguards: cannot tell which cells the fault must not touch: {error}"
            )
    threading.Thread(target=watch.run, name="watertight-safeguards", daemon=True).start()


def before_rollback_control(context: dict[str, Any], **_: Any) -> None:
    """Stop watching: what the rollbacks do is theirs."""
    watch = _WATCHES.get(0)
    if watch is not None:
        watch.stopping.set()


def after_experiment_control(context: dict[str, Any], state: Any = None, **_: Any) -> None:
    watch = _WATCHES.pop(0, None)
    if watch is not None:
        watch.stopping.set()
