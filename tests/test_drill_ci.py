"""What CI pipelines rely on, without a topology: JUnit output valid against the schema the suite
carries, the drill history and its regression flag, the safeguards' limits, the --during tasks,
and the example pipelines under ci-examples/ (they parse, and every watertight command they call
exists with those flags)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import pytest
import xmlschema
import yaml

from watertight import cli, drill, junit, trend
from watertight.chaos import safeguards

REPO = Path(__file__).resolve().parents[1]
SCHEMA = xmlschema.XMLSchema(str(REPO / "tests" / "data" / "junit.xsd"))


def report(**changes: Any) -> dict[str, Any]:
    """A passed site-loss-prod report, with ``changes``."""
    base: dict[str, Any] = {
        "experiment": "site-loss-prod",
        "status": "completed",
        "passed": True,
        "reasons": [],
        "fault": {"kind": "site-loss", "target": "prod", "injected_at": "2026-11-30T10:00:00+00:00"},
        "affected_cells": ["cell-1"],
        "rto_seconds": {"cell-1": 21.4, "cell-2": 0.0},
        "rto_measured_from": "fault",
        "rpo": {"acknowledged": 5000, "missing": 0},
        "unaffected_cells": {"cells": ["cell-2"], "error_rate": 0.0, "requests": 4000},
        "invariants": {"journal_balanced": True, "balances_match_postings": True, "limits_respected": True},
        "split_brain": False,
        "writable_primaries_max": {"cell-1": 1, "cell-2": 1},
        "stale_reads": 0,
        "stale_reads_detail": {"stale": 0, "reads": 900},
        "indeterminate": {"requests": 3, "applied": 1, "absent": 2, "partial": 0},
        "indeterminate_detail": {"unresolved": 0},
        "aborted": None,
        "slo": {"rto_seconds": 30.0, "rpo_missing": 0},
        "load": {"financial_tps": 99.0, "nonfinancial_tps": 298.0},
    }
    base.update(changes)
    return base


# ---- JUnit ----------------------------------------------------------------------------------------


def test_a_passed_drill_is_one_passed_test_case_per_verdict_with_its_figures() -> None:
    text = junit.junit_xml([report()])
    SCHEMA.validate(text)
    names = [case.name for case in junit.cases(report())]
    assert names == [
        "rto cell-1", "rpo", "isolation", "invariant balances_match_postings", "invariant journal_balanced",
        "invariant limits_respected", "split brain", "stale reads", "indeterminate requests",
    ]  # fmt: skip
    assert 'failures="0"' in text and 'errors="0"' in text
    assert "cell-1 recovered in 21.4 s (RTO 30.0 s)" in text
    assert "0 of 5000 acknowledged transactions missing" in text


def test_every_failed_verdict_is_a_failure_and_an_abort_an_error() -> None:
    failed = report(
        passed=False,
        status="interrupted",
        reasons=["cells that should not notice (cell-2) had an error rate of 0.5"],
        rto_seconds={"cell-1": None},
        rpo={"acknowledged": 10, "missing": 2},
        stale_reads=3,
        writable_primaries_max={"cell-1": 2},
        aborted={"reason": "writable primaries above 1", "at": "2026-11-30T10:00:05+00:00"},
    )
    text = junit.junit_xml([failed, report(experiment="patroni-crash")])
    SCHEMA.validate(text)
    outcomes = {case.name: case.outcome for case in junit.cases(failed)}
    assert outcomes["rto cell-1"] == outcomes["rpo"] == outcomes["isolation"] == "failure"
    assert outcomes["stale reads"] == outcomes["split brain"] == "failure"
    assert outcomes["aborted"] == "error"
    assert text.count("<testsuite ") == 2


def test_the_schema_the_suite_carries_rejects_what_ci_could_not_read() -> None:
    with pytest.raises(xmlschema.XMLSchemaValidationError):
        SCHEMA.validate('<testsuites><testsuite name="x"><testcase name="y"/></testsuite></testsuites>')


# ---- history --------------------------------------------------------------------------------------


def runs(rtos: list[float], experiment: str = "site-loss-prod") -> list[dict[str, Any]]:
    return [
        trend.entry(report(experiment=experiment, rto_seconds={"cell-1": rto}), f"2026-11-{day:02d}T02:30:00")
        for day, rto in enumerate(rtos, start=1)
    ]


def test_an_rto_twenty_percent_worse_than_the_median_of_the_last_ten_is_a_regression() -> None:
    steady = trend.trends(runs([21.0, 22.0, 21.5, 25.0]))
    assert steady["site-loss-prod"]["regressions"] == []
    worse = trend.trends(runs([21.0, 22.0, 21.5, 26.0]))
    (regression,) = worse["site-loss-prod"]["regressions"]
    assert "cell-1 26.0 s" in regression and "median 21.5 s" in regression
    # only the last ten runs before it make the baseline
    assert trend.trends(runs([60.0] * 5 + [21.0] * 10 + [26.0]))["site-loss-prod"]["regressions"]
    # one earlier run is no trend
    assert trend.trends(runs([10.0, 30.0]))["site-loss-prod"]["regressions"] == []


def test_the_history_file_is_appended_and_read_back_per_experiment(tmp_path: Path) -> None:
    path = tmp_path / "reports" / trend.HISTORY_FILE
    for line in runs([21.0, 22.0]) + runs([5.0], experiment="cell-loss"):
        trend.append(path, line)
    with path.open("a") as handle:
        handle.write('{"experiment": "torn')  # a drill killed mid-write
    found = trend.trends(trend.read(path))
    assert [len(found[name]["runs"]) for name in sorted(found)] == [1, 2]
    shown = trend.table(found)
    assert "site-loss-prod: 2 runs" in shown and "RTO cell-1 22.0 s" in shown
    assert cli.main(["report", "history", "--history", str(path)]) == 0


# ---- safeguards and --during ----------------------------------------------------------------------


def test_safeguard_limits_are_read_and_a_wrong_one_is_named() -> None:
    assert safeguards.parse_limits("unaffected_error_ratio=0.005,writable_primaries=1") == {
        "unaffected_error_ratio": 0.005,
        "writable_primaries": 1.0,
    }
    assert safeguards.parse_limits("") == {}
    with pytest.raises(safeguards.SafeguardError, match="unknown safeguard 'errors'"):
        safeguards.parse_limits("errors=1")
    with pytest.raises(safeguards.SafeguardError, match="'lots' is not a number"):
        safeguards.parse_limits("writable_primaries=lots")
    with pytest.raises(safeguards.SafeguardError, match="must not be negative"):
        safeguards.parse_limits("missing_acknowledged=-1")


def test_during_names_the_cycle_or_a_runbook_and_refuses_anything_else() -> None:
    assert drill.parse_during("cycle=2026-12-05") == ("cycle", {"business_date": "2026-12-05"})
    assert drill.parse_during("runbook:switchover-site:site=samecity") == (
        "runbook:switchover-site",
        {"site": "samecity"},
    )
    for bad, message in (
        ("cycle=05/12/2026", "YYYY-MM-DD"),
        ("runbook:reboot-everything", "no runbook 'reboot-everything'"),
        ("coffee", "expected cycle"),
    ):
        with pytest.raises(ValueError, match=message):
            drill.parse_during(bad)


# ---- the example pipelines ------------------------------------------------------------------------

EXAMPLES = sorted((REPO / "ci-examples").glob("*.yml"))


def commands_in(document: Any) -> list[str]:
    """Every shell line of a pipeline (GitHub steps' run, GitLab's script sections)."""
    found: list[str] = []
    if isinstance(document, dict):
        for key, value in document.items():
            if key in ("run", "script", "before_script", "after_script"):
                for text in value if isinstance(value, list) else [value]:
                    found += [" ".join(str(text).split())]
            else:
                found += commands_in(value)
    elif isinstance(document, list):
        for item in document:
            found += commands_in(item)
    return found


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_the_example_pipeline_calls_only_commands_and_flags_that_exist(path: Path) -> None:
    document = yaml.safe_load(path.read_text())
    commands = commands_in(document)
    called = []
    for command in commands:
        for part in command.split("||")[0].split("&&"):
            words = shlex.split(part)
            if words[:1] == ["sudo"]:
                words = words[1:]
            if words and words[0].endswith("watertight"):
                called.append(words[1:])
                cli.build_parser().parse_args(words[1:])  # SystemExit on an unknown flag
            if words[:2] == ["make", "venv"] or words[:2] == ["make", "drill"]:
                called.append(words)
    drills = [c for c in called if c[:1] == ["drill"]]
    assert drills, f"{path.name} runs no drill"
    assert all("--all" in c and "--junit" in c for c in drills), drills
    assert any(c[:2] == ["report", "history"] for c in called)
    text = path.read_text()
    assert "junit.xml" in text and "history.jsonl" in text  # kept as artifacts
    assert "schedule" in text  # nightly
