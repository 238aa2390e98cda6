"""The drill's history over runs: every drill appends its figures to ``reports/history.jsonl``, and
``watertight report history`` prints, per experiment, the trend of RTO, detection time and TPS and
flags a regression.

Owns: the history line of one experiment's report (``entry``), appending it, reading the file
back, and judging the trend: an RTO more than ``REGRESSION_RATIO`` times the median of the
previous ``BASELINE_RUNS_MAX`` runs of the same experiment (per cell) is a regression; so is a
detection time that much slower. Never: rewrite or drop earlier lines; judge on fewer than
``BASELINE_RUNS_MIN`` earlier runs (a trend of one proves nothing).
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

HISTORY_FILE = "history.jsonl"
REGRESSION_RATIO = 1.2
BASELINE_RUNS_MAX = 10
BASELINE_RUNS_MIN = 2
SHOWN_RUNS_MAX = 10
LINE_BYTES_MAX = 16_384


def entry(report: Mapping[str, Any], finished_at: str, commit: str | None = None) -> dict[str, Any]:
    """The figures of one experiment's report worth following over runs."""
    load = report.get("load") or {}
    detection = report.get("detection") or {}
    return {
        "experiment": report.get("experiment"),
        "finished_at": finished_at,
        "commit": commit,
        "passed": bool(report.get("passed")),
        "aborted": bool(report.get("aborted")),
        "rto_seconds": {
            cell: seconds
            for cell, seconds in (report.get("rto_seconds") or {}).items()
            if cell in (report.get("affected_cells") or report.get("rto_seconds") or {})
        },
        "seconds_to_detect": detection.get("seconds_to_detect") if isinstance(detection, Mapping) else None,
        "financial_tps": load.get("financial_tps"),
        "nonfinancial_tps": load.get("nonfinancial_tps"),
        "p99_ms": load.get("p99_ms"),
        "missing": (report.get("rpo") or {}).get("missing"),
        "stale_reads": report.get("stale_reads"),
    }


def append(path: Path, line: Mapping[str, Any]) -> None:
    """Add one line (one write on an O_APPEND descriptor: concurrent drills never interleave)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    data = (json.dumps(line, separators=(",", ":"), default=str) + "\n").encode()
    assert len(data) <= LINE_BYTES_MAX, len(data)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(descriptor, data)
    finally:
        os.close(descriptor)


def read(path: Path) -> list[dict[str, Any]]:
    """Every line of the history (a torn last line, from a killed drill, is skipped)."""
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    found = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            found.append(json.loads(line))
        except ValueError as error:
            if number == len(lines):
                continue
            raise ValueError(f"{path}:{number}: not a JSON line: {error}") from None
    return found


def _regressed(value: float | None, earlier: list[float]) -> tuple[bool, float | None]:
    if value is None or len(earlier) < BASELINE_RUNS_MIN:
        return False, None
    baseline = statistics.median(earlier[-BASELINE_RUNS_MAX:])
    return value > REGRESSION_RATIO * baseline and value > baseline, baseline


def trends(entries: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per experiment: its runs in order and the regressions of its last run against the median
    of the runs before it (RTO per cell, detection time)."""
    by_experiment: dict[str, list[Mapping[str, Any]]] = {}
    for line in entries:
        by_experiment.setdefault(str(line.get("experiment")), []).append(line)
    result: dict[str, dict[str, Any]] = {}
    for experiment, runs in sorted(by_experiment.items()):
        runs = sorted(runs, key=lambda r: str(r.get("finished_at", "")))
        last, earlier = runs[-1], runs[:-1]
        regressions = []
        cells = sorted({cell for run in runs for cell in (run.get("rto_seconds") or {})})
        for cell in cells:
            previous = [
                float(r["rto_seconds"][cell])
                for r in earlier
                if isinstance((r.get("rto_seconds") or {}).get(cell), (int, float))
            ]
            value = (last.get("rto_seconds") or {}).get(cell)
            bad, baseline = _regressed(float(value) if isinstance(value, (int, float)) else None, previous)
            if bad:
                regressions.append(
                    f"RTO of {cell} {value} s is more than {REGRESSION_RATIO:g} x the median {baseline:g} s "
                    f"of the {min(len(previous), BASELINE_RUNS_MAX)} runs before"
                )
        previous = [
            float(r["seconds_to_detect"])
            for r in earlier
            if isinstance(r.get("seconds_to_detect"), (int, float))
        ]
        detect = last.get("seconds_to_detect")
        bad, baseline = _regressed(float(detect) if isinstance(detect, (int, float)) else None, previous)
        if bad:
            regressions.append(
                f"detection {detect} s is more than {REGRESSION_RATIO:g} x the median {baseline:g} s"
            )
        result[experiment] = {"runs": runs, "regressions": regressions}
    return result


def table(found: Mapping[str, Mapping[str, Any]]) -> str:
    """The trends for people: per experiment, its last runs and any regression."""
    parts = []
    for experiment, trend in found.items():
        runs = list(trend["runs"])
        parts.append(f"{experiment}: {len(runs)} runs")
        for run in runs[-SHOWN_RUNS_MAX:]:
            rto = ", ".join(
                f"{cell} {seconds} s" for cell, seconds in sorted((run.get("rto_seconds") or {}).items())
            )
            parts.append(
                f"  {run.get('finished_at', '?')}  {'passed' if run.get('passed') else 'FAILED'}"
                f"{' (aborted)' if run.get('aborted') else ''}  RTO {rto or '-'}"
                f"  detect {run.get('seconds_to_detect', '-')} s"
                f"  TPS {run.get('financial_tps', '-')} + {run.get('nonfinancial_tps', '-')}"
            )
        for regression in trend["regressions"]:
            parts.append(f"  REGRESSION: {regression}")
        parts.append("")
    return "\n".join(parts) if parts else "no drill has been recorded yet"
