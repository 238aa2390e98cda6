"""SLA gates: the verdict of a run from Locust's statistics, per traffic class and per cell.

Owns: the figures a run is judged by (requests, failures, achieved transactions per second,
p50 / p99) for the whole run, each traffic class and each cell, and the gates: error ratio at
most ``--max-error-ratio``, p99 at most ``--max-p99-ms``, achieved / offered at least
``--min-tps-ratio`` for each class offered. Achieved counts successful requests over the
seconds the class was running, the first and last (partial) seconds left out.
Never: count a decline as a failure (the traffic module judged each answer already); pass a run
that completed no request.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from locust.stats import RequestStats, StatsEntry

from watertight_load.options import LoadOptions
from watertight_load.traffic import TRAFFIC_CLASSES, parse_request_name, traffic_class


@dataclass(frozen=True)
class Figures:
    requests: int
    failures: int
    tps: float  # successful requests per second
    p50_ms: float
    p99_ms: float

    @property
    def error_ratio(self) -> float:
        return self.failures / self.requests if self.requests else 0.0

    def line(self) -> str:
        return (
            f"{self.tps:.1f}/s achieved, {self.requests} requests, {self.failures} failed "
            f"({self.error_ratio:.2%}), p50 {self.p50_ms:.0f} ms, p99 {self.p99_ms:.0f} ms"
        )


@dataclass
class Verdict:
    passed: bool
    reasons: list[str]
    offered_tps: dict[str, float]
    total: Figures
    classes: dict[str, Figures]
    cells: dict[int, Figures]
    thresholds: dict[str, float] = field(default_factory=dict)

    def as_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "reasons": self.reasons,
            "thresholds": self.thresholds,
            "offered_tps": self.offered_tps,
            "total": asdict(self.total),
            "classes": {name: asdict(figures) for name, figures in self.classes.items()},
            "cells": {str(cell): asdict(figures) for cell, figures in self.cells.items()},
            "load": {
                "financial_tps": round(self.classes["financial"].tps, 1),
                "nonfinancial_tps": round(self.classes["nonfinancial"].tps, 1),
                "p50_ms": self.total.p50_ms,
                "p99_ms": self.total.p99_ms,
                "errors": self.total.failures,
            },
        }


def _successes_per_second(entry: StatsEntry) -> float:
    seconds = entry.num_reqs_per_sec
    if not seconds:
        return 0.0
    first, last = min(seconds), max(seconds)
    if last - first >= 3:
        first, last = first + 1, last - 1  # the first and last seconds are partial
    done = sum(seconds.get(t, 0) - entry.num_fail_per_sec.get(t, 0) for t in range(first, last + 1))
    return done / (last - first + 1)


def figures_of(stats: RequestStats, entries: Iterable[StatsEntry]) -> Figures:
    merged = StatsEntry(stats, "merged", "", use_response_times_cache=False)
    for entry in entries:
        merged.extend(entry)
    return Figures(
        requests=merged.num_requests,
        failures=merged.num_failures,
        tps=_successes_per_second(merged),
        p50_ms=float(merged.get_response_time_percentile(0.5) if merged.num_requests else 0),
        p99_ms=float(merged.get_response_time_percentile(0.99) if merged.num_requests else 0),
    )


def evaluate(stats: RequestStats, options: LoadOptions) -> Verdict:
    entries = list(stats.entries.values())
    by_class = {
        name: [e for e in entries if traffic_class(e.method or "", e.name) == name]
        for name in TRAFFIC_CLASSES
    }
    cells = sorted({cell for e in entries if (cell := parse_request_name(e.name)[1]) is not None})
    verdict = Verdict(
        passed=True,
        reasons=[],
        offered_tps=options.offered_tps(),
        total=figures_of(stats, entries),
        classes={name: figures_of(stats, group) for name, group in by_class.items()},
        cells={
            cell: figures_of(stats, (e for e in entries if parse_request_name(e.name)[1] == cell))
            for cell in cells
        },
        thresholds={
            "max_error_ratio": options.max_error_ratio,
            "max_p99_ms": options.max_p99_ms,
            "min_tps_ratio": options.min_tps_ratio,
        },
    )
    total = verdict.total
    if total.requests == 0:
        verdict.reasons.append("no request completed")
    if total.error_ratio > options.max_error_ratio:
        failing = [
            f"cell {cell}: {figures.failures} of {figures.requests} failed ({figures.error_ratio:.1%})"
            for cell, figures in verdict.cells.items()
            if figures.failures
        ]
        verdict.reasons.append(
            f"error ratio {total.error_ratio:.2%} above {options.max_error_ratio:.2%} "
            f"({total.failures} of {total.requests} requests failed; {'; '.join(failing) or 'no cell named'})"
        )
    if total.p99_ms > options.max_p99_ms:
        slowest = max(verdict.cells.items(), key=lambda item: item[1].p99_ms, default=None)
        where = f"; slowest cell {slowest[0]} at {slowest[1].p99_ms:.0f} ms" if slowest else ""
        verdict.reasons.append(f"p99 {total.p99_ms:.0f} ms above {options.max_p99_ms:.0f} ms{where}")
    for name, offered in verdict.offered_tps.items():
        achieved = verdict.classes[name].tps
        if offered > 0 and achieved < options.min_tps_ratio * offered:
            verdict.reasons.append(
                f"{name}: achieved {achieved:.1f}/s of {offered:.1f}/s offered "
                f"({achieved / offered:.0%} < {options.min_tps_ratio:.0%})"
            )
    verdict.passed = not verdict.reasons
    return verdict
