"""The one source of the Prometheus rules and the Grafana dashboard, for both runtimes: the local
Prometheus loads ``rule_groups`` from the file ``rules_yaml`` writes, and infra/'s PrometheusRule
objects carry the same groups (tests/test_monitoring_rules.py proves it); ``dashboard`` draws the
recording rules and alerts defined here.

Owns: every alert's name, expression, ``for:`` and meaning; thresholds come from the topology's
SLOs. Never: read a file, start or call anything.

Labels the rules rely on (local: the scrape targets of watertight.monitoring.config; Kubernetes:
the ServiceMonitor's relabelings from the pods' watertight.io/* labels): ``kind`` (entry, gateway,
app, patroni, etcd, postgres), ``site`` and, for Patroni and the PostgreSQL exporters, ``cell``.
The app servers and gateways label their own series with ``cell`` and ``site``.

Two families of alert:

- SLO alerts (``class: slo``) say the service is broken now: a cell without a leader or a sync
  standby, a member writable without the leader lock, dr too far behind, errors or p99 above the
  SLO, a site the entry cannot reach, a member or etcd down.
- Early warnings (``class: early_warning``) watch business trends per cell against their own
  recent baseline (recording rules over the last 10 minutes) and fire before the SLO breaks.

Every ``for:`` is long enough that a steady run stays silent (tests/test_monitoring_rules.py runs
promtool over a steady input) and short enough that a lost site is detected within 15 s at a 2 s
scrape and evaluation interval.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from watertight.topology import Topology

GROUP_RECORDS = "watertight.records"
GROUP_SLO = "watertight.slo"
GROUP_EARLY = "watertight.early_warning"

# where each alert's runbook is: the README's alert table, one anchor per alert
RUNBOOK_URL = "README.md#alert-{anchor}"  # relative to the repository root

WINDOW = "30s"  # the rate window of every "now" series: a 2 s scrape gives 15 samples
BASELINE = "10m"  # the "own recent baseline" of the early warnings
REQUESTS_MIN_PER_S = 1  # below this a ratio is noise: no SLO ratio alert
APPROVAL_DROP_MIN = 0.05  # the smallest drop of the approval ratio that warns
DECLINE_SHIFT_MIN = 0.05  # the smallest rise of one decline code's share that warns
FINANCIAL_SHARE_DROP = 0.5  # a cell's share of financial TPS below half its baseline warns
FINANCIAL_SHARE_MIN = 0.05  # ... when it had a share worth watching
QUEUE_RATIO_WARN = 0.5  # the group-commit queue predicted half full within 30 s warns
QUEUE_RATIO_MIN = 0.05
COMMIT_LATENCY_GROWTH = 2.0  # commit p99 twice its baseline and heading above the latency SLO

# ---- recording rules ------------------------------------------------------------------------------

REQUESTS = "cell_site:watertight_requests:rate30s"
ERRORS = "cell_site:watertight_errors:rate30s"
ERROR_RATIO = "cell_site:watertight_error_ratio:ratio30s"
LATENCY_P99 = "cell_site:watertight_latency_seconds:p99_30s"
PRIMARIES = "cell:watertight_primaries:count"
SYNC_STANDBYS = "cell:watertight_sync_standbys:count"
DR_LAG = "cell:watertight_dr_lag_bytes:current"
AUTHORIZATIONS = "cell:watertight_authorizations:rate30s"
APPROVALS = "cell:watertight_approvals:rate30s"
APPROVAL_RATIO = "cell:watertight_approval_ratio:ratio30s"
APPROVAL_RATIO_AVG = "cell:watertight_approval_ratio:avg10m"
APPROVAL_RATIO_STDDEV = "cell:watertight_approval_ratio:stddev10m"
DECLINE_SHARE = "cell_code:watertight_decline_share:ratio30s"
DECLINE_SHARE_AVG = "cell_code:watertight_decline_share:avg10m"
ISSUER_UNAVAILABLE = "cell:watertight_issuer_unavailable:increase30s"
FINANCIAL_TPS = "cell:watertight_financial_tps:rate30s"
FINANCIAL_TPS_AVG = "cell:watertight_financial_tps:avg10m"
FINANCIAL_SHARE = "cell:watertight_financial_share:ratio30s"
FINANCIAL_SHARE_AVG = "cell:watertight_financial_share:avg10m"
COMMIT_P99 = "cell:watertight_commit_seconds:p99_30s"
COMMIT_P99_AVG = "cell:watertight_commit_seconds:avg10m"
QUEUE_RATIO = "cell:watertight_commit_queue:ratio"

EDGE_CELLS = 'cell!~"none|any|"'


def _edge(template: str) -> str:
    """``template`` with KIND the entry, or else the gateways: business series are counted where
    clients meet the core, the entry when there is one (the local runtime's global load
    balancer), else the site gateways (Kubernetes). ``or`` keeps the
    gateways' value only for a cell the entry does not report, so nothing is counted twice."""
    return f"({template.replace('KIND', 'entry')}) or ({template.replace('KIND', 'gateway')})"


