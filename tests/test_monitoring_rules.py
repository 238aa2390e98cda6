"""The alert rules under ``promtool test rules`` (Debian's prometheus package): a steady topology
raises nothing; each fault raises its SLO alerts within their ``for:``; each early warning fires
on a slow degradation while the SLO alert it precedes is still silent, and that SLO alert fires
later. Also: infra/'s PrometheusRule and the local rule file are the same rules, and the dashboard
draws only what the rules record."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml

from tests import monitoring_scenarios as ms
from watertight import topology as topology_module
from watertight.monitoring import rules
from watertight.topology import Topology

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
TOPOLOGY = topology_module.load(topology_module.DEFAULT_PATH)

pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool missing: run `make venv`")


def by_name(topology: Topology) -> dict[str, rules.Alert]:
    return {alert.name: alert for alert in rules.alerts(topology)}


def firing(topology: Topology, name: str, **labels: Any) -> dict[str, Any]:
    """The alert promtool must find: its output labels, severity and class, rendered annotations."""
    alert = by_name(topology)[name]
    rule = alert.rule()
    values = {k: str(v) for k, v in labels.items()}
    return {
        "exp_labels": {**values, **rule["labels"]},
        "exp_annotations": {k: rules.annotation(v, values) for k, v in rule["annotations"].items()},
    }


def check(eval_at: str, name: str, *alerts: dict[str, Any]) -> dict[str, Any]:
    return {"eval_time": eval_at, "alertname": name, "exp_alerts": list(alerts)}


def silent(eval_at: str, *names: str) -> list[dict[str, Any]]:
    return [check(eval_at, name) for name in names]


def patroni_down(cell: int, site: str) -> dict[str, Any]:
    return ms.patroni(cell, site)


# ---- scenarios ------------------------------------------------------------------------------------


def steady_case(t: Topology) -> dict[str, Any]:
    names = [a.name for a in rules.alerts(t)]
    tests = [c for at_s in ("60s", "300s", "600s", "840s") for c in silent(at_s, *names)]
    return {"interval": f"{ms.STEP_S}s", "input_series": ms.steady().input_series(), "alert_rule_test": tests}


def site_loss_case(t: Topology) -> dict[str, Any]:
    """prod lost: every target of prod stops answering (up 0, its series stale), and the entry
    finds prod's gateway unhealthy."""
    s = ms.steady()
    for cell in (1, 2):
        member = {
            **ms.patroni(cell, "prod"),
            "scope": f"watertight-cell{cell}",
            "name": f"pg-cell{cell}-prod",
        }
        s.set("up", ms.patroni(cell, "prod"), ms.steps(1, 0))
        for metric in ("patroni_primary", "patroni_sync_standby"):
            key = f"{metric}{{{ms._labels(member)}}}"
            s.series[key] = ms.stale_from(s.series[key])
        if cell == 1:
            key = f"patroni_xlog_location{{{ms._labels(member)}}}"
            s.series[key] = ms.stale_from(s.series[key])
        for metric in ("pg_up", "pg_member_writable"):
            key = f"{metric}{{{ms._labels(ms.exporter(cell, 'prod'))}}}"
            s.series[key] = ms.stale_from(s.series[key])
        upstream = {**ms.ENTRY, "cell": cell, "upstream": "http://prod:18000", "upstream_site": "prod"}
        s.set("watertight_upstream_healthy", upstream, ms.steps(1, 0))
    s.set("up", ms.etcd("prod"), ms.steps(1, 0))
    key = f"etcd_server_has_leader{{{ms._labels(ms.etcd('prod'))}}}"
    s.series[key] = ms.stale_from(s.series[key])
    tests = [
        # within the for: pending, not yet firing
        *silent(ms.at(2), "CellLeaderMissing", "PatroniMemberDown"),
        check(ms.at(10), "CellLeaderMissing", firing(t, "CellLeaderMissing", cell=1)),
        check(ms.at(10), "CellSyncStandbyMissing", firing(t, "CellSyncStandbyMissing", cell=2)),
        check(
            ms.at(10),
            "PatroniMemberDown",
            firing(t, "PatroniMemberDown", **ms.patroni(1, "prod")),
            firing(t, "PatroniMemberDown", **ms.patroni(2, "prod")),
        ),
        check(ms.at(10), "EtcdMemberDown", firing(t, "EtcdMemberDown", **ms.etcd("prod"))),
        check(
            ms.at(10), "SiteUnreachableFromEntry", firing(t, "SiteUnreachableFromEntry", upstream_site="prod")
        ),
        # the exporter went with its site: no pg_up == 0 to report, no writable member seen
        *silent(ms.at(10), "PostgresMemberDown", "MemberWritableWithoutLeaderLock"),
    ]
    return {"interval": f"{ms.STEP_S}s", "input_series": s.input_series(), "alert_rule_test": tests}


