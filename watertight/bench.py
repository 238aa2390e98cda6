"""``watertight bench``: CPU microseconds per financial and per non-financial transaction.

On the running topology, each class of traffic is offered alone at a fixed rate (open loop: the
schedule does not wait for answers) to the site gateways, and the CPU time (user + system) of
every process of the topology is sampled before and after the window: etcd, Patroni and its
member guard, every PostgreSQL process (backends, WAL senders and receivers, recovery), app
servers and gateways, each kind apart. CPU per transaction = CPU consumed / transactions completed
in the window; the cores needed for the headline load (10,000 financial + 50,000 non-financial
TPS) follow from it. Then, per class, the saturation search: the highest rate it sustains with
p99 <= 50 ms, no error and the offered rate achieved, and the cost there.

The entry stands for the bank's global load balancer: by default the load goes to the site
gateways and the entry's CPU is reported apart, not counted (``via="entry"`` sends it through the
entry and counts it). The load generator's own CPU (this process) is reported apart too.
Never: send traffic anywhere but the topology's own loopback addresses; run without a bound (every
window has a duration, the saturation search a number of steps).
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import msgspec
from cardcore.platform.auth import ClientTokens
from cardcore.platform.upstream import UpstreamError, UpstreamPool

from watertight.runtime.target import Target

HEADLINE_FINANCIAL_TPS = 10_000
HEADLINE_NONFINANCIAL_TPS = 50_000
IN_FLIGHT_MAX = 2_000
IDLE_S = 3.0
REQUEST_TIMEOUT_S = 5.0
WARMUP_S = 2.0
TICK_S = 0.001
AUTHS_KEPT_MAX = 20_000
OPEN_TRIES_MAX = 3
# the saturation search: the highest rate a class sustains with p99 <= P99_MS_MAX and no error
P99_MS_MAX = 50.0
ACHIEVED_RATIO_MIN = 0.98
GROWTH = 1.5
BISECTIONS = 2
SATURATION_STEPS_MAX = 9
SATURATION_WARMUP_S = 1.0
SATURATION_RATE_MIN_TPS = 20.0
# what the figures count: every process of the topology but the entry (unless the load goes
# through it) and the load generator
COUNTED_KINDS = ("app", "gateway", "postgres", "patroni", "etcd")
VIA_CHOICES = ("gateways", "entry")
JSON = [(b"content-type", b"application/json")]

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


@dataclass
class Customer:
    customer_id: str
    account_id: str
    card_id: str
    pan: str
    expiry: str


@dataclass
class Window:
    """What one class of traffic achieved in the measured window."""

    completed: int = 0
    errors: int = 0
    dropped: int = 0
    latencies_s: list[float] = field(default_factory=list)
    # what the errors were: the HTTP status, or the client's exception when there was no answer
    error_kinds: dict[str, int] = field(default_factory=dict)

    def percentile_ms(self, fraction: float) -> float | None:
        if not self.latencies_s:
            return None
        ordered = sorted(self.latencies_s)
        return round(ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] * 1000, 2)


class Traffic:
    """Card traffic over a population, sent to the site gateways in turn."""

    def __init__(self, gateways: list[str], tokens: ClientTokens) -> None:
        self.pools = [UpstreamPool(url, size_max=256, connect_timeout=1.0) for url in gateways]
        self.tokens = tokens
        self.turn = 0
        self.customers: list[Customer] = []
        self.open_auths: deque[tuple[str, int]] = deque(maxlen=AUTHS_KEPT_MAX)
        self.random = random.Random(7)

    async def call(self, method: str, target: str, body: Any = None) -> tuple[int, Any]:
        self.turn += 1
        pool = self.pools[self.turn % len(self.pools)]
        data = msgspec.json.encode(body) if body is not None else b""
        headers = (JSON if body is not None else []) + self.tokens.raw_headers(method, target)
        response = await pool.request(method, target, data, headers, REQUEST_TIMEOUT_S)
        return response.status, msgspec.json.decode(response.body) if response.body else None

    async def open_population(self, size: int, progress: Progress) -> None:
        """Open and activate ``size`` customers through the API; a request the core could not
        serve at that moment (5xx, no answer) is tried again, at most OPEN_TRIES_MAX times."""

        async def attempt(method: str, target: str, body: Any) -> tuple[int, Any]:
            for tries in range(1, OPEN_TRIES_MAX + 1):
                try:
                    status, answer = await self.call(method, target, body)
                except UpstreamError:
                    status, answer = 0, None
                if status and status < 500:
                    return status, answer
                if tries < OPEN_TRIES_MAX:
                    await asyncio.sleep(0.2 * tries)
            return status, answer

        async def one(index: int) -> None:
            applicant = {
                "name": "测试客户",
                "id_number": f"B{uuid.uuid4().hex[:17].upper()}",
                "mobile": "13900000000",
                "birth_date": "1988-08-08",
                "annual_income": 50_000_000,
            }
            # a retried application is a new applicant: the first may have been committed
            status, opened = await attempt("POST", "/v1/applications", {"applicant": applicant})
            if status != 201 or opened["decision"] != "approved":
                raise RuntimeError(f"opening a bench customer failed: {status} {opened}")
            status, _ = await attempt("POST", f"/v1/cards/{opened['card_id']}/activate", {})
            if status != 200:
                raise RuntimeError(f"activating a bench card failed: {status}")
            self.customers.append(
                Customer(
                    opened["customer_id"],
                    opened["account_id"],
                    opened["card_id"],
                    opened["pan"],
                    opened["expiry"],
                )
            )

        for start in range(0, size, 20):
            await asyncio.gather(*(one(i) for i in range(start, min(size, start + 20))))
        progress(f"opened {len(self.customers)} customers across the cells")

    def _customer(self) -> Customer:
        return self.customers[self.random.randrange(len(self.customers))]

    async def financial(self) -> int:
        """One financial transaction: authorize (50 %), clear (35 %), reverse (5 %), repay (10 %)."""
        roll = self.random.random()
        key = uuid.uuid4().hex
        if roll < 0.40 and self.open_auths:
            auth_id, amount = self.open_auths.popleft()
            if roll < 0.05:
                status, _ = await self.call(
                    "POST", f"/v1/authorizations/{auth_id}/reversal", {"idempotency_key": key}
                )
            else:
                body = {"idempotency_key": key, "auth_id": auth_id, "amount": amount}
                status, _ = await self.call("POST", "/v1/clearing", body)
            return status
        if roll < 0.90:
            customer = self._customer()
            amount = self.random.randrange(100, 5_000)
            body = {
                "idempotency_key": key,
                "pan": customer.pan,
                "expiry": customer.expiry,
                "amount": amount,
                "currency": "CNY",
                "mcc": "5411",
                "merchant_id": "BENCH-0001",
                "channel": "pos",
                "kind": "purchase",
            }
            status, answer = await self.call("POST", "/v1/authorizations", body)
            if status == 200 and answer.get("approved"):
                self.open_auths.append((answer["auth_id"], amount))
            return status
        customer = self._customer()
        body = {"idempotency_key": key, "account_id": customer.account_id, "amount": 20_000}
        status, _ = await self.call("POST", "/v1/repayments", body)
        return status

    async def nonfinancial(self) -> int:
        """One read: balance, limits, card, tags, installment quote or routing lookup."""
        customer = self._customer()
        choice = self.random.randrange(6)
        if choice == 0:
            status, _ = await self.call("GET", f"/v1/accounts/{customer.account_id}/balance")
        elif choice == 1:
            status, _ = await self.call("GET", f"/v1/customers/{customer.customer_id}/limits")
        elif choice == 2:
            status, _ = await self.call("GET", f"/v1/cards/{customer.card_id}")
        elif choice == 3:
            status, _ = await self.call("GET", f"/v1/customers/{customer.customer_id}/tags")
        elif choice == 4:
            body = {"account_id": customer.account_id, "amount": 120_000, "terms": [3, 12]}
            status, _ = await self.call("POST", "/v1/installments/quote", body)
        else:
            status, _ = await self.call("GET", f"/v1/routing/customers/{customer.customer_id}")
        return status

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()


async def offer(
    rate_tps: float, seconds: float, send: Callable[[], Awaitable[int]], window: Window | None
) -> None:
    """Send ``rate_tps`` for ``seconds`` on a fixed schedule, whatever the latency (bounded by
    IN_FLIGHT_MAX requests in flight: beyond it a request is dropped and counted)."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    total = int(rate_tps * seconds)
    sent = 0
    in_flight: set[asyncio.Task[None]] = set()

    async def one() -> None:
        begun = time.perf_counter()
        failure = ""
        try:
            status = await send()
        except (UpstreamError, OSError, ValueError) as error:
            status, failure = 0, type(error).__name__
        if window is not None:
            if 200 <= status < 300:
                window.completed += 1
                window.latencies_s.append(time.perf_counter() - begun)
            else:
                window.errors += 1
                kind = failure or str(status)
                window.error_kinds[kind] = window.error_kinds.get(kind, 0) + 1

    while sent < total:
        due = min(total, int((loop.time() - started) * rate_tps) + 1)
        while sent < due:
            sent += 1
            if len(in_flight) >= IN_FLIGHT_MAX:
                if window is not None:
                    window.dropped += 1
                continue
            task = asyncio.create_task(one())
            in_flight.add(task)
            task.add_done_callback(in_flight.discard)
        await asyncio.sleep(TICK_S)
    if in_flight:
        await asyncio.wait(in_flight, timeout=REQUEST_TIMEOUT_S + 1)