def recording_rules() -> list[dict[str, str]]:
    def record(name: str, expr: str) -> dict[str, str]:
        return {"record": name, "expr": expr}

    def member_count(metric: str) -> str:
        # a member whose Patroni does not answer counts 0 (its series are stale), and a cell whose
        # members all went silent still has a value: 0
        return f'sum by (cell) ({metric} or on (cell, site) (up{{kind="patroni"}} * 0))'

    edge_requests = f'watertight_requests_total{{kind=~"entry|gateway",{EDGE_CELLS}}}'
    return [
        record(REQUESTS, f"sum by (cell, site) (rate({edge_requests}[{WINDOW}]))"),
        record(
            ERRORS,
            f'sum by (cell, site) (rate(watertight_requests_total{{kind=~"entry|gateway",{EDGE_CELLS},outcome="5xx"}}[{WINDOW}]))',
        ),
        record(ERROR_RATIO, f"{ERRORS} / {REQUESTS}"),
        record(
            LATENCY_P99,
            "histogram_quantile(0.99, sum by (cell, site, le) "
            f'(rate(watertight_request_seconds_bucket{{kind=~"entry|gateway",{EDGE_CELLS}}}[{WINDOW}])))',
        ),
        record(PRIMARIES, member_count("patroni_primary")),
        record(SYNC_STANDBYS, member_count("patroni_sync_standby")),
        record(
            DR_LAG,
            "clamp_min(max by (cell) (patroni_xlog_location and on (cell, site) (patroni_primary == 1))"
            ' - on (cell) max by (cell) (patroni_xlog_received_location{site="dr"}), 0)',
        ),
        record(
            AUTHORIZATIONS,
            _edge(f'sum by (cell) (rate(watertight_authorizations_total{{kind="KIND"}}[{WINDOW}]))'),
        ),
        record(
            APPROVALS,
            _edge(
                f'sum by (cell) (rate(watertight_authorizations_total{{kind="KIND",response_code="00"}}[{WINDOW}]))'
            ),
        ),
        record(APPROVAL_RATIO, f"{APPROVALS} / {AUTHORIZATIONS}"),
        record(APPROVAL_RATIO_AVG, f"avg_over_time({APPROVAL_RATIO}[{BASELINE}])"),
        record(APPROVAL_RATIO_STDDEV, f"stddev_over_time({APPROVAL_RATIO}[{BASELINE}])"),
        record(
            DECLINE_SHARE,
            "("
            + _edge(
                "sum by (cell, response_code) (rate(watertight_authorizations_total"
                f'{{kind="KIND",response_code!~"00|91"}}[{WINDOW}]))'
            )
            + f") / on (cell) group_left {AUTHORIZATIONS}",
        ),
        record(DECLINE_SHARE_AVG, f"avg_over_time({DECLINE_SHARE}[{BASELINE}])"),
        record(
            ISSUER_UNAVAILABLE,
            _edge(
                f'sum by (cell) (increase(watertight_authorizations_total{{kind="KIND",response_code="91"}}[{WINDOW}]))'
            ),
        ),
        record(FINANCIAL_TPS, f"sum by (cell) (rate(watertight_batch_size_sum[{WINDOW}]))"),
        record(FINANCIAL_TPS_AVG, f"avg_over_time({FINANCIAL_TPS}[{BASELINE}])"),
        record(FINANCIAL_SHARE, f"{FINANCIAL_TPS} / ignoring (cell) group_left sum({FINANCIAL_TPS})"),
        record(FINANCIAL_SHARE_AVG, f"avg_over_time({FINANCIAL_SHARE}[{BASELINE}])"),
        record(
            COMMIT_P99,
            f"histogram_quantile(0.99, sum by (cell, le) (rate(watertight_batch_seconds_bucket[{WINDOW}])))",
        ),
        record(COMMIT_P99_AVG, f"avg_over_time({COMMIT_P99}[{BASELINE}])"),
        record(
            QUEUE_RATIO,
            "max by (cell) (watertight_commit_queue_depth / watertight_commit_queue_capacity)",
        ),
    ]


