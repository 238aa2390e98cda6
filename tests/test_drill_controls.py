"""The drill as `make drill` and a CI pipeline run it, on a real topology: a dry run changes
nothing, a deliberately tight safeguard aborts the drill (rollbacks run, exit 3, the report says
why and when), the kill switch stops a drill in flight within 10 s, and the default drill (the loss
of the prod site, Locust load through the entry) with the statement cycle running during the fault
passes every verdict, reports as CONTRACT.md says and writes JUnit that validates."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import xmlschema

from tests.topologies import moved
from watertight import drill
from watertight import topology as topology_module
from watertight.chaos import probes
from watertight.pg import service_tempdir
from watertight.runtime.local import LocalRuntime

TEXT = moved(90, 5)
REPO = Path(__file__).resolve().parents[1]
RATES = (50.0, 100.0)
DRILL_RATES = (60.0, 150.0)  # `make drill`'s: financial and non-financial TPS
STOP_S_MAX = 10.0


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = service_tempdir("watertight-controls-")
    run_dir.chmod(0o755)
    local = LocalRuntime(run_dir, topology_module.parse(TEXT, "drill controls topology"), TEXT)
    try:
        local.up(progress=print)
        yield local
    finally:
        local.down(purge=True)


def every_pid(runtime: LocalRuntime) -> dict[str, list[int]]:
    """Every long-lived process of every component: not PostgreSQL's children (a backend per
    connection, autovacuum workers), which come and go by themselves."""
    return {
        c["name"]: sorted(p["pid"] for p in c["processes"] if p["role"] != "postgres-child")
        for c in runtime.status()["components"]
    }


def steady(runtime: LocalRuntime) -> None:
    assert probes.not_steady_reasons(run_dir=str(runtime.run_dir)) == []


def test_a_dry_run_lists_what_each_action_would_hit_and_changes_nothing(runtime: LocalRuntime) -> None:
    before = every_pid(runtime)
    text = drill.dry_run(["site-loss-prod", "partition-prod", "patroni-crash"], runtime.run_dir)
    assert every_pid(runtime) == before
    assert "SIGKILL every process of site prod" in text
    for pid in before["pg-cell1-prod"]:
        assert str(pid) in text  # every process of the member, by PID and role
    assert "(patroni)" in text and "(keeper)" in text and "existing connections cut" in text
    assert "[rollbacks] restart-the-prod-site" in text


def test_a_tight_safeguard_aborts_the_drill_heals_and_says_why(runtime: LocalRuntime, tmp_path: Path) -> None:
    options = drill.Options(
        *RATES, safeguards={"writable_primaries": 0}, history_path=tmp_path / "history.jsonl"
    )
    junit_path = tmp_path / "junit.xml"
    code = drill.run(["postgres-crash"], *RATES, tmp_path, runtime.run_dir, print, options, junit_path)
    report = json.loads((tmp_path / "postgres-crash" / "report.json").read_text())
    assert code == drill.EXIT_ABORTED
    assert report["passed"] is False and report["status"] == "interrupted"
    assert "writable primaries" in report["aborted"]["reason"]
    assert report["aborted"]["at"] and report["aborted"]["seconds_after_fault"] < 30
    assert report["reasons"][0].startswith("aborted by a safeguard")
    steady(runtime)  # the rollbacks ran and the drill healed
    xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd")).validate(junit_path.read_text())
    assert "<error" in junit_path.read_text()
    (line,) = [json.loads(row) for row in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert line["experiment"] == "postgres-crash" and line["aborted"] is True


def test_the_kill_switch_stops_a_drill_in_flight_within_ten_seconds(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    options = drill.Options(*RATES, history_path=None)
    codes: list[int] = []
    worker = threading.Thread(
        target=lambda: codes.append(
            drill.run(["patroni-crash"], *RATES, tmp_path, runtime.run_dir, print, options)
        )
    )
    worker.start()
    marks = tmp_path / "patroni-crash" / "marks.jsonl"
    deadline = time.monotonic() + 300
    while not (marks.exists() and '"method-start"' in marks.read_text()):
        assert worker.is_alive() and time.monotonic() < deadline, "the drill never reached its method"
        time.sleep(0.2)
    time.sleep(2.0)  # the fault is in force
    asked = time.monotonic()
    assert drill.stop(runtime.run_dir, print) == 0
    assert time.monotonic() - asked <= STOP_S_MAX + 1
    worker.join(timeout=600)
    assert codes == [drill.EXIT_ABORTED]
    report = json.loads((tmp_path / "patroni-crash" / "report.json").read_text())
    assert "kill switch" in report["aborted"]["reason"]
    steady(runtime)


def test_the_default_drill_with_the_cycle_running_passes_and_reports_as_the_contract_says(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    """`make drill`'s experiment at its rates, with the statement cycle running during the fault
    and JUnit written, as a CI pipeline runs it: the report CONTRACT.md names, every verdict.
    (One drill for both: a second topology and drill of the same experiment cost 3-4 minutes.)"""
    options = drill.Options(*DRILL_RATES, during="cycle", history_path=tmp_path / "history.jsonl")
    junit_path = tmp_path / "junit.xml"
    code = drill.run(["site-loss-prod"], *DRILL_RATES, tmp_path, runtime.run_dir, print, options, junit_path)
    report = json.loads((tmp_path / "site-loss-prod" / "report.json").read_text())
    assert code == 0, report["reasons"]
    assert report["experiment"] == "site-loss-prod"
    assert report["status"] == "completed"
    assert report["passed"] is True
    assert report["fault"]["kind"] == "site-loss" and report["fault"]["target"] == "prod"
    assert report["fault"]["injected_at"]
    # cell 1 was led by prod: it failed over within the RTO; cell 2 (samecity) never noticed
    assert 0 < report["rto_seconds"]["cell-1"] <= 30
    assert report["unaffected_cells"]["cells"] == ["cell-2"]
    assert report["unaffected_cells"]["error_rate"] == 0.0
    assert report["unaffected_cells"]["requests"] > 0
    assert report["rpo"]["acknowledged"] > 0 and report["rpo"]["missing"] == 0
    assert report["invariants"] == {
        "journal_balanced": True,
        "balances_match_postings": True,
        "limits_respected": True,
    }
    assert report["split_brain"] is False
    # the client-side verdicts: every read showed what was acknowledged before it, every request
    # whose answer was lost turned out wholly applied or absent, never two writable primaries
    assert report["stale_reads"] == 0 and report["stale_reads_detail"]["reads"] > 0
    assert set(report["indeterminate"]) == {"requests", "applied", "absent", "partial"}
    assert report["indeterminate"]["partial"] == 0
    assert (
        report["indeterminate"]["requests"]
        == report["indeterminate"]["applied"] + report["indeterminate"]["absent"]
    )
    assert report["writable_primaries_max"] == {"cell-1": 1, "cell-2": 1}
    assert report["slo"] == {"rto_seconds": 30.0, "rpo_missing": 0}
    # monitoring told of the lost site within 15 s, said nothing before it, and fell silent after
    detection = report["detection"]
    assert detection["first_alert"] and 0 < detection["seconds_to_detect"] <= 15, detection
    assert detection["false_alarms"] == 0 and detection["unresolved"] == [], detection
    assert {"CellLeaderMissing", "PatroniMemberDown"} <= {a["alert"] for a in detection["alerts"]}
    assert set(report["load"]) >= {"financial_tps", "nonfinancial_tps", "p50_ms", "p99_ms", "errors"}
    assert (tmp_path / "site-loss-prod" / report["journal"]).exists()
    page = (tmp_path / "site-loss-prod" / report["html"]).read_text()
    assert "<svg" in page and "cell-1" in page and "site-loss prod" in page
    assert f"alert {detection['first_alert']}" in page
    # the statement cycle ran during the fault and finished
    assert report["during"]["task"] == "cycle" and report["during"]["started_at"]
    assert report["during"]["result"]["status"] == 200, report["during"]
    text = junit_path.read_text()
    xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd")).validate(text)
    assert 'failures="0"' in text
    # the rollback brought prod back, and the drill left the topology whole
    assert all(site["up"] for site in runtime.status()["sites"].values())
    steady(runtime)