def member_faults_case(t: Topology) -> dict[str, Any]:
    """cell 1: its primary's PostgreSQL stops answering the exporter; cell 2: its primary's
    Patroni is gone while the PostgreSQL beside it still takes writes; and no app server can
    reach cell 2's primary any more."""
    s = ms.steady()
    s.set("pg_up", ms.exporter(1, "prod"), ms.steps(1, 0))
    member = {**ms.patroni(2, "samecity"), "scope": "watertight-cell2", "name": "pg-cell2-samecity"}
    s.set("up", ms.patroni(2, "samecity"), ms.steps(1, 0))
    for metric in ("patroni_primary", "patroni_sync_standby", "patroni_xlog_location"):
        key = f"{metric}{{{ms._labels(member)}}}"
        s.series[key] = ms.stale_from(s.series[key])
    s.set("watertight_cell_ready", ms.app(2), ms.steps(1, 0))
    tests = [
        check(ms.at(10), "PostgresMemberDown", firing(t, "PostgresMemberDown", **ms.exporter(1, "prod"))),
        check(
            ms.at(10),
            "MemberWritableWithoutLeaderLock",
            firing(t, "MemberWritableWithoutLeaderLock", cell=2, site="samecity"),
        ),
        check(ms.at(10), "CellNotServed", firing(t, "CellNotServed", cell=2)),
        check(ms.at(10), "CellLeaderMissing", firing(t, "CellLeaderMissing", cell=2)),
        *silent(ms.at(2), "PostgresMemberDown", "MemberWritableWithoutLeaderLock", "CellNotServed"),
    ]
    return {"interval": f"{ms.STEP_S}s", "input_series": s.input_series(), "alert_rule_test": tests}


EARLY_AT = ms.at(50)  # the slow degradation is under way; the SLO still holds
SLO_AT = ms.at(180)  # the SLO is broken (the latency SLO for a minute)