# ---- alerts ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Alert:
    """One alert: what it says, what to do, and the SLO alert an early warning comes before."""

    name: str
    expr: str
    for_s: int
    severity: str  # critical | warning
    summary: str  # may name {{ $labels.cell }}, {{ $labels.site }}...
    meaning: str
    action: str
    runbook: str  # the runbook or command that handles it (README links it)
    early: bool = False
    precedes: str | None = None  # early warnings: the SLO alert it fires before

    @property
    def anchor(self) -> str:
        return self.name.lower()

    def rule(self) -> dict[str, Any]:
        return {
            "alert": self.name,
            "expr": self.expr,
            "for": f"{self.for_s}s",
            "labels": {"severity": self.severity, "class": "early_warning" if self.early else "slo"},
            "annotations": {
                "summary": self.summary,
                "runbook_url": RUNBOOK_URL.format(anchor=self.anchor),
            },
        }


def slo_alerts(topology: Topology) -> list[Alert]:
    slo = topology.slo
    latency_s = slo.latency_p99_ms_max / 1000
    return [
        Alert(
            "CellLeaderMissing",
            f"{PRIMARIES} < 1",
            4,
            "critical",
            "cell {{ $labels.cell }} has no primary: its writes fail until a standby takes over",
            "No member of the cell runs as a primary (the leader was lost, frozen, cut off or crashed).",
            "Patroni promotes the sync standby within its ttl (20 s); if none is promoted, check etcd "
            "quorum and the standby's state; with both centers lost, activate dr.",
            "activate-dr",
        ),
        Alert(
            "CellSyncStandbyMissing",
            f"{SYNC_STANDBYS} < 1",
            4,
            "warning",
            "cell {{ $labels.cell }} commits without a synchronous standby: the loss of its leader would lose data",
            "The cell has no streaming synchronous standby in the other center: RPO is no longer 0.",
            "Bring the other center's member back (watertight status shows it); it rejoins with "
            "pg_rewind. Avoid planned switchovers until it streams again.",
            "switchover-site",
        ),
        Alert(
            "MemberWritableWithoutLeaderLock",
            "max by (cell, site) (pg_member_writable) == 1"
            " unless on (cell, site) (max by (cell, site) (patroni_primary) == 1)",
            4,
            "critical",
            "cell {{ $labels.cell }}: the member in {{ $labels.site }} takes writes while its Patroni does not lead",
            "A PostgreSQL is out of recovery and writable while its Patroni does not hold the leader "
            "lock (Patroni gone or frozen, or a split brain in the making).",
            "Fence that member at once (stop it); the member guard should have done so. Compare the "
            "ledgers with the drill's ack log before it rejoins.",
            "switchover-site",
        ),
        Alert(
            "DrReplicationLagHigh",
            f"{DR_LAG} > {slo.dr_lag_bytes_max}",
            30,
            "warning",
            "cell {{ $labels.cell }}: the dr copy is more than " + _bytes(slo.dr_lag_bytes_max) + " behind",
            "The dr copy of the cell has not received the primary's WAL for more than the bound: an "
            "activation of dr now would lose that much.",
            "Check the link to dr and dr's member (watertight status: dr copy, lag); the dr slot keeps "
            "the WAL it needs up to 1 GB.",
            "activate-dr",
        ),
        Alert(
            "CellErrorRatioHigh",
            f"{ERROR_RATIO} > {slo.error_ratio_max:g} and {REQUESTS} > {REQUESTS_MIN_PER_S}",
            4,
            "critical",
            "cell {{ $labels.cell }} at {{ $labels.site }} answers more than "
            + f"{slo.error_ratio_max:.0%}"
            + " 5xx",
            "Clients of the cell get errors above the SLO at that site (the entry or a gateway).",
            "Find the cell's state (watertight status); drain the cell while it is repaired.",
            "drain-cell",
        ),
        Alert(
            "CellLatencyP99High",
            f"{LATENCY_P99} > {latency_s:g} and {REQUESTS} > {REQUESTS_MIN_PER_S}",
            60,  # a latency SLO holds over a minute: a burst on a busy machine is not an outage
            "warning",
            "cell {{ $labels.cell }} at {{ $labels.site }}: p99 above " + f"{slo.latency_p99_ms_max:g} ms",
            "The 99th percentile of the cell's answers at that site is above the latency SLO.",
            "Look at commit latency and the queue depth of the cell (dashboard); shed load or drain it.",
            "drain-cell",
        ),
        Alert(
            "SiteUnreachableFromEntry",
            'max by (upstream_site) (watertight_upstream_healthy{kind="entry",upstream_site=~"prod|samecity"}) == 0',
            2,
            "critical",
            "the entry cannot reach the gateway of {{ $labels.upstream_site }}",
            "The global entry finds no cell the site's gateway can serve: the site is lost or cut off.",
            "Clients are sent to the other center already; if the site is gone for long, switch its "
            "cells over; if both centers are, activate dr.",
            "switchover-site",
        ),
        Alert(
            "CellNotServed",
            "max by (cell) (watertight_cell_ready) < 1",
            4,
            "critical",
            "no app server can reach the primary of cell {{ $labels.cell }}",
            "Every running app server has lost the cell's primary.",
            "See who leads the cell (watertight status); the app servers follow a new leader by themselves.",
            "switchover-site",
        ),
        Alert(
            "PatroniMemberDown",
            'up{kind="patroni"} == 0',
            4,
            "warning",
            "cell {{ $labels.cell }}: Patroni of the member in {{ $labels.site }} does not answer",
            "A member's Patroni REST API does not answer (process gone, frozen, or the site lost).",
            "Start it again (watertight up starts whatever is not running); the member rejoins as a replica.",
            "switchover-site",
        ),
        Alert(
            "PostgresMemberDown",
            "pg_up == 0",
            4,
            "warning",
            "cell {{ $labels.cell }}: PostgreSQL of the member in {{ $labels.site }} does not answer",
            "The exporter beside the member cannot connect to its PostgreSQL.",
            "Patroni restarts a crashed PostgreSQL in place (10 s) and fails over after; read the member's log.",
            "switchover-site",
        ),
        Alert(
            "EtcdMemberDown",
            '(up{kind="etcd"} == 0) or (etcd_server_has_leader == 0)',
            4,
            "warning",
            "the etcd member {{ $labels.component }} is down or has no leader",
            "A member of the consensus Patroni relies on is down or cut off from its quorum.",
            "The quorum holds with two of three; start the member again before another is lost.",
            "switchover-site",
        ),
    ]


