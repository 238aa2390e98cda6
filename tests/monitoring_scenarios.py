"""Input series for ``promtool test rules``: a healthy two-cell topology as Prometheus scrapes it
every 2 s (cell 1 led by prod, cell 2 by samecity, sync standbys in the other center), and the
faults and slow degradations the rules of watertight.monitoring.rules must tell from it.

A scenario is the steady topology for ``STEADY_STEPS`` (10 minutes: the early warnings'
baselines are full) and ``AFTER_STEPS`` more in which some series change. Each series is a list
of one value per step (``STALE`` ends a series, as a target that stopped answering does); counters
are built from their increments, so they never go backwards.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

STEP_S = 2
STEADY_STEPS = 300  # 10 minutes
AFTER_STEPS = 120  # 4 minutes
TOTAL = STEADY_STEPS + AFTER_STEPS + 1
SITES = ("prod", "samecity", "dr")
LEADER = {1: "prod", 2: "samecity"}
STANDBY = {1: "samecity", 2: "prod"}
STALE = "stale"

Values = list[Any]  # floats, or STALE


def at(seconds_after_change: int) -> str:
    """An eval time ``seconds_after_change`` seconds after the steady part ends."""
    return f"{STEADY_STEPS * STEP_S + seconds_after_change}s"


def steps(
    steady: float, after: float | Callable[[int], float] | None = None, delay_s: int = 0
) -> list[float]:
    """One value per step: ``steady``, then from ``delay_s`` after the steady part ``after`` (a
    value, or a function of the steps since the change)."""
    change = STEADY_STEPS + 1 + delay_s // STEP_S
    values = []
    for index in range(TOTAL):
        if after is None or index < change:
            values.append(steady)
        else:
            values.append(after(index - change) if callable(after) else after)
    return values


def counter(increments: list[float], start: float = 0) -> list[float]:
    values, value = [], start
    for increment in increments:
        values.append(value)
        value += increment
    return values


def stale_from(values: Values, delay_s: int = 0) -> Values:
    """``values`` until ``delay_s`` after the steady part, then a staleness marker and nothing."""
    cut = STEADY_STEPS + 1 + delay_s // STEP_S
    return [*values[:cut], STALE]


def notation(values: Values) -> str:
    """promtool's expanding notation: ``a+bxN`` runs, ``stale`` markers."""
    parts, index = [], 0
    while index < len(values):
        value = values[index]
        if value == STALE:
            parts.append("stale")
            index += 1
            continue
        end = index
        step = None
        while end + 1 < len(values) and values[end + 1] != STALE:
            delta = values[end + 1] - values[end]
            if step is None:
                step = delta
            elif delta != step:
                break
            end += 1
        count = end - index
        parts.append(f"{value:g}" if count == 0 else f"{value:g}{step:+g}x{count}")
        index = end + 1
    return " ".join(parts)


def _labels(labels: dict[str, Any]) -> str:
    return ",".join(f'{k}="{v}"' for k, v in labels.items())


@dataclass
class Scenario:
    series: dict[str, Values] = field(default_factory=dict)

    def set(self, name: str, labels: dict[str, Any], values: Values) -> None:
        self.series[f"{name}{{{_labels(labels)}}}"] = values

    def input_series(self) -> list[dict[str, str]]:
        return [{"series": key, "values": notation(values)} for key, values in self.series.items()]


def patroni(cell: int, site: str) -> dict[str, Any]:
    name = f"pg-cell{cell}-{site}"
    return {
        "job": "patroni",
        "kind": "patroni",
        "instance": f"{site}:1880{cell}",
        "site": site,
        "cell": cell,
        "component": name,
    }


def exporter(cell: int, site: str) -> dict[str, Any]:
    name = f"pg-cell{cell}-{site}"
    return {
        "job": "postgres",
        "kind": "postgres",
        "instance": f"{site}:1885{cell}",
        "site": site,
        "cell": cell,
        "component": name,
    }


def etcd(site: str) -> dict[str, Any]:
    return {
        "job": "etcd",
        "kind": "etcd",
        "instance": f"{site}:12379",
        "site": site,
        "component": f"etcd-{site}",
    }


ENTRY = {"job": "entry", "kind": "entry", "instance": "entry:18080", "component": "entry", "site": "entry"}