def sample(runtime: Target) -> dict[Any, tuple[str, float]]:
    """CPU seconds so far of every process of the topology but monitoring's, with the kind it is
    counted under (the target says: PostgreSQL apart from Patroni and its member guard, both etcd
    clusters as etcd)."""
    return runtime.cpu_sample()


def cpu_delta(before: dict[Any, tuple[str, float]], after: dict[Any, tuple[str, float]]) -> dict[str, float]:
    by_kind: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        start = before.get(pid, (kind, 0.0))[1]
        by_kind[kind] = by_kind.get(kind, 0.0) + max(0.0, seconds - start)
    return by_kind


def process_counts(found: dict[int, tuple[str, float]]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for kind, _ in found.values():
        counts[kind] = counts.get(kind, 0) + 1
    return dict(sorted(counts.items()))


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in open("/proc/cpuinfo", encoding="ascii", errors="replace"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory_kib = 0
    try:
        for line in open("/proc/meminfo", encoding="ascii"):
            if line.startswith("MemTotal"):
                memory_kib = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "memory_gib": round(memory_kib / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }


@dataclass
class Measured:
    """One class at one rate: what was achieved and what it cost, per kind of process."""

    name: str
    rate_tps: float
    row: dict[str, Any]

    @property
    def sustained(self) -> bool:
        """p99 <= P99_MS_MAX, no error, nothing dropped, and the offered rate achieved."""
        row = self.row
        return (
            row["completed"] > 0
            and row["errors"] == 0
            and row["dropped"] == 0
            and row["p99_ms"] is not None
            and row["p99_ms"] <= P99_MS_MAX
            and row["achieved_tps"] >= ACHIEVED_RATIO_MIN * row["offered_tps"]
        )


class Bench:
    """The measuring loop: offers one class at one rate, samples the CPU of every process."""

    def __init__(
        self, runtime: Target, traffic: Traffic, idle_per_second: dict[str, float], counted: set[str]
    ) -> None:
        self.runtime = runtime
        self.traffic = traffic
        self.idle_per_second = idle_per_second
        self.counted = counted

    async def at(self, name: str, rate: float, seconds: float, warmup_s: float) -> Measured:
        send = self.traffic.financial if name == "financial" else self.traffic.nonfinancial
        if warmup_s > 0:
            await offer(rate, warmup_s, send, None)
        window = Window()
        before = sample(self.runtime)
        loadgen_before = time.process_time()
        started = time.monotonic()
        await offer(rate, seconds, send, window)
        elapsed = time.monotonic() - started
        loadgen_s = time.process_time() - loadgen_before
        gross_all = cpu_delta(before, sample(self.runtime))
        # what the load added: the background the topology burns idle is not per transaction
        net_all = {
            kind: max(0.0, value - self.idle_per_second.get(kind, 0.0) * elapsed)
            for kind, value in gross_all.items()
        }
        net = {kind: value for kind, value in net_all.items() if kind in self.counted}
        gross = {kind: value for kind, value in gross_all.items() if kind in self.counted}
        done = window.completed

        def per_txn(seconds_cpu: float) -> float | None:
            return round(seconds_cpu / done * 1e6, 1) if done else None

        row: dict[str, Any] = {
            "offered_tps": rate,
            "achieved_tps": round(done / elapsed, 1),
            "completed": done,
            "errors": window.errors,
            "errors_by_kind": dict(sorted(window.error_kinds.items())),
            "dropped": window.dropped,
            "p50_ms": window.percentile_ms(0.50),
            "p99_ms": window.percentile_ms(0.99),
            "cpu_seconds": round(sum(net.values()), 3),
            "us_per_txn": per_txn(sum(net.values())),
            "us_per_txn_gross": per_txn(sum(gross.values())),
            "us_per_txn_by_kind": {kind: per_txn(value) for kind, value in sorted(net.items())}
            if done
            else {},
            # processes the figure leaves out: the load generator (this process) and, when the
            # load goes to the site gateways, the entry
            "us_per_txn_not_counted": (
                {kind: per_txn(value) for kind, value in sorted(net_all.items()) if kind not in self.counted}
                | {"loadgen": per_txn(loadgen_s)}
            )
            if done
            else {},
            "loadgen_us_per_txn": per_txn(loadgen_s),
            "loadgen_cores": round(loadgen_s / elapsed, 2),
        }
        return Measured(name, rate, row)

    async def saturation(
        self, name: str, start_tps: float, seconds: float, progress: Progress
    ) -> dict[str, Any]:
        """The highest rate ``name`` sustains (see ``Measured.sustained``): up by GROWTH from
        ``start_tps`` until a step fails (or down until one holds), then BISECTIONS halvings of
        the gap; at most SATURATION_STEPS_MAX windows."""
        steps: list[Measured] = []

        async def step(rate: float) -> Measured:
            rate = round(rate)
            measured = await self.at(name, rate, seconds, SATURATION_WARMUP_S)
            steps.append(measured)
            row = measured.row
            progress(
                f"{name} saturation: {rate} TPS offered -> {row['achieved_tps']} achieved, p99 {row['p99_ms']} ms, "
                f"{row['errors']} errors, {row['us_per_txn']} us/txn: {'held' if measured.sustained else 'not held'}"
            )
            return measured

        best: Measured | None = None
        failed: Measured | None = None
        rate = start_tps
        while len(steps) < SATURATION_STEPS_MAX - BISECTIONS:
            measured = await step(rate)
            if measured.sustained:
                best = measured
                if failed is not None:
                    break
                rate *= GROWTH
            else:
                failed = measured
                if best is not None:
                    break
                rate /= GROWTH
                if rate < SATURATION_RATE_MIN_TPS:
                    break
        if best is not None and failed is not None:
            low, high = best.rate_tps, failed.rate_tps
            for _ in range(BISECTIONS):
                if high - low < max(10.0, 0.05 * low):
                    break
                measured = await step((low + high) / 2)
                if measured.sustained:
                    best, low = measured, measured.rate_tps
                else:
                    high = measured.rate_tps
        result: dict[str, Any] = {
            "rate_tps": best.rate_tps if best is not None else None,
            "us_per_txn": best.row["us_per_txn"] if best is not None else None,
            "row": best.row if best is not None else None,
            "bounded_by": None if failed is not None or best is None else "search ended before a step failed",
            "steps": [
                {
                    "offered_tps": m.rate_tps,
                    "sustained": m.sustained,
                    **{k: m.row[k] for k in ("achieved_tps", "errors", "dropped", "p99_ms", "us_per_txn")},
                    "loadgen_cores": m.row["loadgen_cores"],
                }
                for m in steps
            ],
        }
        return result


def cores_for_headline(financial_us: float | None, nonfinancial_us: float | None) -> float | None:
    if financial_us is None or nonfinancial_us is None:
        return None
    return round(
        (HEADLINE_FINANCIAL_TPS * financial_us + HEADLINE_NONFINANCIAL_TPS * nonfinancial_us) / 1e6, 1
    )


async def measure(
    runtime: Target,
    seconds: float,
    rate_financial: float,
    rate_nonfinancial: float,
    customers: int,
    progress: Progress,
    saturation: bool = True,
    saturation_seconds: float | None = None,
    via: str = "gateways",
) -> dict[str, Any]:
    if via not in VIA_CHOICES:
        raise ValueError(f"via: {via!r} is not one of {', '.join(VIA_CHOICES)}")
    if via == "entry":
        targets = [runtime.entry_url]
        counted = set(COUNTED_KINDS) | {"entry"}
    else:
        targets = list(runtime.gateway_urls().values())
        counted = set(COUNTED_KINDS)
    traffic = Traffic(targets, runtime.client_tokens())
    step_s = saturation_seconds if saturation_seconds is not None else max(3.0, seconds / 3)
    try:
        await traffic.open_population(customers, progress)
        progress(f"idle: sampling the background CPU (Patroni loops, etcd, health checks) for {IDLE_S:g} s")
        before = sample(runtime)
        await asyncio.sleep(IDLE_S)
        after = sample(runtime)
        idle_per_second = {kind: value / IDLE_S for kind, value in cpu_delta(before, after).items()}
        bench = Bench(runtime, traffic, idle_per_second, counted)
        results: dict[str, Any] = {}
        saturated: dict[str, Any] = {}
        for name, rate in (("financial", rate_financial), ("nonfinancial", rate_nonfinancial)):
            progress(
                f"{name}: warming up at {rate:g} TPS for {WARMUP_S:g} s, then measuring for {seconds:g} s"
            )
            measured = await bench.at(name, rate, seconds, WARMUP_S)
            results[name] = measured.row
            row = measured.row
            progress(
                f"{name}: {row['achieved_tps']} TPS, {row['us_per_txn']} us CPU per transaction, "
                f"p99 {row['p99_ms']} ms, {row['errors']} errors {row['errors_by_kind'] or ''}"
                f"(load generator {row['loadgen_cores']} cores)"
            )
            if saturation:
                saturated[name] = await bench.saturation(name, rate, step_s, progress)
    finally:
        await traffic.close()
    financial_us = results["financial"]["us_per_txn"]
    nonfinancial_us = results["nonfinancial"]["us_per_txn"]
    result: dict[str, Any] = {
        "financial_us": financial_us,
        "nonfinancial_us": nonfinancial_us,
        "cores_for_headline": cores_for_headline(financial_us, nonfinancial_us),
        "headline": {"financial_tps": HEADLINE_FINANCIAL_TPS, "nonfinancial_tps": HEADLINE_NONFINANCIAL_TPS},
        "p50_ms": {name: results[name]["p50_ms"] for name in results},
        "p99_ms": {name: results[name]["p99_ms"] for name in results},
        "financial": results["financial"],
        "nonfinancial": results["nonfinancial"],
        "via": via,
        "kinds_counted": sorted(counted),
        "kinds_not_counted": sorted({k for k in idle_per_second if k not in counted} | {"loadgen"}),
        "processes_by_kind": process_counts(after),
        "machine": machine(),
        "window_seconds": seconds,
        "idle_cpu_cores": round(sum(v for k, v in idle_per_second.items() if k in counted), 3),
        "note": (
            f"us per transaction = CPU the load added to {', '.join(sorted(counted))} (their idle background"
            " subtracted; gross figures beside it); the load generator (and, unless --via entry, the entry, a"
            " stand-in for the global load balancer) are reported apart and not counted"
        ),
    }
    if saturation:
        sat_financial = saturated["financial"]["us_per_txn"]
        sat_nonfinancial = saturated["nonfinancial"]["us_per_txn"]
        result["saturation"] = {
            "criteria": {
                "p99_ms_max": P99_MS_MAX,
                "errors": 0,
                "achieved_ratio_min": ACHIEVED_RATIO_MIN,
                "step_seconds": step_s,
            },
            "financial_us": sat_financial,
            "nonfinancial_us": sat_nonfinancial,
            "cores_for_headline": cores_for_headline(sat_financial, sat_nonfinancial),
            "financial": saturated["financial"],
            "nonfinancial": saturated["nonfinancial"],
        }
    return result


def run(
    runtime: Target,
    seconds: float = 15.0,
    rate_financial: float = 500.0,
    rate_nonfinancial: float = 2_500.0,
    customers: int = 100,
    progress: Progress = _quiet,
    saturation: bool = True,
    saturation_seconds: float | None = None,
    via: str = "gateways",
) -> dict[str, Any]:
    return asyncio.run(
        measure(
            runtime,
            seconds,
            rate_financial,
            rate_nonfinancial,
            customers,
            progress,
            saturation,
            saturation_seconds,
            via,
        )
    )


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def table(result: dict[str, Any]) -> str:
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB"
    ]
    lines.append(f"load sent to the {result['via']}; counted: {', '.join(result['kinds_counted'])}")
    lines.append(
        f"{'class':<14}{'offered':>9}{'achieved':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'us CPU/txn':>12}"
    )
    for name in ("financial", "nonfinancial"):
        row = result[name]
        lines.append(
            f"{name:<14}{row['offered_tps']:>9g}{row['achieved_tps']:>10}{row['errors']:>8}{_cell(row['p50_ms']):>9}"
            f"{_cell(row['p99_ms']):>9}{_cell(row['us_per_txn']):>12}"
        )
        breakdown = ", ".join(f"{kind} {value}" for kind, value in row["us_per_txn_by_kind"].items())
        apart = ", ".join(f"{kind} {value}" for kind, value in row["us_per_txn_not_counted"].items())
        lines.append(
            f"{'':<14}by process kind (us): {breakdown}; gross with the idle background {row['us_per_txn_gross']}"
        )
        lines.append(f"{'':<14}not counted (us): {apart}")
    lines.append(
        f"idle background of the topology: {result['idle_cpu_cores']} cores (not counted per transaction)"
    )
    lines.append(
        f"cores for {HEADLINE_FINANCIAL_TPS:,} financial + {HEADLINE_NONFINANCIAL_TPS:,} non-financial TPS"
        f" at the offered rates: {_cell(result['cores_for_headline'])}"
    )
    saturation = result.get("saturation")
    if saturation:
        criteria = saturation["criteria"]
        lines.append(
            f"saturation (highest rate with p99 <= {criteria['p99_ms_max']:g} ms, no error, "
            f">= {criteria['achieved_ratio_min']:.0%} achieved; {criteria['step_seconds']:g} s steps):"
        )
        for name in ("financial", "nonfinancial"):
            found = saturation[name]
            row = found["row"]
            if row is None:
                lines.append(f"  {name:<12} no step held")
                continue
            breakdown = ", ".join(f"{kind} {value}" for kind, value in row["us_per_txn_by_kind"].items())
            lines.append(
                f"  {name:<12} {found['rate_tps']:g} TPS, p99 {row['p99_ms']} ms: {found['us_per_txn']} us/txn"
                f" ({breakdown}); load generator {row['loadgen_us_per_txn']} us/txn"
            )
        lines.append(
            f"cores for the headline at the saturation costs: {_cell(saturation['cores_for_headline'])}"
        )
    return "\n".join(lines)
