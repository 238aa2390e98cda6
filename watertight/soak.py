"""``watertight soak``: a long mixed run that crosses statement dates with the cycle running under
load, judged on the drills' invariants.

Locust drives the whole card mix through the entry for ``seconds`` (authorizations, increments,
clearings, reversals by id and by the original key, refunds, repayments, installments, and the
non-financial reads). Meanwhile the statement cycle runs for ``business_days`` consecutive
business dates, each the end of one day, spread evenly over the middle of the run: every account
(one cycle day in 28) crosses its statement date while the traffic goes on, and with more than 28
days some cross a second one (interest, late fees, past due). Afterwards:

- every cell's trial balance: entries balanced, balances equal to the postings, holds equal to
  the lines (``journal_balanced``, ``balances_match_postings``);
- no credit line over its limit, from the limits of the run's customers (``limits_respected``);
- every acknowledged financial transaction in its cell's ledger (the ack log, as the drill reads it);
- every cycle answered 200, and the load's error ratio at most ``error_ratio_max``.

The verdict and the figures go to ``soak.json`` in the report directory.
Owns: the schedule of the cycles, the run and its verdict. Never: move a business date back
(the dates start after the latest one the cells know); judge from anything it did not measure;
leave the load generator running.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

from watertight import verdicts
from watertight.runtime.processes import stop_load_generator

log = logging.getLogger("watertight.soak")

REPO_ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"
CYCLE_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 30.0
LOAD_STOP_TIMEOUT_S = 60.0
POPULATION_WAIT_S_MAX = 300.0
CUSTOMERS_CHECKED_MAX = 500
# the cycles run between these fractions of the run: the load is up before, and goes on after
CYCLES_FROM = 0.15
CYCLES_UNTIL = 0.85

Progress = Callable[[str], None]
KeysFound = Callable[[list[dict[str, Any]]], set[str]]


@dataclass(frozen=True)
class Plan:
    seconds: float = 600.0
    rate_financial: float = 100.0
    rate_nonfinancial: float = 300.0
    business_days: int = 56
    customers: int = 200
    first_business_date: date | None = None  # None: the day after the latest the cells know
    error_ratio_max: float = 0.01

    def __post_init__(self) -> None:
        if self.seconds <= 0 or self.business_days <= 0 or self.customers <= 0:
            raise ValueError("seconds, business days and customers must be positive")
        if self.rate_financial <= 0:
            raise ValueError("a soak needs financial traffic: rate_financial must be positive")


@dataclass
class CycleRun:
    business_date: str
    started_s: float  # since the load started
    seconds: float
    status: int
    statements: int = 0
    interest_fen: int = 0
    fees_fen: int = 0
    late_fees_fen: int = 0
    installment_billed_fen: int = 0
    failed_cells: list[str] = field(default_factory=list)


def cycle_offsets(seconds: float, business_days: int) -> list[float]:
    """When each cycle starts, in seconds from the start of the load: evenly over the middle."""
    first, last = seconds * CYCLES_FROM, seconds * CYCLES_UNTIL
    if business_days == 1:
        return [first]
    step = (last - first) / (business_days - 1)
    return [first + index * step for index in range(business_days)]


def request_json(
    method: str, url: str, body: Any = None, token: str | None = None, timeout_s: float = HTTP_TIMEOUT_S
) -> tuple[int, Any]:
    """(status, decoded body); status 0 when nothing answered."""
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return 0, None


def run_cycle(entry: str, business_date: date, token: str | None = None) -> tuple[int, Any]:
    return request_json(
        "POST",
        f"{entry}/v1/admin/cycle",
        {"business_date": business_date.isoformat()},
        token,
        CYCLE_TIMEOUT_S,
    )


def first_business_date(entry: str, token: str | None = None) -> date:
    """The day after the latest business date any cell knows: running today's cycle (idempotent)
    says what each cell's business date is."""
    today = datetime.now(UTC).date()
    status, body = run_cycle(entry, today, token)
    if status != 200 or not isinstance(body, dict):
        raise RuntimeError(f"the cycle for {today} answered {status}: {body}")
    known = [today]
    for cell in body.get("cells", {}).values():
        if isinstance(cell, dict) and cell.get("cell_business_date"):
            known.append(date.fromisoformat(cell["cell_business_date"]))
    return max(known) + timedelta(days=1)