def cell_failing_slowly_case(t: Topology) -> dict[str, Any]:
    """cell 1 degrades: from the change its approvals fall (05 and 91 declines appear), its
    commits slow down by 10 ms per second and thin out, its group-commit queue fills; only 60 s
    later do its clients see 5xx and slow answers."""
    s = ms.steady()
    ms.set_authorizations(
        s, 1, {"00": ms.steps(90, 60), "51": ms.steps(10), "05": ms.steps(0, 30), "91": ms.steps(0, 5)}
    )
    s.set("watertight_batch_size_sum", ms.app(1), ms.counter(ms.steps(60, 15)))
    latency_s = ms.steps(0.01, lambda k: 0.01 + 0.02 * k)
    bounds = (0.025, 0.1, 0.25, 0.5, 1.0, 2.5)
    for le in (*bounds, float("inf")):
        label = "+Inf" if le == float("inf") else f"{le:g}"
        s.set(
            "watertight_batch_seconds_bucket",
            {**ms.app(1), "le": label},
            ms.counter([10.0 if value <= le else 0.0 for value in latency_s]),
        )
    s.set("watertight_commit_queue_depth", ms.app(1), ms.steps(0, lambda k: 300.0 * (k + 1)))
    ms.set_traffic(
        s,
        1,
        ok=ms.steps(100, 45, delay_s=60),
        errors=ms.steps(0, 5, delay_s=60),
        slow=ms.steps(0, 50, delay_s=60),
    )
    tests = [
        check(EARLY_AT, "CellApprovalRatioDropping", firing(t, "CellApprovalRatioDropping", cell=1)),
        check(EARLY_AT, "CellFinancialTpsDropping", firing(t, "CellFinancialTpsDropping", cell=1)),
        check(
            EARLY_AT, "CellDeclineMixShifted", firing(t, "CellDeclineMixShifted", cell=1, response_code="05")
        ),
        check(EARLY_AT, "CellIssuerUnavailableDeclines", firing(t, "CellIssuerUnavailableDeclines", cell=1)),
        check(EARLY_AT, "CellCommitLatencyRising", firing(t, "CellCommitLatencyRising", cell=1)),
        check(EARLY_AT, "GroupCommitQueueRising", firing(t, "GroupCommitQueueRising", cell=1)),
        # the SLO alerts the early warnings precede are silent then...
        *silent(EARLY_AT, "CellErrorRatioHigh", "CellLatencyP99High"),
        # ... and fire once the clients see it
        check(SLO_AT, "CellErrorRatioHigh", firing(t, "CellErrorRatioHigh", cell=1, site="entry")),
        check(SLO_AT, "CellLatencyP99High", firing(t, "CellLatencyP99High", cell=1, site="entry")),
    ]
    return {"interval": f"{ms.STEP_S}s", "input_series": s.input_series(), "alert_rule_test": tests}


def dr_falling_behind_case(t: Topology) -> dict[str, Any]:
    """cell 1's primary writes 200 kB/s more while its dr copy receives nothing."""
    s = ms.steady()
    leader = {**ms.patroni(1, "prod"), "scope": "watertight-cell1", "name": "pg-cell1-prod"}
    dr = {**ms.patroni(1, "dr"), "scope": "watertight-cell1-dr", "name": "pg-cell1-dr"}
    s.set("patroni_xlog_location", leader, ms.counter(ms.steps(20_000, 400_000), start=1_000_000))
    s.set("patroni_xlog_received_location", dr, ms.counter(ms.steps(20_000, 0), start=990_000))
    tests = [
        check(ms.at(60), "DrReplicationLagGrowing", firing(t, "DrReplicationLagGrowing", cell=1)),
        *silent(ms.at(60), "DrReplicationLagHigh"),
        check(ms.at(140), "DrReplicationLagHigh", firing(t, "DrReplicationLagHigh", cell=1)),
    ]
    return {"interval": f"{ms.STEP_S}s", "input_series": s.input_series(), "alert_rule_test": tests}


CASES = (steady_case, site_loss_case, member_faults_case, cell_failing_slowly_case, dr_falling_behind_case)


def write_tests(directory: Path, topology: Topology, cases: tuple[Any, ...] = CASES) -> Path:
    (directory / "rules.yml").write_text(rules.rules_yaml(topology))
    document = {
        "rule_files": ["rules.yml"],
        "evaluation_interval": f"{ms.STEP_S}s",
        "tests": [case(topology) for case in cases],
    }
    path = directory / "rules_test.yml"
    path.write_text(yaml.safe_dump(document, sort_keys=False, width=1000))
    return path


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    """promtool evaluates every rule every 2 s of 14 minutes per scenario: about 25 s of CPU for
    all of them, minutes on a busy 2-core machine."""
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=900, check=False)


# ---- tests ----------------------------------------------------------------------------------------