def early_alerts(topology: Topology) -> list[Alert]:
    slo = topology.slo
    latency_s = slo.latency_p99_ms_max / 1000
    return [
        Alert(
            "CellApprovalRatioDropping",
            f"{APPROVAL_RATIO} < {APPROVAL_RATIO_AVG} - clamp_min(3 * {APPROVAL_RATIO_STDDEV}, {APPROVAL_DROP_MIN})"
            f" and on (cell) {AUTHORIZATIONS} > {REQUESTS_MIN_PER_S}",
            4,
            "warning",
            "cell {{ $labels.cell }}: the approval ratio fell below its recent baseline",
            "The share of authorizations approved fell more than three standard deviations (at least "
            "5 points) below its own last 10 minutes.",
            "See which response codes grew (dashboard: decline mix); a technical cause (91, timeouts) "
            "precedes errors; a business one (51, 05) may be fraud or a limit change.",
            "drain-cell",
            early=True,
            precedes="CellErrorRatioHigh",
        ),
        Alert(
            "CellFinancialTpsDropping",
            f"{FINANCIAL_SHARE} < {FINANCIAL_SHARE_DROP:g} * {FINANCIAL_SHARE_AVG}"
            f" and on (cell) {FINANCIAL_SHARE_AVG} > {FINANCIAL_SHARE_MIN:g}",
            4,
            "warning",
            "cell {{ $labels.cell }}: its share of financial TPS fell below half its baseline",
            "The cell commits far fewer financial transactions than its own recent share of the "
            "total, while the others go on (a stall, not a quiet hour: the whole traffic falling "
            "keeps every share).",
            "Look at the cell's commit latency and leader; a stalled primary fails over by itself.",
            "switchover-site",
            early=True,
            precedes="CellErrorRatioHigh",
        ),
        Alert(
            "CellDeclineMixShifted",
            f"{DECLINE_SHARE} - {DECLINE_SHARE_AVG} > {DECLINE_SHIFT_MIN:g}"
            f" and on (cell) {AUTHORIZATIONS} > {REQUESTS_MIN_PER_S}",
            6,
            "warning",
            "cell {{ $labels.cell }}: declines with code {{ $labels.response_code }} rose above their baseline",
            "One decline code's share of the cell's authorizations rose more than 5 points above its "
            "last 10 minutes.",
            "Read the code (51 credit, 05 do not honor, 14 invalid card, 54 expired...) and look for "
            "its cause before it becomes complaints.",
            "drain-cell",
            early=True,
            precedes="CellErrorRatioHigh",
        ),
        Alert(
            "CellIssuerUnavailableDeclines",
            f"{ISSUER_UNAVAILABLE} > 0",
            0,
            "warning",
            "cell {{ $labels.cell }} declines authorizations with 91 (issuer unavailable)",
            "An authorization was declined because its cell could not be reached: never in a healthy run.",
            "The cell is failing over or cut off: see its leader (watertight status).",
            "switchover-site",
            early=True,
            precedes="CellErrorRatioHigh",
        ),
        Alert(
            "CellCommitLatencyRising",
            f"predict_linear({COMMIT_P99}[1m], 60) > {latency_s:g}"
            f" and {COMMIT_P99} > {COMMIT_LATENCY_GROWTH:g} * {COMMIT_P99_AVG}",
            4,
            "warning",
            "cell {{ $labels.cell }}: commit latency is rising towards the latency SLO",
            "The p99 of the cell's group commits is twice its baseline and, at its trend of the last "
            "minute, crosses the latency SLO within a minute.",
            "Look at the sync standby's link and disk (inter-site latency), and at the queue depth.",
            "switchover-site",
            early=True,
            precedes="CellLatencyP99High",
        ),
        Alert(
            "DrReplicationLagGrowing",
            f"predict_linear({DR_LAG}[1m], 120) > {slo.dr_lag_bytes_max}"
            f" and {DR_LAG} > {slo.dr_lag_bytes_max // 16}",
            10,
            "warning",
            "cell {{ $labels.cell }}: the dr copy's lag is growing towards its bound",
            "The dr copy falls further behind: at its trend of the last minute it crosses the lag bound "
            "within two minutes.",
            "Check the WAN link to dr and dr's member before the lag bound is crossed.",
            "activate-dr",
            early=True,
            precedes="DrReplicationLagHigh",
        ),
        Alert(
            "GroupCommitQueueRising",
            f"predict_linear({QUEUE_RATIO}[30s], 30) > {QUEUE_RATIO_WARN:g} and {QUEUE_RATIO} > {QUEUE_RATIO_MIN:g}",
            4,
            "warning",
            "cell {{ $labels.cell }}: the group-commit queue is filling",
            "Financial requests wait longer and longer for their commit: at this trend the queue is "
            "half full within 30 s (a full queue answers 503).",
            "The primary or its sync standby is slow: look at commit latency; drain the cell to shed load.",
            "drain-cell",
            early=True,
            precedes="CellLatencyP99High",
        ),
    ]


