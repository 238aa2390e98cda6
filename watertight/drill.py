"""``watertight drill``: the main job. Bring the topology up, drive card traffic at it with
Locust (every acknowledged financial transaction in an ack log), run a Chaos Toolkit experiment,
stop the load and verify: RTO per affected cell from the load timeline, acknowledged
transactions missing from the ledgers (RPO), errors of the cells the fault should not touch,
ledger invariants and split brain. Writes report.json, report.html and the Chaos Toolkit journal;
the exit code is the verdict.

Never: judge from anything but what was measured; leave the load generator running.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg

from watertight import junit, report, trend, verdicts
from watertight import topology as topology_module
from watertight.chaos import safeguards, targets
from watertight.faults import FAULTS, Fault
from watertight.monitoring import detection
from watertight.monitoring.receiver import AlertReceiver
from watertight.runtime.local import REPO_ROOT, LocalRuntime, RuntimeError_, http_json
from watertight.runtime.processes import stop_load_generator
from watertight.runtime.target import Target, TargetUnsupported

EXPERIMENTS_DIR = REPO_ROOT / "chaos" / "experiments"
LOCUSTFILE = REPO_ROOT / "loadtests" / "locustfile.py"
WARMUP_S = 8.0
TAIL_S = 10.0
CHAOS_TIMEOUT_S = 600.0
# Locust writes its CSV history, HTML and summary on the way out: slow on a loaded machine; after
# SIGINT it gets as long again after SIGTERM (stop_load_generator)
LOAD_STOP_TIMEOUT_S = 60.0
SAMPLE_INTERVAL_S = 0.5

HISTORY_DEFAULT = REPO_ROOT / "reports" / trend.HISTORY_FILE
EXIT_PASSED, EXIT_FAILED, EXIT_ABORTED = 0, 1, 3
STOP_WAIT_S_MAX = 10.0
DRILLS_DIR = "drills"

log = logging.getLogger("watertight.drill")

Progress = Callable[[str], None]


@dataclass(frozen=True)
class Options:
    """How to drill, beyond which experiments: rates, safeguards, a task to run during the fault."""

    rate_financial: float = 100.0
    rate_nonfinancial: float = 300.0
    safeguards: dict[str, float] = field(default_factory=dict)
    during: str | None = None  # "cycle", "cycle=YYYY-MM-DD" or "runbook:NAME[:key=value,...]"
    history_path: Path | None = HISTORY_DEFAULT


def parse_during(text: str | None) -> tuple[str, dict[str, str]] | None:
    """``cycle[=YYYY-MM-DD]`` or ``runbook:NAME[:key=value,...]``; ValueError naming what is wrong."""
    if not text:
        return None
    if text == "cycle" or text.startswith("cycle="):
        business_date = text.partition("=")[2] or datetime.now(UTC).date().isoformat()
        try:
            datetime.strptime(business_date, "%Y-%m-%d")
        except ValueError:
            raise ValueError(f"--during {text}: the business date must be YYYY-MM-DD") from None
        return "cycle", {"business_date": business_date}
    if text.startswith("runbook:"):
        _, name, rest = [*text.split(":", 2), ""][:3]
        if not name or not (REPO_ROOT / "runbooks" / f"{name}.yml").exists():
            known = ", ".join(sorted(p.stem for p in (REPO_ROOT / "runbooks").glob("*.yml")))
            raise ValueError(f"--during {text}: no runbook {name!r}; known: {known}")
        extras = dict(item.split("=", 1) for item in rest.split(",") if "=" in item)
        return f"runbook:{name}", extras
    raise ValueError(f"--during {text}: expected cycle, cycle=YYYY-MM-DD or runbook:NAME[:key=value,...]")


def load_experiment(name: str) -> tuple[Path, Fault]:
    path = Path(name) if name.endswith(".json") else EXPERIMENTS_DIR / f"{name}.json"
    if not path.exists():
        known = ", ".join(sorted(p.stem for p in EXPERIMENTS_DIR.glob("*.json"))) or "none"
        raise RuntimeError_(f"no experiment {name!r}; known: {known}")
    raw = json.loads(path.read_text()).get("configuration", {}).get("watertight_fault")
    if isinstance(raw, dict) and "kind" in raw:
        return path, Fault.from_configuration(raw)
    if path.stem not in FAULTS:
        raise RuntimeError_(
            f"{path}: say what it breaks in configuration.watertight_fault (kind, site or cell)"
        )
    return path, FAULTS[path.stem]


def failed_actions(journal: dict[str, Any]) -> list[str]:
    """The method's actions that failed, each with the last line of its error."""
    failed = []
    for run in journal.get("run") or []:
        activity = run.get("activity") or {}
        if activity.get("type") == "action" and run.get("status") == "failed":
            error = run.get("exception") or []
            last = str(error[-1]).strip() if error else "no error recorded"
            failed.append(f"{activity.get('name')}: {last}")
    return failed