def test_the_rule_file_is_valid_for_prometheus(tmp_path: Path) -> None:
    (tmp_path / "rules.yml").write_text(rules.rules_yaml(TOPOLOGY))
    result = promtool("check", "rules", str(tmp_path / "rules.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_fires_in_a_scenario_and_a_steady_run_stays_silent(tmp_path: Path) -> None:
    result = promtool("test", "rules", str(write_tests(tmp_path, TOPOLOGY)))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_shown_firing_and_every_early_warning_before_its_slo_alert() -> None:
    fired: dict[str, set[str]] = {}
    quiet: dict[str, set[str]] = {}
    for case in CASES[1:]:
        for test in case(TOPOLOGY)["alert_rule_test"]:
            (fired if test["exp_alerts"] else quiet).setdefault(test["alertname"], set()).add(
                test["eval_time"]
            )
    assert set(by_name(TOPOLOGY)) == set(fired), set(by_name(TOPOLOGY)) - set(fired)
    for alert in rules.early_alerts(TOPOLOGY):
        assert alert.precedes in by_name(TOPOLOGY)
        early = min(int(at.rstrip("s")) for at in fired[alert.name])
        assert any(int(at.rstrip("s")) == early for at in quiet.get(alert.precedes, set())), alert.name
        assert min(int(at.rstrip("s")) for at in fired[alert.precedes]) > early, alert.name


def test_a_wrong_threshold_fails_the_rule_tests(tmp_path: Path) -> None:
    """The tests can fail: an SLO alert that tolerates 90 % errors misses the slow failure."""
    loose = msgspec.structs.replace(TOPOLOGY, slo=msgspec.structs.replace(TOPOLOGY.slo, error_ratio_max=0.9))
    path = write_tests(tmp_path, TOPOLOGY, (cell_failing_slowly_case,))
    (tmp_path / "rules.yml").write_text(rules.rules_yaml(loose))
    result = promtool("test", "rules", str(path))
    assert result.returncode != 0
    assert "CellErrorRatioHigh" in result.stdout + result.stderr


def test_the_thresholds_come_from_the_topology_slos() -> None:
    strict = msgspec.structs.replace(
        TOPOLOGY, slo=msgspec.structs.replace(TOPOLOGY.slo, latency_p99_ms_max=250.0)
    )
    assert "> 0.25 and" in by_name(strict)["CellLatencyP99High"].expr
    assert str(TOPOLOGY.slo.dr_lag_bytes_max) in by_name(TOPOLOGY)["DrReplicationLagHigh"].expr


def test_the_kubernetes_prometheus_rule_holds_the_local_rule_file() -> None:
    from watertight_infra import monitoring as infra_monitoring

    local = yaml.safe_load(rules.rules_yaml(TOPOLOGY))
    assert infra_monitoring.rules_spec(TOPOLOGY) == local
    assert infra_monitoring.dashboard(TOPOLOGY) == rules.dashboard(TOPOLOGY)


def test_the_dashboard_draws_only_recorded_series_and_lists_both_alert_families() -> None:
    recorded = {rule["record"] for rule in rules.recording_rules()}
    panels = rules.dashboard(TOPOLOGY)["panels"]
    drawn = [target["expr"] for panel in panels for target in panel.get("targets", [])]
    assert drawn and set(drawn) <= recorded
    filters = {
        panel["options"]["alertInstanceLabelFilter"] for panel in panels if panel["type"] == "alertlist"
    }
    assert filters == {'{class="slo"}', '{class="early_warning"}'}


def test_every_alert_says_what_it_means_what_to_do_and_links_its_runbook() -> None:
    readme = (topology_module.DEFAULT_PATH.parent / "README.md").read_text()
    for alert in rules.alerts(TOPOLOGY):
        assert alert.meaning and alert.action and alert.for_s >= 0
        assert alert.rule()["annotations"]["runbook_url"].endswith(f"#alert-{alert.anchor}")
        assert f'<a id="alert-{alert.anchor}"></a>' in readme, alert.name
        assert (topology_module.DEFAULT_PATH.parent / "runbooks" / f"{alert.runbook}.yml").exists()