def app(cell: int) -> dict[str, Any]:
    site = LEADER[cell]
    return {
        "job": "app",
        "kind": "app",
        "instance": f"{site}:18100",
        "component": f"app-{site}",
        "cell": cell,
        "site": site,
    }


def set_patroni(s: Scenario, cell: int, site: str, primary: Values, sync: Values, up: Values) -> None:
    labels = patroni(cell, site)
    member = {
        **labels,
        "scope": f"watertight-cell{cell}" + ("-dr" if site == "dr" else ""),
        "name": labels["component"],
    }
    s.set("up", labels, up)
    s.set("patroni_primary", member, primary)
    s.set("patroni_sync_standby", member, sync)
    if site == LEADER[cell]:
        s.set("patroni_xlog_location", member, counter(steps(20_000), start=1_000_000))
    if site == "dr":
        s.set("patroni_xlog_received_location", member, counter(steps(20_000), start=990_000))


def set_traffic(s: Scenario, cell: int, ok: list[float], errors: list[float], slow: list[float]) -> None:
    """Requests of ``cell`` at the entry per step: ``ok`` answered fast, ``errors`` 5xx (fast),
    ``slow`` 2xx after 2 to 2.5 s."""
    route = {**ENTRY, "cell": cell, "route": "/v1/authorizations"}
    s.set(
        "watertight_requests_total",
        {**route, "outcome": "2xx"},
        counter([a + b for a, b in zip(ok, slow, strict=True)]),
    )
    s.set("watertight_requests_total", {**route, "outcome": "5xx"}, counter(errors))
    fast = counter([a + b for a, b in zip(ok, errors, strict=True)])
    everything = counter([a + b + c for a, b, c in zip(ok, errors, slow, strict=True)])
    for le, values in (("0.05", fast), ("1", fast), ("2.5", everything), ("+Inf", everything)):
        s.set("watertight_request_seconds_bucket", {**route, "le": le}, values)


def set_authorizations(s: Scenario, cell: int, per_code: dict[str, list[float]]) -> None:
    for code, increments in per_code.items():
        s.set(
            "watertight_authorizations_total",
            {**ENTRY, "cell": cell, "response_code": code},
            counter(increments),
        )


def set_commits(s: Scenario, cell: int, per_step: list[float], slow_share: list[float]) -> None:
    """``per_step`` financial requests committed in one batch per step; ``slow_share`` of the
    batches take 400 ms instead of 10 ms."""
    labels = app(cell)
    s.set("watertight_batch_size_sum", labels, counter(per_step))
    batches = [10.0] * TOTAL
    fast = [10.0 * (1 - share) for share in slow_share]
    for le, values in (("0.025", counter(fast)), ("0.5", counter(batches)), ("+Inf", counter(batches))):
        s.set("watertight_batch_seconds_bucket", {**labels, "le": le}, values)


def steady() -> Scenario:
    """Every series of a healthy topology under steady card traffic, for the whole run."""
    s = Scenario()
    for cell in (1, 2):
        for site in SITES:
            set_patroni(
                s,
                cell,
                site,
                primary=steps(1 if LEADER[cell] == site else 0),
                sync=steps(1 if STANDBY[cell] == site else 0),
                up=steps(1),
            )
            s.set("pg_up", exporter(cell, site), steps(1))
            s.set("pg_member_writable", exporter(cell, site), steps(1 if LEADER[cell] == site else 0))
        set_traffic(s, cell, ok=steps(100), errors=steps(0), slow=steps(0))
        set_authorizations(s, cell, {"00": steps(90), "51": steps(10), "05": steps(0), "91": steps(0)})
        set_commits(s, cell, per_step=steps(60), slow_share=steps(0))
        s.set("watertight_commit_queue_depth", app(cell), steps(0))
        s.set("watertight_commit_queue_capacity", app(cell), steps(8192))
        s.set("watertight_cell_ready", app(cell), steps(1))
    for site in SITES:
        s.set("up", etcd(site), steps(1))
        s.set("etcd_server_has_leader", etcd(site), steps(1))
    for upstream_site in SITES:
        for cell in (1, 2):
            upstream = {
                **ENTRY,
                "cell": cell,
                "upstream": f"http://{upstream_site}:18000",
                "upstream_site": upstream_site,
            }
            s.set("watertight_upstream_healthy", upstream, steps(0 if upstream_site == "dr" else 1))
    return s
