"""Prometheus scrape and alert rules and a Grafana dashboard for one site, declared only when the
stack says the Prometheus operator's CRDs are present (``monitoring.crdsPresent``).

Owns: what the operator's Prometheus scrapes and how it labels it. The rules and the dashboard are
watertight.monitoring.rules', the same the local Prometheus loads (tests/test_monitoring_rules.py
compares them). Never: install Prometheus, the operator or Grafana, or define a rule of its own.
"""

from __future__ import annotations

import json
from typing import Any

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.apiextensions import CustomResource
from pulumi_kubernetes.core import v1 as core

from watertight.kube_names import (
    API_CLIENTS_SECRET,
    LABEL_CELL,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_PART_OF,
    LABEL_SITE,
    PART_OF,
)
from watertight.monitoring import rules
from watertight.topology import Topology
from watertight_infra import kube
from watertight_infra.settings import StackSettings

MONITORING_API = "monitoring.coreos.com/v1"
NAME = "watertight"
SCRAPE_INTERVAL = "5s"  # the rules rate over 30 s and detect within 15 s
DASHBOARD_FILE = "watertight.json"


def _pod_label(label: str) -> str:
    """The meta label Prometheus gives a pod label (``watertight.io/site`` -> ``..._watertight_io_site``)."""
    return "__meta_kubernetes_pod_label_" + "".join(c if c.isalnum() else "_" for c in label)


# the labels the rules rely on (kind, site, cell, component), from the pods' own labels
RELABELINGS = [
    {"sourceLabels": [_pod_label(label)], "targetLabel": target, "action": "replace"}
    for label, target in (
        (LABEL_KIND, "kind"),
        (LABEL_SITE, "site"),
        (LABEL_CELL, "cell"),
        (LABEL_COMPONENT, "component"),
    )
]


__all__ = [
    "API_CLIENTS_SECRET"
]  # the clients' API tokens (components.Site makes it): Prometheus scrapes /metrics with the operator's


def service_monitor_spec(namespace: str, token_secret: str = API_CLIENTS_SECRET) -> dict[str, Any]:
    """App servers and gateways on their ``http`` port (their /metrics needs the operator's API
    token: ``token_secret``, key ``operator``; their series carry their own cell and site:
    honoured), Patroni on its ``patroni`` port, etcd on its ``client`` port; each target labelled
    as watertight.monitoring.rules expects."""
    return {
        "namespaceSelector": {"matchNames": [namespace]},
        "selector": {
            "matchLabels": {LABEL_PART_OF: PART_OF},
            "matchExpressions": [
                {"key": LABEL_KIND, "operator": "In", "values": ["app", "gateway", "patroni", "etcd"]}
            ],
        },
        "endpoints": [
            {
                "port": "http",
                "path": "/metrics",
                "interval": SCRAPE_INTERVAL,
                "honorLabels": True,
                "relabelings": RELABELINGS,
                "authorization": {"type": "Bearer", "credentials": {"name": token_secret, "key": "operator"}},
            },
            {"port": "patroni", "path": "/metrics", "interval": SCRAPE_INTERVAL, "relabelings": RELABELINGS},
            {"port": "client", "path": "/metrics", "interval": SCRAPE_INTERVAL, "relabelings": RELABELINGS},
        ],
    }


def rules_spec(topology: Topology) -> dict[str, Any]:
    """The rule groups of watertight.monitoring.rules, exactly as the local Prometheus loads them."""
    return {"groups": rules.rule_groups(topology)}


def dashboard(topology: Topology) -> dict[str, Any]:
    """The dashboard of watertight.monitoring.rules (one source with the rules)."""
    return rules.dashboard(topology)


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
            spec=rules_spec(topology),
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