class CycleDriver(threading.Thread):
    """Runs the cycle for each business date at its offset from the start of the load."""

    def __init__(
        self, entry: str, dates: list[date], offsets: list[float], token: str | None, progress: Progress
    ):
        super().__init__(daemon=True, name="soak-cycles")
        self.entry, self.dates, self.offsets, self.token, self.progress = (
            entry,
            dates,
            offsets,
            token,
            progress,
        )
        self.runs: list[CycleRun] = []
        self.stopping = threading.Event()
        self.started_at = time.monotonic()

    def run(self) -> None:
        for business_date, offset in zip(self.dates, self.offsets, strict=True):
            wait_s = self.started_at + offset - time.monotonic()
            if wait_s > 0 and self.stopping.wait(wait_s):
                return
            if self.stopping.is_set():
                return
            began = time.monotonic()
            status, body = run_cycle(self.entry, business_date, self.token)
            cycle = CycleRun(
                business_date.isoformat(),
                round(began - self.started_at, 1),
                round(time.monotonic() - began, 2),
                status,
            )
            if isinstance(body, dict):
                for cell in body.get("cells", {}).values():
                    if isinstance(cell, dict):
                        cycle.statements += int(cell.get("statements_created", 0))
                        cycle.interest_fen += int(cell.get("interest", 0))
                        cycle.fees_fen += int(cell.get("fees", 0))
                        cycle.late_fees_fen += int(cell.get("late_fees", 0))
                        cycle.installment_billed_fen += int(cell.get("installment_billed", 0))
                cycle.failed_cells = [str(c) for c in body.get("failed_cells", [])]
            self.runs.append(cycle)
            self.progress(
                f"cycle {business_date} at +{cycle.started_s:.0f} s: {status}, {cycle.statements} statements,"
                f" interest {cycle.interest_fen} fen, late fees {cycle.late_fees_fen} fen, in {cycle.seconds:.1f} s"
            )


def locust_argv(
    entry: str, plan: Plan, directory: Path, population: Path, tokens_file: Path | None = None
) -> list[str]:
    users = max(20, int((plan.rate_financial + plan.rate_nonfinancial) / 10))
    return [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", entry,
        "-u", str(users), "-r", str(users), "-t", f"{int(plan.seconds)}s", "--stop-timeout", "5",
        "--rate-financial", f"{plan.rate_financial:g}", "--rate-nonfinancial", f"{plan.rate_nonfinancial:g}",
        "--customers", str(plan.customers), "--population", str(population),
        "--ack-log", str(directory / "ack.jsonl"), "--csv", str(directory / "load"),
        "--html", str(directory / "load.html"), "--summary-json", str(directory / "load-summary.json"),
        # the soak judges by its own verdict; the gates only report
        "--max-error-ratio", "1", "--max-p99-ms", "1000000", "--min-tps-ratio", "0",
        *(["--api-tokens", str(tokens_file)] if tokens_file is not None else []),
    ]  # fmt: skip