def alerts(topology: Topology) -> list[Alert]:
    return slo_alerts(topology) + early_alerts(topology)


def rule_groups(topology: Topology) -> list[dict[str, Any]]:
    """The rule groups, as Prometheus' rule file and the PrometheusRule spec both hold them."""
    return [
        {"name": GROUP_RECORDS, "rules": recording_rules()},
        {"name": GROUP_SLO, "rules": [a.rule() for a in slo_alerts(topology)]},
        {"name": GROUP_EARLY, "rules": [a.rule() for a in early_alerts(topology)]},
    ]


def rules_yaml(topology: Topology) -> str:
    """The rule file the local Prometheus loads."""
    header = "# rendered by watertight.monitoring.rules from the topology: edit that module, not this file\n"
    return header + yaml.safe_dump({"groups": rule_groups(topology)}, sort_keys=False, width=1000)


def _bytes(count: int) -> str:
    return f"{count / 1024 / 1024:g} MiB" if count >= 1024 * 1024 else f"{count} bytes"


# ---- dashboard ------------------------------------------------------------------------------------

PANELS = (
    ("Requests per second by cell and site", REQUESTS, "cell {{cell}} at {{site}}", "reqps"),
    ("5xx ratio by cell and site", ERROR_RATIO, "cell {{cell}} at {{site}}", "percentunit"),
    ("p99 latency by cell and site", LATENCY_P99, "cell {{cell}} at {{site}}", "s"),
    ("Primaries per cell", PRIMARIES, "cell {{cell}}", "short"),
    ("Synchronous standbys per cell", SYNC_STANDBYS, "cell {{cell}}", "short"),
    ("Replication lag to dr", DR_LAG, "cell {{cell}}", "bytes"),
    ("Approval ratio (now)", APPROVAL_RATIO, "cell {{cell}}", "percentunit"),
    ("Approval ratio (10 min baseline)", APPROVAL_RATIO_AVG, "cell {{cell}}", "percentunit"),
    ("Decline mix by response code", DECLINE_SHARE, "cell {{cell}} code {{response_code}}", "percentunit"),
    ("Issuer-unavailable declines (91) in 30 s", ISSUER_UNAVAILABLE, "cell {{cell}}", "short"),
    ("Financial TPS by cell", FINANCIAL_TPS, "cell {{cell}}", "reqps"),
    ("Financial share of each cell vs baseline", FINANCIAL_SHARE, "cell {{cell}}", "percentunit"),
    ("Commit latency p99", COMMIT_P99, "cell {{cell}}", "s"),
    ("Group-commit queue (share of capacity)", QUEUE_RATIO, "cell {{cell}}", "percentunit"),
)


