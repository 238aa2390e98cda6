"""Chaos Toolkit controls of the watertight extension: a marks file the drill reads to place the
fault and the heal on the load timeline.

Declared in an experiment as::

    "controls": [{"name": "watertight-marks", "provider": {"type": "python",
        "module": "watertight.chaos.controls", "arguments": {"marks_path": "${marks_path}"}}}]

Each hook appends one JSON line ``{"t", "event", "name", "activity_type", "status"}`` to
``marks_path`` (default ``<run dir>/chaos/marks.jsonl``, the run dir taken from the configuration
key ``run_dir`` or $WATERTIGHT_RUN_DIR): experiment, method and rollbacks begin and end, and every
activity's start and end, with the wall-clock time (what the load timeline uses). Never: change
the experiment or fail it; a mark that cannot be written is logged and skipped.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watertight.chaos import targets

__all__ = [
    "after_activity_control",
    "after_experiment_control",
    "after_method_control",
    "after_rollback_control",
    "before_activity_control",
    "before_experiment_control",
    "before_method_control",
    "before_rollback_control",
]

MARKS_FILE = "marks.jsonl"
logger = logging.getLogger("chaostoolkit")


def marks_path_of(marks_path: str | None, configuration: Mapping[str, Any] | None) -> Path:
    if marks_path:
        return Path(marks_path)
    run_dir = str((configuration or {}).get("run_dir") or "") or None
    return targets.run_dir_of(run_dir) / "chaos" / MARKS_FILE


def _mark(
    event: str,
    context: Mapping[str, Any] | None,
    marks_path: str | None,
    configuration: Mapping[str, Any] | None,
    status: str | None = None,
) -> None:
    context = context or {}
    record = {
        "t": time.time(),
        "event": event,
        "name": context.get("name") or context.get("title"),
        "activity_type": context.get("type"),
        "status": status,
    }
    path = marks_path_of(marks_path, configuration)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, (json.dumps(record) + "\n").encode())
        finally:
            os.close(descriptor)
    except OSError as error:
        logger.warning(f"watertight marks: cannot write {path}: {error.strerror}")


def _status(state: Any) -> str | None:
    if isinstance(state, Mapping):
        status = state.get("status")
        return str(status) if status is not None else None
    return None


def before_experiment_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the start of the experiment."""
    _mark("experiment-start", context, marks_path, configuration)


def after_experiment_control(
    context: dict[str, Any],
    state: Any = None,
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the end of the experiment with its journal's status."""
    _mark("experiment-end", context, marks_path, configuration, _status(state))


def before_method_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the start of the method (the fault comes next)."""
    _mark("method-start", {"name": "method"}, marks_path, configuration)


def after_method_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the end of the method."""
    _mark("method-end", {"name": "method"}, marks_path, configuration)


def before_rollback_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the start of the rollbacks."""
    _mark("rollback-start", {"name": "rollbacks"}, marks_path, configuration)


def after_rollback_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the end of the rollbacks."""
    _mark("rollback-end", {"name": "rollbacks"}, marks_path, configuration)


def before_activity_control(
    context: dict[str, Any],
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the start of an activity (the first action of the method is the fault)."""
    _mark("activity-start", context, marks_path, configuration)


def after_activity_control(
    context: dict[str, Any],
    state: Any = None,
    marks_path: str | None = None,
    configuration: dict[str, Any] | None = None,
    **_: Any,
) -> None:
    """Mark the end of an activity with its run's status (succeeded / failed)."""
    _mark("activity-end", context, marks_path, configuration, _status(state))


def read_marks(path: Path) -> list[dict[str, Any]]:
    """Every mark of the file, in order (a missing file has none)."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        return []
    return [json.loads(line) for line in lines if line.strip()]


def fault_injected_at(marks: list[dict[str, Any]]) -> float | None:
    """When the first action of the method started: the fault's time on the load timeline."""
    in_method = False
    for mark in marks:
        if mark["event"] == "method-start":
            in_method = True
        elif in_method and mark["event"] == "activity-start" and mark.get("activity_type") == "action":
            return float(mark["t"])
    return None