def fault_action_failed(journal: dict[str, Any]) -> bool:
    """The method's first action (the fault) failed."""
    runs = [r for r in journal.get("run") or [] if (r.get("activity") or {}).get("type") == "action"]
    return bool(runs) and runs[0].get("status") == "failed"


def marks_of(path: Path) -> tuple[float | None, float | None]:
    """When the fault was injected (the first action of the method) and when the rollbacks began,
    from the marks the extension's controls wrote."""
    fault_at = rollback_at = None
    in_method = False
    if not path.exists():
        return None, None
    for line in path.read_text().splitlines():
        mark = json.loads(line)
        if mark["event"] == "method-start":
            in_method = True
        elif (
            mark["event"] == "activity-start"
            and in_method
            and fault_at is None
            and mark.get("activity_type") == "action"
        ):
            fault_at = float(mark["t"])
        elif mark["event"] == "rollback-start" and rollback_at is None:
            rollback_at = float(mark["t"])
    return fault_at, rollback_at


class Sampler(threading.Thread):
    """Samples, every SAMPLE_INTERVAL_S, how many members of each cell would acknowledge a write
    (asked of each member's PostgreSQL: out of recovery, not read-only, its sync standby attached
    when it has one to wait for): two at the same moment is a split brain. A primary that has
    just woken from a freeze is still out of recovery until Patroni demotes it, but every commit
    on it waits for a sync standby that now follows someone else: it acknowledges nothing."""

    def __init__(self, runtime: Target) -> None:
        super().__init__(daemon=True)
        self.runtime = runtime
        self.samples: list[tuple[float, int, int]] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        from watertight.chaos import probes

        # its own runtime: the drill's thread uses the other one meanwhile
        runtime = targets.runtime(self.runtime.name, str(self.runtime.run_dir))
        while not self.stopping.is_set():
            at = time.time()
            try:
                counts = probes.writable_primaries_of(runtime)
            except Exception as error:  # a sample lost is a gap, not the end of the drill
                log.warning("split-brain sample failed: %s", error)
                counts = {}
            for cell, count in counts.items():
                self.samples.append((at, int(cell), count))
            self.stopping.wait(SAMPLE_INTERVAL_S)


def start_load(
    runtime: Target, directory: Path, rate_financial: float, rate_nonfinancial: float, seconds: float
) -> subprocess.Popen[bytes]:
    users = max(20, int((rate_financial + rate_nonfinancial) / 10))
    population = runtime.run_dir / "load" / "population.json"
    population.parent.mkdir(parents=True, exist_ok=True)
    argv = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--host", runtime.entry_url,
        "-u", str(users), "-r", str(users), "-t", f"{int(seconds)}s", "--stop-timeout", "5",
        "--rate-financial", f"{rate_financial:g}", "--rate-nonfinancial", f"{rate_nonfinancial:g}",
        "--population", str(population), "--ack-log", str(directory / "ack.jsonl"),
        "--api-tokens", str(runtime.api_tokens_file()),
        "--history", str(directory / "history.jsonl"), "--timeline", str(directory / "timeline.jsonl"),
        "--csv", str(directory / "load"), "--csv-full-history", "--html", str(directory / "load.html"),
        "--summary-json", str(directory / "load-summary.json"),
        # the drill judges by its verdicts; the gates only report
        "--max-error-ratio", "1", "--max-p99-ms", "1000000", "--min-tps-ratio", "0",
    ]  # fmt: skip
    log = (directory / "locust.log").open("wb")
    return subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, start_new_session=True)