def dashboard(topology: Topology) -> dict[str, Any]:
    """A Grafana dashboard: one panel per recording rule above, and the alerts of both families."""
    panels: list[dict[str, Any]] = []
    for index, (title, record, legend, unit) in enumerate(PANELS):
        panels.append(
            {
                "id": index,
                "type": "timeseries",
                "title": title,
                "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [{"expr": record, "legendFormat": legend, "refId": "A"}],
            }
        )
    rows = (len(PANELS) + 1) // 2
    for offset, (title, family) in enumerate((("SLO alerts", "slo"), ("Early warnings", "early_warning"))):
        panels.append(
            {
                "id": len(PANELS) + offset,
                "type": "alertlist",
                "title": title,
                "gridPos": {"h": 8, "w": 12, "x": 12 * offset, "y": 8 * rows},
                "options": {
                    "alertName": "",
                    "alertInstanceLabelFilter": f'{{class="{family}"}}',
                    "stateFilter": {"firing": True, "pending": True},
                },
            }
        )
    return {
        "title": f"Watertight — {topology.cells} cells",
        "uid": "watertight",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "panels": panels,
    }


def annotation(text: str, labels: dict[str, str]) -> str:
    """An annotation template with its ``{{ $labels.x }}`` filled in (what Prometheus renders)."""
    return re.sub(r"\{\{ \$labels\.(\w+) \}\}", lambda m: labels.get(m.group(1), ""), text)