def ledger_checks(
    entry: str, cells: list[int], population: Path, tokens: dict[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every cell's trial balance, and the limits of (up to 500 of) the run's customers."""
    balances = []
    for cell in cells:
        status, body = request_json(
            "GET", f"{entry}/v1/admin/trial-balance?cell={cell}", token=tokens.get("operator")
        )
        balances.append(
            body
            if status == 200 and isinstance(body, dict)
            else {"cell": cell, "balanced": False, "error": status}
        )
    views = []
    customers = json.loads(population.read_text()).get("customers", []) if population.exists() else []
    for customer in customers[:CUSTOMERS_CHECKED_MAX]:
        status, body = request_json(
            "GET", f"{entry}/v1/customers/{customer['customer_id']}/limits", token=tokens.get("channel")
        )
        views.append({"lines": body["lines"]} if status == 200 and isinstance(body, dict) else {"lines": []})
    return balances, views


def run(
    entry: str,
    cells: list[int],
    plan: Plan,
    directory: Path,
    population: Path,
    keys_found: KeysFound,
    progress: Progress,
    tokens: dict[str, str] | None = None,
    tokens_file: Path | None = None,
) -> dict[str, Any]:
    """The soak against the core behind ``entry``; its result, also written to soak.json.
    ``tokens``: the API token per client kind; ``tokens_file``: the same as a secrets file, for
    Locust (``--api-tokens``)."""
    from watertight_load.ack_log import read_ack_log

    tokens = tokens or {}
    directory.mkdir(parents=True, exist_ok=True)
    population.parent.mkdir(parents=True, exist_ok=True)
    first = plan.first_business_date or first_business_date(entry, tokens.get("operator"))
    dates = [first + timedelta(days=n) for n in range(plan.business_days)]
    offsets = cycle_offsets(plan.seconds, plan.business_days)
    progress(
        f"soak: {plan.seconds:g} s at {plan.rate_financial:g} financial + {plan.rate_nonfinancial:g} non-financial TPS"
        f" through {entry}; cycles for {dates[0]} .. {dates[-1]}, one every {offsets[1] - offsets[0] if len(offsets) > 1 else 0:.1f} s"
        f" from +{offsets[0]:.0f} s"
    )
    with (directory / "locust.log").open("wb") as load_log:
        load = subprocess.Popen(
            locust_argv(entry, plan, directory, population, tokens_file),
            stdout=load_log,
            stderr=subprocess.STDOUT,
            cwd=REPO_ROOT,
            start_new_session=True,
        )
    # Locust opens the customers before its run-time clock starts: so do the cycles
    deadline = time.monotonic() + POPULATION_WAIT_S_MAX
    while not population.exists() and load.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    if not population.exists():
        _stop(load)
        raise RuntimeError(f"the load generator opened no customers; read {directory / 'locust.log'}")
    driver = CycleDriver(entry, dates, offsets, tokens.get("operator"), progress)
    driver.start()
    try:
        try:
            load.wait(timeout=plan.seconds + LOAD_STOP_TIMEOUT_S + 120)
        except subprocess.TimeoutExpired:
            progress("the load generator did not stop by itself: stopping it")
    finally:
        driver.stopping.set()
        driver.join(timeout=CYCLE_TIMEOUT_S)
        _stop(load)
    progress("verifying: ack log against the ledgers, trial balances, limits")
    acked = [e for e in read_ack_log(directory / "ack.jsonl") if e.get("idempotency_key")]
    found = keys_found(acked)
    balances, views = ledger_checks(entry, cells, population, tokens)
    invariants = verdicts.invariants(balances, views)
    rpo = verdicts.rpo(acked, found)
    summary_path = directory / "load-summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    load_figures = summary.get("load", {})
    requests = int(summary.get("total", {}).get("requests", 0) or 0)
    errors = int(summary.get("total", {}).get("failures", 0) or 0)
    error_ratio = errors / requests if requests else 1.0
    reasons = [f"invariant {name} does not hold" for name, held in invariants.items() if not held]
    if rpo["missing"]:
        reasons.append(f"{rpo['missing']} of {rpo['acknowledged']} acknowledged transactions missing")
    ran = [c for c in driver.runs if c.status == 200 and not c.failed_cells]
    if len(ran) != len(dates):
        reasons.append(f"{len(ran)} of {len(dates)} cycles answered 200")
    if error_ratio > plan.error_ratio_max:
        reasons.append(f"load error ratio {error_ratio:.4f} above {plan.error_ratio_max}")
    result = {
        "passed": not reasons,
        "reasons": reasons,
        "plan": {**asdict(plan), "first_business_date": dates[0].isoformat()},
        "invariants": invariants,
        "trial_balances": balances,
        "customers_checked": len(views),
        "rpo": {"acknowledged": rpo["acknowledged"], "missing": rpo["missing"]},
        "acknowledged_by_endpoint": _count_by(acked, "endpoint"),
        "cycles": {
            "run": len(driver.runs),
            "answered": len(ran),
            "statements": sum(c.statements for c in driver.runs),
            "interest_fen": sum(c.interest_fen for c in driver.runs),
            "fees_fen": sum(c.fees_fen for c in driver.runs),
            "late_fees_fen": sum(c.late_fees_fen for c in driver.runs),
            "installment_billed_fen": sum(c.installment_billed_fen for c in driver.runs),
            "seconds_max": max((c.seconds for c in driver.runs), default=0.0),
            "each": [asdict(c) for c in driver.runs],
        },
        "load": {**load_figures, "requests": requests, "error_ratio": round(error_ratio, 6)},
    }
    (directory / "soak.json").write_text(json.dumps(result, indent=2) + "\n")
    progress(f"soak: {'PASSED' if result['passed'] else 'FAILED'}; report {directory / 'soak.json'}")
    for reason in reasons:
        progress(f"  {reason}")
    return result


def _count_by(entries: list[dict[str, Any]], key: str) -> dict[str, int]:
    counts: dict[str, int] = {}
    for entry in entries:
        counts[str(entry.get(key))] = counts.get(str(entry.get(key)), 0) + 1
    return dict(sorted(counts.items()))


def _stop(process: subprocess.Popen[bytes]) -> None:
    for what in stop_load_generator(process, LOAD_STOP_TIMEOUT_S):
        log.warning("load: Locust %s", what)
