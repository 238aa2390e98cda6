"""The default drill, end to end, as `make drill` runs it: a fresh local topology, Locust load
through the entry, the loss of the prod site by Chaos Toolkit, and the report CONTRACT.md names."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topologies import moved
from watertight import drill
from watertight import topology as topology_module
from watertight.pg import service_tempdir
from watertight.runtime.local import LocalRuntime

TEXT = moved(40, 2)


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = service_tempdir("watertight-drill-")
    run_dir.chmod(0o755)
    local = LocalRuntime(run_dir, topology_module.parse(TEXT, "drill test topology"), TEXT)
    try:
        local.up(progress=print)
        yield local
    finally:
        local.down(purge=True)


def test_the_default_drill_passes_and_reports_as_the_contract_says(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    code = drill.run(["site-loss-prod"], 60.0, 150.0, tmp_path, runtime.run_dir, print)
    report_path = tmp_path / "site-loss-prod" / "report.json"
    report = json.loads(report_path.read_text())
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
    # the rollback brought prod back, and the drill left the topology whole
    assert all(site["up"] for site in runtime.status()["sites"].values())


def test_an_unknown_experiment_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no experiment 'site-loss-mars'"):
        drill.run(["site-loss-mars"], 10, 10, tmp_path, tmp_path / "run", print)
    assert not (tmp_path / "run").exists()