def timeline_of(
    history_csv: Path,
) -> tuple[list[tuple[float, int, bool]], dict[str, list[tuple[float, float, float]]]]:
    """Per-cell successes and failures per second from Locust's full stats history: samples for
    the verdicts, and series for the plots (seconds since the first row)."""
    from watertight_load.traffic import parse_request_name

    totals: dict[tuple[float, int], list[int]] = {}
    previous: dict[str, tuple[int, int]] = {}
    if not history_csv.exists():
        return [], {}
    with history_csv.open() as handle:
        for row in csv.DictReader(handle):
            name = row.get("Name", "")
            cell = parse_request_name(name)[1]
            if cell is None:
                continue
            requests, failures = int(row["Total Request Count"]), int(row["Total Failure Count"])
            before = previous.get(name, (0, 0))
            previous[name] = (requests, failures)
            slot = totals.setdefault((float(row["Timestamp"]), cell), [0, 0])
            slot[0] += (requests - failures) - (before[0] - before[1])
            slot[1] += failures - before[1]
    samples: list[tuple[float, int, bool]] = []
    series: dict[str, list[tuple[float, float, float]]] = {}
    start = min((t for t, _ in totals), default=0.0)
    for (t, cell), (ok, failed) in sorted(totals.items()):
        # one sample per request, so the isolation ratio and its count are of requests
        samples.extend([(t, cell, True)] * ok)
        samples.extend([(t, cell, False)] * failed)
        series.setdefault(f"cell-{cell}", []).append((t - start, float(ok), float(failed)))
    return samples, series


ID_TABLES = {"auth_id": "authorizations", "transaction_id": "transactions", "plan_id": "installment_plans"}


async def _ledger_lookup(
    runtime: Target, keys_by_cell: dict[int, list[str]], with_effects: bool
) -> dict[str, str]:
    """For each idempotency key a cell's primary holds: ``applied``, or with ``with_effects``
    ``partial`` when an id its stored answer names (an auth_id, transaction_id or plan_id) is not
    in its table. Keys the cells do not hold are not in the result."""
    password = runtime.superuser_password()
    root_cert = runtime.root_cert()
    tls: dict[str, Any] = {}
    if root_cert is not None:  # verify-full: the CA signed it, for the address dialled
        tls["ssl"] = ssl.create_default_context(cafile=root_cert)
    found: dict[str, str] = {}
    for cell, keys in keys_by_cell.items():
        conn = await asyncpg.connect(
            host=runtime.primary_hosts(cell),
            port=runtime.topology.postgres_port(cell),
            user="postgres",
            password=password,
            database="cardcore",
            target_session_attrs="read-write",
            timeout=10,
            **tls,
        )
        try:
            for start in range(0, len(keys), 5000):
                chunk = keys[start : start + 5000]
                if not with_effects:
                    rows = await conn.fetch("SELECT key FROM idempotency WHERE key = ANY($1::text[])", chunk)
                    found.update((row[0], "applied") for row in rows)
                    continue
                rows = await conn.fetch(
                    "SELECT key, response FROM idempotency WHERE key = ANY($1::text[])", chunk
                )
                for key, response in rows:
                    try:
                        answer = json.loads(bytes(response))
                    except ValueError:
                        answer = {}
                    outcome = "applied"
                    for field, table in ID_TABLES.items():
                        value = answer.get(field) if isinstance(answer, dict) else None
                        if isinstance(value, str) and not await conn.fetchval(
                            f"SELECT 1 FROM {table} WHERE {field} = $1", value
                        ):
                            outcome = "partial"
                    found[key] = outcome
        finally:
            await conn.close()
    return found


async def keys_in_ledgers(runtime: Target, keys_by_cell: dict[int, list[str]]) -> set[str]:
    """The idempotency keys each cell's primary has committed: every acknowledged financial
    request leaves its key there, in the same transaction as its postings."""
    return set(await _ledger_lookup(runtime, keys_by_cell, with_effects=False))


def found_in_ledgers(runtime: Target, acked: list[dict[str, Any]]) -> set[str]:
    """Which idempotency keys of ack-log entries the cells' primaries hold."""
    keys_by_cell: dict[int, list[str]] = {}
    for entry in acked:
        keys_by_cell.setdefault(int(entry["cell"]), []).append(entry["idempotency_key"])
    return asyncio.run(keys_in_ledgers(runtime, keys_by_cell))


def resolve_indeterminate(runtime: Target, requests: list[dict[str, Any]]) -> dict[str, str]:
    """Each indeterminate request's outcome in its cell's ledger: ``applied`` (its key committed
    with everything its answer names), ``partial`` (committed, but something it named is not
    there) or ``absent`` (nothing committed under its key)."""
    keys_by_cell: dict[int, list[str]] = {}
    for request in requests:
        keys_by_cell.setdefault(int(request["cell"]), []).append(str(request["key"]))
    found = asyncio.run(_ledger_lookup(runtime, keys_by_cell, with_effects=True))
    return {key: found.get(key, "absent") for keys in keys_by_cell.values() for key in keys}


