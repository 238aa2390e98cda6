"""Prometheus scrape and alert rules and a Grafana dashboard for one site, declared only when the
stack says the Prometheus operator's CRDs are present (``monitoring.crdsPresent``).

Owns: which metrics matter for a drill on Kubernetes (a cell without a primary or without its
synchronous standby, a cell an app server cannot serve, errors and p99 at the gateways), the
alert thresholds derived from the topology's SLOs, and the dashboard. Never: install Prometheus,
the operator or Grafana.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.core import v1 as core

from watertight.kube_names import API_CLIENTS_SECRET, LABEL_KIND, LABEL_PART_OF, PART_OF
from watertight.topology import Topology
from watertight_infra import kube
from watertight_infra.settings import StackSettings

MONITORING_API = "monitoring.coreos.com/v1"
NAME = "watertight"
SCRAPE_INTERVAL = "15s"
DASHBOARD_FILE = "watertight.json"
ERROR_RATIO_MAX = 0.01


__all__ = [
    "API_CLIENTS_SECRET"
]  # the clients' API tokens (components.Site makes it): Prometheus scrapes /metrics with the operator's


def service_monitor_spec(namespace: str, token_secret: str = API_CLIENTS_SECRET) -> dict[str, Any]:
    """App servers and gateways on their ``http`` port (their /metrics needs the operator's API
    token: ``token_secret``, key ``operator``), Patroni on its ``patroni`` port."""
    return {
        "namespaceSelector": {"matchNames": [namespace]},
        "selector": {
            "matchLabels": {LABEL_PART_OF: PART_OF},
            "matchExpressions": [
                {"key": LABEL_KIND, "operator": "In", "values": ["app", "gateway", "patroni"]}
            ],
        },
        "endpoints": [
            {
                "port": "http",
                "path": "/metrics",
                "interval": SCRAPE_INTERVAL,
                "authorization": {"type": "Bearer", "credentials": {"name": token_secret, "key": "operator"}},
            },
            {"port": "patroni", "path": "/metrics", "interval": SCRAPE_INTERVAL},
        ],
    }


def rules_spec(topology: Topology, site: str) -> dict[str, Any]:
    """Alerts; a cell without a primary longer than the RTO is what a drill would fail on."""
    rto_s = round(topology.slo.rto_seconds)
    labels = {"site": site}
    return {
        "groups": [
            {
                "name": "watertight.cells",
                "rules": [
                    {
                        "alert": "WatertightCellWithoutPrimary",
                        "expr": 'sum by (scope) (patroni_primary{scope=~"watertight-cell[0-9]+"}) < 1',
                        "for": f"{rto_s}s",
                        "labels": {**labels, "severity": "critical"},
                        "annotations": {
                            "summary": f"{{{{ $labels.scope }}}} has had no primary for longer than the RTO ({rto_s} s)"
                        },
                    },
                    {
                        "alert": "WatertightCellWithoutSyncStandby",
                        "expr": 'sum by (scope) (patroni_sync_standby{scope=~"watertight-cell[0-9]+"}) < 1',
                        "for": "1m",
                        "labels": {**labels, "severity": "warning"},
                        "annotations": {
                            "summary": "{{ $labels.scope }} commits without a synchronous standby: RPO is no longer 0"
                        },
                    },
                    {
                        "alert": "WatertightCellNotServed",
                        "expr": "max by (cell) (watertight_cell_ready) < 1",
                        "for": "30s",
                        "labels": {**labels, "severity": "critical"},
                        "annotations": {
                            "summary": "no app server can reach the primary of cell {{ $labels.cell }}"
                        },
                    },
                ],
            },
            {
                "name": "watertight.traffic",
                "rules": [
                    {
                        "alert": "WatertightErrorRatioHigh",
                        "expr": (
                            'sum by (cell) (rate(watertight_requests_total{outcome="5xx"}[1m]))'
                            " / sum by (cell) (rate(watertight_requests_total[1m]))"
                            f" > {ERROR_RATIO_MAX}"
                        ),
                        "for": "2m",
                        "labels": {**labels, "severity": "warning"},
                        "annotations": {
                            "summary": f"cell {{{{ $labels.cell }}}} answers more than {ERROR_RATIO_MAX:.0%} 5xx"
                        },
                    }
                ],
            },
        ]
    }


def dashboard(topology: Topology) -> dict[str, Any]:
    """A Grafana dashboard: TPS, errors and p99 per cell, primaries and app readiness per cell."""

    def panel(index: int, title: str, expr: str, legend: str, unit: str) -> dict[str, Any]:
        return {
            "id": index,
            "type": "timeseries",
            "title": title,
            "gridPos": {"h": 8, "w": 12, "x": 12 * (index % 2), "y": 8 * (index // 2)},
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "targets": [{"expr": expr, "legendFormat": legend, "refId": "A"}],
        }

    panels = [
        panel(
            0,
            "Requests per second by cell",
            "sum by (cell) (rate(watertight_requests_total[1m]))",
            "cell {{cell}}",
            "reqps",
        ),
        panel(
            1,
            "5xx per second by cell",
            'sum by (cell) (rate(watertight_requests_total{outcome="5xx"}[1m]))',
            "cell {{cell}}",
            "reqps",
        ),
        panel(
            2,
            "p99 latency by cell",
            "histogram_quantile(0.99, sum by (cell, le) (rate(watertight_request_seconds_bucket[1m])))",
            "cell {{cell}}",
            "s",
        ),
        panel(3, "Primary per cell", "sum by (scope) (patroni_primary)", "{{scope}}", "short"),
        panel(
            4,
            "Cell reachable from the app servers",
            "max by (cell, site) (watertight_cell_ready)",
            "cell {{cell}} at {{site}}",
            "short",
        ),
        panel(
            5,
            "Group-commit batch size p50",
            "histogram_quantile(0.5, sum by (cell, le) (rate(watertight_batch_size_bucket[1m])))",
            "cell {{cell}}",
            "short",
        ),
    ]
    return {
        "title": f"Watertight — {topology.cells} cells",
        "uid": "watertight",
        "schemaVersion": 39,
        "time": {"from": "now-30m", "to": "now"},
        "refresh": "10s",
        "panels": panels,
    }


class Monitoring(pulumi.ComponentResource):
    """ServiceMonitor, PrometheusRule and the Grafana dashboard ConfigMap of one site."""

    def __init__(
        self,
        site: str,
        settings: StackSettings,
        topology: Topology,
        parent: pulumi.Resource,
        provider: k8s.Provider,
        namespace: pulumi.Output[str],
    ) -> None:
        super().__init__(
            "watertight:infra:Monitoring", f"{site}-monitoring", None, pulumi.ResourceOptions(parent=parent)
        )
        opts = pulumi.ResourceOptions(parent=self, provider=provider)
        object_labels = {**kube.labels(site, "monitoring"), **settings.monitoring.rule_labels}
        CustomResource(
            f"{site}-service-monitor",
            api_version=MONITORING_API,
            kind="ServiceMonitor",
            metadata=kube.metadata(NAME, namespace, object_labels),
            spec=namespace.apply(service_monitor_spec),
            opts=opts,
        )
        CustomResource(
            f"{site}-prometheus-rule",
            api_version=MONITORING_API,
            kind="PrometheusRule",
            metadata=kube.metadata(NAME, namespace, object_labels),
            spec=rules_spec(topology, site),
            opts=opts,
        )
        core.ConfigMap(
            f"{site}-grafana-dashboard",
            metadata=kube.metadata(
                f"{NAME}-dashboard",
                namespace,
                {**kube.labels(site, "monitoring"), settings.monitoring.dashboard_label: "1"},
            ),
            data={DASHBOARD_FILE: json.dumps(dashboard(topology), indent=1, sort_keys=True)},
            opts=opts,
        )
        self.register_outputs({})
