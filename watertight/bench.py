"""``watertight bench``: CPU microseconds per financial and per non-financial transaction.

On the running topology, each class of traffic is offered alone at a fixed rate (open loop: the
schedule does not wait for answers) to the site gateways, and the CPU time (user + system) of
every process of the topology is sampled before and after the window: etcd, Patroni, every
PostgreSQL process (backends, WAL senders and receivers), app servers and gateways. CPU per
transaction = CPU consumed / transactions completed in the window; the cores needed for the
headline load (10,000 financial + 50,000 non-financial TPS) follow from it.

The entry stands for the bank's global load balancer (not a Python process in production): the
load goes to the site gateways, and the entry's CPU is not part of the figures.
Never: send traffic anywhere but the topology's own loopback addresses; run without a bound.
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
        async def one(index: int) -> None:
            applicant = {
                "name": "测试客户",
                "id_number": f"B{uuid.uuid4().hex[:17].upper()}",
                "mobile": "13900000000",
                "birth_date": "1988-08-08",
                "annual_income": 50_000_000,
            }
            status, opened = await self.call("POST", "/v1/applications", {"applicant": applicant})
            if status != 201 or opened["decision"] != "approved":
                raise RuntimeError(f"opening a bench customer failed: {status} {opened}")
            status, _ = await self.call("POST", f"/v1/cards/{opened['card_id']}/activate", {})
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
        try:
            status = await send()
        except (UpstreamError, OSError, ValueError):
            status = 0
        if window is not None:
            if 200 <= status < 300:
                window.completed += 1
                window.latencies_s.append(time.perf_counter() - begun)
            else:
                window.errors += 1

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
    """CPU seconds so far of every process of the topology, with its component kind."""
    return runtime.cpu_sample()


def cpu_delta(before: dict[Any, tuple[str, float]], after: dict[Any, tuple[str, float]]) -> dict[str, float]:
    by_kind: dict[str, float] = {}
    for pid, (kind, seconds) in after.items():
        start = before.get(pid, (kind, 0.0))[1]
        by_kind[kind] = by_kind.get(kind, 0.0) + max(0.0, seconds - start)
    return by_kind


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


async def measure(
    runtime: Target,
    seconds: float,
    rate_financial: float,
    rate_nonfinancial: float,
    customers: int,
    progress: Progress,
) -> dict[str, Any]:
    gateways = list(runtime.gateway_urls().values())
    traffic = Traffic(gateways, runtime.client_tokens())
    try:
        await traffic.open_population(customers, progress)
        progress(f"idle: sampling the background CPU (Patroni loops, etcd, health checks) for {IDLE_S:g} s")
        before = sample(runtime)
        await asyncio.sleep(IDLE_S)
        idle_per_second = {kind: value / IDLE_S for kind, value in cpu_delta(before, sample(runtime)).items()}
        idle_per_second.pop("entry", None)
        results: dict[str, Any] = {}
        for name, rate, send in (
            ("financial", rate_financial, traffic.financial),
            ("nonfinancial", rate_nonfinancial, traffic.nonfinancial),
        ):
            progress(f"{name}: warming up at {rate:g} TPS for {WARMUP_S:g} s")
            await offer(rate, WARMUP_S, send, None)
            progress(f"{name}: measuring at {rate:g} TPS for {seconds:g} s")
            window = Window()
            before = sample(runtime)
            started = time.monotonic()
            await offer(rate, seconds, send, window)
            elapsed = time.monotonic() - started
            gross = cpu_delta(before, sample(runtime))
            gross.pop("entry", None)
            # what the load added: the background the topology burns idle is not per transaction
            by_kind = {
                kind: max(0.0, value - idle_per_second.get(kind, 0.0) * elapsed)
                for kind, value in gross.items()
            }
            total = sum(by_kind.values())
            per_txn = total / window.completed * 1e6 if window.completed else None
            gross_per_txn = sum(gross.values()) / window.completed * 1e6 if window.completed else None
            results[name] = {
                "offered_tps": rate,
                "achieved_tps": round(window.completed / elapsed, 1),
                "completed": window.completed,
                "errors": window.errors,
                "dropped": window.dropped,
                "p50_ms": window.percentile_ms(0.50),
                "p99_ms": window.percentile_ms(0.99),
                "cpu_seconds": round(total, 3),
                "us_per_txn": round(per_txn, 1) if per_txn is not None else None,
                "us_per_txn_gross": round(gross_per_txn, 1) if gross_per_txn is not None else None,
                "us_per_txn_by_kind": {
                    kind: round(value / window.completed * 1e6, 1) for kind, value in sorted(by_kind.items())
                }
                if window.completed
                else {},
            }
            progress(
                f"{name}: {results[name]['achieved_tps']} TPS, {results[name]['us_per_txn']} us CPU per transaction, "
                f"p99 {results[name]['p99_ms']} ms, {window.errors} errors"
            )
    finally:
        await traffic.close()
    financial_us = results["financial"]["us_per_txn"]
    nonfinancial_us = results["nonfinancial"]["us_per_txn"]
    cores = None
    if financial_us is not None and nonfinancial_us is not None:
        cores = round(
            (HEADLINE_FINANCIAL_TPS * financial_us + HEADLINE_NONFINANCIAL_TPS * nonfinancial_us) / 1e6, 1
        )
    return {
        "financial_us": financial_us,
        "nonfinancial_us": nonfinancial_us,
        "cores_for_headline": cores,
        "headline": {"financial_tps": HEADLINE_FINANCIAL_TPS, "nonfinancial_tps": HEADLINE_NONFINANCIAL_TPS},
        "p50_ms": {name: results[name]["p50_ms"] for name in results},
        "p99_ms": {name: results[name]["p99_ms"] for name in results},
        "financial": results["financial"],
        "nonfinancial": results["nonfinancial"],
        "machine": machine(),
        "window_seconds": seconds,
        "idle_cpu_cores": round(sum(idle_per_second.values()), 3),
        "note": (
            "us per transaction = CPU the load added to etcd, Patroni, PostgreSQL, app servers and gateways"
            " (their idle background subtracted; gross figures beside it); the entry, a stand-in for the"
            " global load balancer, is left out"
        ),
    }


def run(
    runtime: Target,
    seconds: float = 15.0,
    rate_financial: float = 500.0,
    rate_nonfinancial: float = 2_500.0,
    customers: int = 100,
    progress: Progress = _quiet,
) -> dict[str, Any]:
    return asyncio.run(measure(runtime, seconds, rate_financial, rate_nonfinancial, customers, progress))


def table(result: dict[str, Any]) -> str:
    lines = [
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, {result['machine']['memory_gib']} GiB"
    ]
    lines.append(
        f"{'class':<14}{'offered':>9}{'achieved':>10}{'errors':>8}{'p50 ms':>9}{'p99 ms':>9}{'us CPU/txn':>12}"
    )
    for name in ("financial", "nonfinancial"):
        row = result[name]
        lines.append(
            f"{name:<14}{row['offered_tps']:>9g}{row['achieved_tps']:>10}{row['errors']:>8}{row['p50_ms'] or '-':>9}"
            f"{row['p99_ms'] or '-':>9}{row['us_per_txn'] or '-':>12}"
        )
        breakdown = ", ".join(f"{kind} {value}" for kind, value in row["us_per_txn_by_kind"].items())
        lines.append(
            f"{'':<14}by process kind (us): {breakdown}; gross with the idle background {row['us_per_txn_gross']}"
        )
    lines.append(
        f"idle background of the topology: {result['idle_cpu_cores']} cores (not counted per transaction)"
    )
    lines.append(
        f"cores for {HEADLINE_FINANCIAL_TPS:,} financial + {HEADLINE_NONFINANCIAL_TPS:,} non-financial TPS: {result['cores_for_headline']}"
    )
    return "\n".join(lines)