def ledger_checks(runtime: Target) -> tuple[list[dict[str, Any]], list[list[dict[str, Any]]]]:
    """Trial balance of every cell through the entry, and the limits of a sample of customers."""
    entry = runtime.entry_url
    tokens = runtime.client_tokens()
    balances = []
    for cell in runtime.topology.cell_numbers:
        path = f"/v1/admin/trial-balance?cell={cell}"
        status, body = http_json(entry + path, timeout_s=30, headers=tokens.headers("GET", path))
        balances.append(
            body
            if status == 200 and isinstance(body, dict)
            else {"cell": cell, "balanced": False, "error": status}
        )
    lines_views: list[list[dict[str, Any]]] = []
    population = runtime.run_dir / "load" / "population.json"
    if population.exists():
        customers = json.loads(population.read_text()).get("customers", [])[:50]
        for customer in customers:
            path = f"/v1/customers/{customer['customer_id']}/limits"
            status, body = http_json(entry + path, timeout_s=10, headers=tokens.headers("GET", path))
            if status == 200 and isinstance(body, dict):
                lines_views.append(body["lines"])
    return balances, lines_views


def stop_load(process: subprocess.Popen[bytes]) -> None:
    for what in stop_load_generator(process, LOAD_STOP_TIMEOUT_S):
        print(f"load: Locust {what} (its summary and reports may be missing)", file=sys.stderr)


DURING_ATTEMPTS_MAX = 20  # the cycle during a fault: asked again at most this many times
DURING_RETRY_PAUSE_S = 3.0
DURING_RETRY_S = 150.0  # and not after this long: a failover takes well under this


class During(threading.Thread):
    """The task of ``--during``: waits (bounded) for the fault's mark, then runs the statement
    cycle or a runbook while the fault is in force; what it did goes into the report."""

    def __init__(self, runtime: Target, task: tuple[str, dict[str, str]], marks: Path) -> None:
        super().__init__(daemon=True, name="drill-during")
        self.runtime = runtime
        self.task = task
        self.marks = marks
        self.result: dict[str, Any] = {"task": task[0], **task[1], "started_at": None}
        self.stopping = threading.Event()

    def run(self) -> None:
        deadline = time.monotonic() + CHAOS_TIMEOUT_S
        fault_at = None
        while fault_at is None and time.monotonic() < deadline and not self.stopping.is_set():
            fault_at = marks_of(self.marks)[0]
            if fault_at is None:
                self.stopping.wait(0.2)
        if fault_at is None:
            self.result["error"] = "the fault was never injected: not run"
            return
        self.result["started_at"] = datetime.now(UTC).isoformat()
        self.result["seconds_after_fault"] = round(time.time() - fault_at, 1)
        name, arguments = self.task
        try:
            if name == "cycle":
                # as a batch scheduler runs it: the cycle is idempotent per business date, so a cell
                # that failed mid-fault (503 partial, no answer) is asked again, a bounded number of
                # times, while the cells that finished skip what they did
                attempts: list[int] = []
                retry_until = time.monotonic() + DURING_RETRY_S
                while True:
                    status, body = post_json(
                        self.runtime,
                        "/v1/admin/cycle",
                        {"business_date": arguments["business_date"]},
                        "operator",
                        120,
                    )
                    attempts.append(status)
                    retryable = status in (0, 502, 503, 504)
                    if (
                        not retryable
                        or len(attempts) >= DURING_ATTEMPTS_MAX
                        or time.monotonic() >= retry_until
                    ):
                        break
                    if self.stopping.wait(DURING_RETRY_PAUSE_S):
                        break
                self.result["result"] = {"status": status, "body": body, "attempts": attempts}
                if status != 200:
                    self.result["error"] = (
                        f"the cycle answered {status} after {len(attempts)} attempt(s): {body}"
                    )
            else:
                from watertight.runbooks import runner

                summary = runner.run(
                    name.split(":", 1)[1], arguments, self.runtime.run_dir, target=self.runtime
                )
                self.result["result"] = {"rc": summary["rc"], "failed_step": summary.get("failed_step")}
                if summary["rc"] != 0:
                    self.result["error"] = f"failed at {summary.get('failed_step')}: {summary.get('error')}"
        except Exception as error:  # said in the report; the verdicts judge the topology
            self.result["error"] = f"{type(error).__name__}: {error}"
        self.result["seconds"] = round(time.time() - fault_at - self.result["seconds_after_fault"], 1)


def post_json(
    runtime: Target, path: str, body: dict[str, Any], kind: str, timeout_s: float
) -> tuple[int, Any]:
    """POST through the entry as a client of ``kind``; (status, body), status 0 without an answer."""
    import urllib.error
    import urllib.request

    headers = {"content-type": "application/json", "authorization": f"Bearer {runtime.api_tokens()[kind]}"}
    request = urllib.request.Request(
        runtime.entry_url + path, data=json.dumps(body).encode(), headers=headers, method="POST"
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError) as error:
        return 0, str(error)


def run_one(
    runtime: Target,
    name: str,
    rate_financial: float,
    rate_nonfinancial: float,
    report_dir: Path,
    progress: Progress,
    options: Options | None = None,
    receiver: AlertReceiver | None = None,
) -> dict[str, Any]:
    options = options or Options(rate_financial, rate_nonfinancial)
    during = parse_during(options.during)
    path, fault = load_experiment(name)
    directory = report_dir / path.stem if report_dir.name != path.stem else report_dir
    directory.mkdir(parents=True, exist_ok=True)
    leaders = {cell: runtime.cell_view(cell)["leader_site"] for cell in runtime.topology.cell_numbers}
    affected = fault.affected_cells(leaders)
    unaffected = [cell for cell in runtime.topology.cell_numbers if cell not in affected]
    progress(
        f"{path.stem}: leaders {leaders}; the fault should interrupt cells {affected or 'none'}, not {unaffected or 'none'}"
    )
    alerting = runtime.alerting()
    if receiver is not None and alerting is not None:
        detection.wait_quiet(alerting.alertmanager_url, progress)
    steady_from = time.time()
    load = start_load(runtime, directory, rate_financial, rate_nonfinancial, WARMUP_S + CHAOS_TIMEOUT_S)
    sampler = Sampler(runtime)
    chaos_status = "not run"
    journal_doc: dict[str, Any] = {}
    aborted: dict[str, Any] | None = None
    during_task: During | None = None
    started = time.time()
    fault_at: float | None = None
    rollback_at: float | None = None
    recovered_at: float | None = None  # the experiment (rollback included) done
    try:
        progress(
            f"load: {rate_financial:g} financial + {rate_nonfinancial:g} non-financial TPS through {runtime.entry_url}; warming up {WARMUP_S:g} s"
        )
        time.sleep(WARMUP_S)
        if load.poll() is not None:
            raise RuntimeError_(f"the load generator exited early; read {directory / 'locust.log'}")
        sampler.start()
        journal = directory / "journal.json"
        progress(f"chaos: running {path.name} (journal {journal})")
        marks = directory / "marks.jsonl"
        env = {
            **os.environ,
            "WATERTIGHT_RUN_DIR": str(runtime.run_dir),
            targets.TARGET_ENV: runtime.name,
            "WATERTIGHT_MARKS_PATH": str(marks),
            "WATERTIGHT_SAFEGUARDS": ",".join(f"{k}={v:g}" for k, v in options.safeguards.items()),
            "WATERTIGHT_TIMELINE_PATH": str(directory / "timeline.jsonl"),
            "WATERTIGHT_ACK_LOG_PATH": str(directory / "ack.jsonl"),
        }
        if during is not None:
            during_task = During(runtime, during, marks)
            during_task.start()
        with (directory / "chaos.log").open("wb") as log:
            chaos = subprocess.run(
                [sys.executable, "-m", "chaostoolkit", "--no-version-check", "--no-log-file", "run", "--journal-path", str(journal), str(path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, timeout=CHAOS_TIMEOUT_S, check=False,
            )  # fmt: skip
        journal_doc = json.loads(journal.read_text()) if journal.exists() else {}
        chaos_status = str(journal_doc.get("status", f"chaos exited {chaos.returncode}"))
        fault_at, rollback_at = marks_of(marks)
        recovered_at = time.time()
        aborted = safeguards.read_abort(marks)
        if aborted is not None:
            progress(f"chaos: ABORTED by a safeguard: {aborted['reason']}")
        if during_task is not None:
            during_task.join(timeout=CHAOS_TIMEOUT_S)
            progress(f"during the fault: {during_task.result}")
        progress(f"chaos: {chaos_status}; load goes on {TAIL_S:g} s")
        detection.tail(receiver, steady_from, recovered_at, TAIL_S, progress)
    finally:
        sampler.stopping.set()
        if during_task is not None:
            during_task.stopping.set()
        stop_load(load)
    progress("verifying: ack log against the ledgers, timeline, invariants")
    from watertight_load.ack_log import read_ack_log
    from watertight_load.history import read_history

    acked = [e for e in read_ack_log(directory / "ack.jsonl") if e.get("idempotency_key")]
    found = found_in_ledgers(runtime, acked)
    history = read_history(directory / "history.jsonl")
    unknown = [entry for entry in history if entry.get("op") == "indeterminate"]
    outcomes = resolve_indeterminate(runtime, unknown) if unknown else {}
    samples, series = timeline_of(directory / "load_stats_history.csv")
    balances, lines_views = ledger_checks(runtime)
    summary = (
        json.loads((directory / "load-summary.json").read_text())
        if (directory / "load-summary.json").exists()
        else {}
    )
    if fault_at is None:
        fault_at = started  # no mark: judge from when the experiment began
    window_end = rollback_at or time.time()
    # recovery is timed from the rollback when only the rollback can heal the fault (and it ran);
    # from the fault otherwise, up to the rollback so its own blips do not count
    if fault.recovery_from == "rollback" and rollback_at is not None:
        recovery_from, origin, until = "rollback", rollback_at, None
    else:
        recovery_from, origin, until = "fault", fault_at, rollback_at
    rto = {cell: verdicts.rto_seconds(samples, cell, origin, until=until) for cell in affected}
    judged = verdicts.verdict(
        rto=rto,
        unaffected_rto={
            cell: verdicts.rto_seconds(samples, cell, fault_at, until=rollback_at) for cell in unaffected
        },
        rto_measured_from=recovery_from,
        rpo_result=verdicts.rpo(acked, found),
        unaffected_cells=unaffected,
        unaffected_error_rate=verdicts.isolation(samples, unaffected, (fault_at, window_end)),
        unaffected_requests=verdicts.requests_in(samples, unaffected, (fault_at, window_end)),
        invariants_result=verdicts.invariants(balances, [{"lines": view} for view in lines_views]),
        split_brain_seen=verdicts.split_brain(sampler.samples) if sampler.samples else None,
        slo_rto_seconds=runtime.topology.slo.rto_seconds,
        slo_rpo_missing=runtime.topology.slo.rpo_transactions,
        stale=verdicts.stale_reads(history),
        indeterminate_result=verdicts.indeterminate(unknown, outcomes),
        writable_max=verdicts.writable_primaries_max(sampler.samples, runtime.topology.cell_numbers)
        if sampler.samples
        else None,
    )
    judged["detection"], missed = detection.judge(
        receiver, fault.kind, steady_from, fault_at, recovered_at or time.time()
    )
    judged["passed"] = judged["passed"] and not missed
    judged["reasons"].extend(missed)
    if chaos_status != "completed":
        judged["passed"] = False
        judged["reasons"].append(
            f"the experiment did not complete: {chaos_status} (see chaos.log and the journal)"
        )
    for index, failed in enumerate(failed_actions(journal_doc)):
        # Chaos Toolkit completes an experiment whose action failed: the fault (the first action)
        # was never injected, or a later one (a second fault, a sampling action) did not do its part
        judged["passed"] = False
        what = (
            "the fault was not injected"
            if index == 0 and fault_action_failed(journal_doc)
            else "an action failed"
        )
        judged["reasons"].append(f"{what}: {failed} (see the journal)")
    if aborted is not None:
        judged["passed"] = False
        judged["reasons"].insert(0, f"aborted by a safeguard: {aborted['reason']}")
    if during_task is not None and during_task.result.get("started_at") is None:
        judged["passed"] = False
        judged["reasons"].append(f"--during {options.during}: {during_task.result.get('error')}")
    result = {
        "experiment": path.stem,
        "status": chaos_status,
        "passed": judged["passed"],
        "fault": {
            "kind": fault.kind,
            "target": fault.target,
            "injected_at": datetime.fromtimestamp(fault_at, UTC).isoformat(),
        },
        **{key: value for key, value in judged.items() if key != "passed"},
        "load": summary.get("load", {}),
        "affected_cells": [verdicts.cell_key(cell) for cell in affected],
        "aborted": None
        if aborted is None
        else {
            "reason": aborted["reason"],
            "at": datetime.fromtimestamp(float(aborted["at"]), UTC).isoformat(),
            "seconds_after_fault": round(float(aborted["at"]) - fault_at, 1),
        },
        "during": during_task.result if during_task is not None else None,
    }
    result["journal"] = "journal.json"
    result["html"] = "report.html"
    start = min((t for t, _, _ in samples), default=fault_at)
    plot_marks: dict[str, list[tuple[float, str, str]]] = {}
    for cell in runtime.topology.cell_numbers:
        key = f"cell-{cell}"
        plot_marks[key] = [(fault_at - start, f"{fault.kind} {fault.target}", "#d33")]
        if rollback_at is not None:
            plot_marks[key].append((rollback_at - start, "rollback", "#888"))
        rto = result["rto_seconds"].get(key)
        if cell in affected and isinstance(rto, (int, float)):
            plot_marks[key].append((origin - start + rto, f"recovered {rto:.1f} s", "#27a"))
        for t, label, colour in detection.marks(judged["detection"], [cell]).get(key, []):
            plot_marks[key].append((fault_at - start + t, label, colour))
    runs: list[dict[str, Any]] = []
    if options.history_path is not None:
        trend.append(options.history_path, trend.entry(result, datetime.now(UTC).isoformat(), _commit()))
        runs = [r for r in trend.read(options.history_path) if r.get("experiment") == path.stem]
    report.write_json(result, directory)
    report.write_html(result, series, plot_marks, directory, runs)
    progress(f"{path.stem}: {'PASSED' if result['passed'] else 'FAILED'}; report {directory / 'report.json'}")
    for reason in result.get("reasons", []):
        progress(f"  {reason}")
    return result


def runtime_of(target: str, run_dir: Path) -> Target:
    """The target's runtime; a local topology that does not run yet is the default topology's,
    which `up` starts."""
    try:
        return targets.runtime(target, str(run_dir))
    except RuntimeError_:
        text = topology_module.DEFAULT_PATH.read_text()
        return LocalRuntime(run_dir, topology_module.parse(text, str(topology_module.DEFAULT_PATH)), text)


def _commit() -> str | None:
    """The checked-out commit, for the history (None outside a git checkout)."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def spread_as_designed(runtime: Target, progress: Progress) -> dict[int, str]:
    """Switch every cell that a failover left on the other center back to the center the topology
    gives it (a Patroni switchover to the streaming sync standby: nothing acknowledged is lost), so
    each experiment meets the cells spread as designed; a site fault after a failover would
    otherwise interrupt no cell and prove nothing. Nothing is moved while dr serves. Returns the
    cells moved and where to."""
    from watertight.runbooks import ops

    if runtime.dr_active:
        return {}
    moved: dict[int, str] = {}
    for cell in runtime.topology.cell_numbers:
        home = runtime.topology.leader_site(cell)
        leader = runtime.cell_view(cell)["leader_site"]
        if leader in (None, home):
            continue
        progress(f"cell {cell} is led by {leader} since a failover; switching it back to {home}")
        try:
            result = runtime.switchover(cell, home)
        except ops.StepError as error:
            raise RuntimeError_(
                f"cell {cell} could not be switched back to {home}: {error}; the drill stops so its "
                "experiments are not judged on cells spread otherwise"
            ) from None
        progress(f"cell {cell}: {result['msg']}")
        moved[cell] = home
    return moved


def heal(runtime: Target, progress: Progress) -> None:
    """Whatever an experiment left down is started again and every cell goes back to its center,
    so the next one starts whole and spread as designed."""
    started = runtime.start()
    if started:
        progress(f"restarted {', '.join(started)} for the next experiment")
    runtime.up(progress)
    spread_as_designed(runtime, progress)


def catalogue() -> list[str]:
    """Every experiment of chaos/experiments, in name order (``watertight drill --all``)."""
    return sorted(path.stem for path in EXPERIMENTS_DIR.glob("*.json"))


def _drills_dir(run_dir: Path) -> Path:
    return run_dir / "chaos" / DRILLS_DIR


def _stop_requested_since(run_dir: Path, started: float) -> bool:
    stop = safeguards.stop_path(run_dir)
    return stop.exists() and stop.stat().st_mtime >= started


def run(
    experiments: list[str],
    rate_financial: float,
    rate_nonfinancial: float,
    report_dir: Path,
    run_dir: Path,
    progress: Progress,
    options: Options | None = None,
    junit_path: Path | None = None,
    target: str = targets.LOCAL,
) -> int:
    """Drill each experiment in turn; 0 when every one passed, 1 when a verdict failed, 3 when a
    safeguard or the kill switch aborted one (the remaining ones are not run after a stop).
    ``target``: the local topology of ``run_dir`` (started when it does not run), or the
    Kubernetes clusters (the local cluster of `watertight cluster`; ``run_dir`` holds the drill's
    own files)."""
    options = options or Options(rate_financial, rate_nonfinancial)
    parse_during(options.during)  # a bad --during fails before anything starts
    for name in experiments:
        load_experiment(name)  # fail before starting anything when a name is wrong
    runtime = runtime_of(target, run_dir)
    started = time.time()
    in_flight = _drills_dir(runtime.run_dir) / f"{os.getpid()}.json"
    in_flight.parent.mkdir(parents=True, exist_ok=True)
    in_flight.write_text(json.dumps({"pid": os.getpid(), "started": started, "experiments": experiments}))
    results: list[dict[str, Any]] = []
    receiver: AlertReceiver | None = None
    try:
        progress(f"topology: making sure it is up (run dir {runtime.run_dir})")
        runtime.up(progress)
        spread_as_designed(runtime, progress)
        alerting = runtime.alerting()
        if alerting is not None:
            try:
                receiver = AlertReceiver(alerting.receiver_url).start()
                progress(
                    f"monitoring: recording every alert Alertmanager delivers at {alerting.receiver_url}"
                )
            except OSError as error:  # another drill of this topology records them
                progress(f"monitoring: {error}; this drill's reports judge no detection")
        for name in experiments:
            if _stop_requested_since(runtime.run_dir, started):
                progress(f"stopped by `watertight drill --stop`: {name} and the rest are not run")
                break
            results.append(
                run_one(
                    runtime, name, rate_financial, rate_nonfinancial, report_dir, progress, options, receiver
                )
            )
            heal(runtime, progress)
    finally:
        if receiver is not None:
            receiver.stop()
        in_flight.unlink(missing_ok=True)
        if junit_path is not None:
            junit_path.parent.mkdir(parents=True, exist_ok=True)
            junit_path.write_text(junit.junit_xml(results))
            progress(f"JUnit: {junit_path}")
    if any(result.get("aborted") for result in results):
        return EXIT_ABORTED
    return EXIT_PASSED if all(result["passed"] for result in results) else EXIT_FAILED


def stop(run_dir: Path, progress: Progress) -> int:
    """The kill switch: every drill in flight on this run directory's topology leaves its method
    now and runs its rollbacks (the safeguards control watches the stop file); waits, bounded by
    ``STOP_WAIT_S_MAX``, until each has started its rollbacks or ended. 0 when none was left in
    its method, 1 otherwise."""
    stop_file = safeguards.stop_path(run_dir)
    stop_file.parent.mkdir(parents=True, exist_ok=True)
    stop_file.write_text(datetime.now(UTC).isoformat() + "\n")
    drills = []
    for record in sorted(_drills_dir(run_dir).glob("*.json")):
        try:
            pid = int(json.loads(record.read_text())["pid"])
        except (OSError, ValueError, KeyError):
            continue
        if processes_alive(pid):
            drills.append(pid)
        else:
            record.unlink(missing_ok=True)
    if not drills:
        progress(
            "no drill is in flight on this topology; the stop file stays for any that starts its method later"
        )
        return 0
    progress(
        f"stopping the drills in flight (PIDs {', '.join(map(str, drills))}): their faults are rolled back"
    )
    deadline = time.monotonic() + STOP_WAIT_S_MAX
    while time.monotonic() < deadline:
        if not any(_in_method(run_dir, pid) for pid in drills):
            progress("every drill in flight has left its method and is rolling back")
            return 0
        time.sleep(0.2)
    progress(f"a drill was still in its method after {STOP_WAIT_S_MAX:g} s; see its chaos.log")
    return 1


def processes_alive(pid: int) -> bool:
    from watertight.runtime import processes

    return processes.state_of(pid) not in (None, "Z", "X")


def _in_method(run_dir: Path, pid: int) -> bool:
    """Whether drill ``pid`` has an experiment in its method (its chaos run marks say so)."""
    if not processes_alive(pid):
        return False
    from watertight.runtime import processes

    for child in processes.descendants(pid):
        line = processes.cmdline(child)
        if "chaostoolkit" in line and " run " in f" {line} ":
            # the marks file is beside the journal the command line names
            parts = line.split()
            journal = Path(parts[parts.index("--journal-path") + 1]) if "--journal-path" in parts else None
            marks = journal.parent / "marks.jsonl" if journal else None
            if marks is None or not marks.exists():
                return True
            events = [json.loads(row)["event"] for row in marks.read_text().splitlines() if row.strip()]
            return "method-start" in events and "rollback-start" not in events
    return False


def dry_run(experiments: list[str], run_dir: Path, target: str = targets.LOCAL) -> str:
    """What each action of each experiment would hit now, and what its rollback would do."""
    from watertight.chaos import plan

    runtime = targets.runtime(target, str(run_dir))
    if not isinstance(runtime, LocalRuntime):
        raise TargetUnsupported(
            "the dry run",
            runtime.name,
            "the planner's view of what each action hits, which reads the local runtime's PIDs and sockets (not built for pods)",
            "run the experiment on the local topology with --dry-run, or without --dry-run here",
        )
    return "\n\n".join(plan.text(plan.dry_run(load_experiment(name)[0], runtime)) for name in experiments)
