"""Configuration of the local monitoring: Prometheus (what it scrapes, with which labels, its
rules and its Alertmanager), Alertmanager (every alert to the drill's receiver, resolutions too)
and the PostgreSQL exporter's queries.

Owns: the scrape targets and their labels (``kind``, ``site``, ``cell``, ``component``: what
watertight.monitoring.rules relies on), and the timings that bound detection (scrape and
evaluation interval, Alertmanager's group wait). Never: start anything, or put a secret in a file
other than the token file the runtime writes 0600.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from watertight.monitoring import rules
from watertight.render import (
    DR_SITE,
    ENTRY,
    ETCD_DR_NAME,
    STAGE_MONITORING,
    SUPERUSER,
    TLS_CA_FILE,
    TLS_CLIENT_CERT_FILE,
    TLS_CLIENT_KEY_FILE,
    Component,
    LocalEndpoints,
    app_name,
    component_dir,
    data_dir,
    etcd_name,
    gateway_name,
    pg_name,
)
from watertight.topology import Topology

RULES_FILE = "rules.yml"
# Alertmanager: deliver a new alert after 1 s, further alerts of a group every 5 s, and never
# more than the drill needs (it records every notification with its time)
GROUP_WAIT = "1s"
GROUP_INTERVAL = "5s"
REPEAT_INTERVAL = "4h"
RECEIVER = "watertight-drill"
RETENTION = "2d"

# whether a member takes writes: out of recovery and not sealed read-only
EXPORTER_QUERIES = {
    "pg_member": {
        "query": (
            "SELECT CASE WHEN pg_is_in_recovery() OR current_setting('default_transaction_read_only') = 'on'"
            " THEN 0 ELSE 1 END AS writable"
        ),
        "master": True,
        "metrics": [
            {
                "writable": {
                    "usage": "GAUGE",
                    "description": "1 when this PostgreSQL is out of recovery and not read-only",
                }
            }
        ],
    }
}


def _duration(seconds: float) -> str:
    return f"{round(seconds * 1000)}ms"


def _target(url_or_hostport: str) -> str:
    return re.sub(r"^https?://", "", url_or_hostport).rstrip("/")


def _static(target: str, **labels: Any) -> dict[str, Any]:
    return {"targets": [target], "labels": {k: str(v) for k, v in labels.items()}}


def prometheus_config(
    topology: Topology,
    rules_path: str,
    token_path: str | None = None,
    ca_path: str | None = None,
    client_paths: tuple[str, str] | None = None,
) -> dict[str, Any]:
    """prometheus.yml: every gateway (and the entry), app server, Patroni, etcd member and
    PostgreSQL exporter of the topology, labelled by kind, site, cell and component; the rules of
    watertight.monitoring.rules; alerts to the topology's Alertmanager. ``token_path``: a file
    holding the operator's API token, sent as a bearer token to the app servers and gateways
    (their /metrics wants it once the API has tokens). ``ca_path``: the run's CA, which the
    servers that speak TLS (Patroni's REST API) are verified with; without it they speak in clear.
    ``client_paths``: the toolkit's client certificate and key, presented to etcd (which admits
    no client without one)."""
    endpoints = LocalEndpoints(topology, tls=ca_path is not None)
    over_tls = {"scheme": "https", "tls_config": {"ca_file": ca_path}} if ca_path is not None else {}
    etcd_tls = over_tls
    if over_tls and client_paths is not None:
        cert_file, key_file = client_paths
        etcd_tls = {
            "scheme": "https",
            "tls_config": {"ca_file": ca_path, "cert_file": cert_file, "key_file": key_file},
        }
    interval = topology.monitoring.scrape_interval_s
    auth = {"authorization": {"type": "Bearer", "credentials_file": token_path}} if token_path else {}
    # the gateways name their upstreams by URL: give the entry's a site, for SiteUnreachableFromEntry
    upstream_sites = [
        {
            "source_labels": ["upstream"],
            "regex": re.escape(endpoints.gateway_url(site)) + "/?",
            "target_label": "upstream_site",
            "replacement": site,
        }
        for site in topology.sites
    ] + [
        {
            "source_labels": ["upstream"],
            "regex": re.escape(url) + "/?",
            "target_label": "upstream_site",
            "replacement": site,
        }
        for site in topology.sites
        # the other center's gateway names it by its TLS listener
        for url in (endpoints.app_url(site), endpoints.app_tls_url(site))
        if url
    ]
    entry = _static(_target(endpoints.entry_url()), kind="entry", site=ENTRY, component=ENTRY)
    gateways = [
        _static(_target(endpoints.gateway_url(s)), kind="gateway", site=s, component=gateway_name(s))
        for s in topology.sites
    ]
    apps = [
        _static(_target(endpoints.app_url(s)), kind="app", site=s, component=app_name(s))
        for s in topology.sites
    ]
    members = [
        (cell, site) for cell in topology.cell_numbers for site in topology.sites
    ]  # every cell has a member in every site (dr: its standby cluster)
    patroni = [
        _static(
            _target(endpoints.patroni_api_url(cell, site)),
            kind="patroni",
            site=site,
            cell=cell,
            component=pg_name(cell, site),
        )
        for cell, site in members
    ]
    exporters = [
        _static(
            f"{topology.address(site)}:{topology.postgres_exporter_port(cell)}",
            kind="postgres",
            site=site,
            cell=cell,
            component=pg_name(cell, site),
        )
        for cell, site in members
    ]
    etcd = [
        _static(_target(endpoints.etcd_client_url(s)), kind="etcd", site=s, component=etcd_name(s))
        for s in topology.sites
    ] + [_static(_target(endpoints.etcd_dr_client_url()), kind="etcd", site=DR_SITE, component=ETCD_DR_NAME)]

    def job(name: str, targets: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"job_name": name, "static_configs": targets, **extra}

    monitoring = topology.monitoring
    return {
        "global": {
            "scrape_interval": _duration(interval),
            "scrape_timeout": _duration(interval * 0.75),
            "evaluation_interval": _duration(interval),
            "external_labels": {"topology": topology.name},
        },
        "rule_files": [rules_path],
        "alerting": {
            "alertmanagers": [
                {"static_configs": [{"targets": [f"{monitoring.address}:{monitoring.alertmanager_port}"]}]}
            ]
        },
        "scrape_configs": [
            # their series carry their own cell and site: keep them (the same values as the target's)
            job("entry", [entry], honor_labels=True, metric_relabel_configs=upstream_sites, **auth),
            job("gateway", gateways, honor_labels=True, metric_relabel_configs=upstream_sites, **auth),
            job("app", apps, honor_labels=True, **auth),
            job("patroni", patroni, **over_tls),
            job("postgres", exporters),
            job("etcd", etcd, **etcd_tls),
            job(
                "monitoring",
                [
                    _static(
                        f"{monitoring.address}:{monitoring.prometheus_port}",
                        kind="prometheus",
                        component="prometheus",
                    ),
                    _static(
                        f"{monitoring.address}:{monitoring.alertmanager_port}",
                        kind="alertmanager",
                        component="alertmanager",
                    ),
                ],
            ),
        ],
    }


def alertmanager_config(topology: Topology) -> dict[str, Any]:
    """alertmanager.yml: every alert on its own (grouped by all its labels), delivered to the
    drill's receiver at once and again when it resolves."""
    return {
        "route": {
            "receiver": RECEIVER,
            "group_by": ["..."],
            "group_wait": GROUP_WAIT,
            "group_interval": GROUP_INTERVAL,
            "repeat_interval": REPEAT_INTERVAL,
        },
        "receivers": [
            {
                "name": RECEIVER,
                "webhook_configs": [
                    {"url": topology.alert_receiver_url, "send_resolved": True, "max_alerts": 0}
                ],
            }
        ],
    }


def dump(document: dict[str, Any]) -> str:
    header = "# rendered by watertight.monitoring.config from the topology; rewritten at each start\n"
    return header + yaml.safe_dump(document, sort_keys=False, width=1000)


# ---- the components -------------------------------------------------------------------------------

PROMETHEUS = "prometheus"
ALERTMANAGER = "alertmanager"
PROMETHEUS_BIN = "/usr/bin/prometheus"
ALERTMANAGER_BIN = "/usr/bin/prometheus-alertmanager"
EXPORTER_BIN = "/usr/bin/prometheus-postgres-exporter"
TOKEN_FILE = "operator-token"
MONITORING_KINDS = (PROMETHEUS, ALERTMANAGER, "postgres-exporter")


def exporter_name(cell: int, site: str) -> str:
    return f"pg-exporter-cell{cell}-{site}"


def components(
    topology: Topology,
    run_dir: Path,
    operator_token: str | None = None,
    ca_cert: str | None = None,
    client_cert: Mapping[str, str] | None = None,
) -> list[Component]:
    """Prometheus, Alertmanager and one PostgreSQL exporter per member, as components of the local
    runtime. Prometheus and Alertmanager belong to no site (like the entry, a site fault never cuts
    them); each exporter lives in its member's site and reaches it on its socket, as the service
    user, without a password. Their data is in the run directory; their ports are the topology's,
    so a Prometheus of the host (Debian's, on :9090) is neither used nor disturbed. ``ca_cert``:
    the run's CA certificate (PEM), what Prometheus verifies the servers that speak TLS with;
    ``client_cert``: the toolkit's client certificate (``{"cert", "key"}``), presented to etcd."""
    if not topology.monitoring.enabled:
        return []
    run_dir = Path(run_dir).absolute()
    monitoring = topology.monitoring
    found: list[Component] = []
    for cell in topology.cell_numbers:
        for site in topology.sites:
            name = exporter_name(cell, site)
            member_dir = data_dir(run_dir, pg_name(cell, site))
            listen = f"{topology.address(site)}:{topology.postgres_exporter_port(cell)}"
            dsn = (
                f"host={member_dir} port={topology.postgres_port(cell)} user={SUPERUSER} "
                "dbname=postgres sslmode=disable connect_timeout=1"
            )
            found.append(
                Component(
                    name=name,
                    kind="postgres-exporter",
                    site=site,
                    cell=cell,
                    argv=[
                        EXPORTER_BIN,
                        f"--web.listen-address={listen}",
                        "--disable-default-metrics",
                        "--disable-settings-metrics",
                        f"--extend.query-path={component_dir(run_dir, name) / 'queries.yaml'}",
                        "--log.level=warn",
                    ],
                    env={"DATA_SOURCE_NAME": dsn},
                    files={"queries.yaml": yaml.safe_dump(EXPORTER_QUERIES, sort_keys=False)},
                    service_user=True,
                    ready_url=f"http://{listen}/metrics",
                    stage=STAGE_MONITORING,
                    listens=((topology.address(site), topology.postgres_exporter_port(cell)),),
                )
            )
    own = component_dir(run_dir, ALERTMANAGER)
    found.append(
        Component(
            name=ALERTMANAGER,
            kind=ALERTMANAGER,
            site=None,
            cell=None,
            argv=[
                ALERTMANAGER_BIN,
                f"--config.file={own / 'alertmanager.yml'}",
                f"--storage.path={data_dir(run_dir, ALERTMANAGER)}",
                f"--web.listen-address={monitoring.address}:{monitoring.alertmanager_port}",
                "--cluster.listen-address=",  # no gossip port: one instance, nothing else to meet
                "--log.level=warn",
            ],
            files={"alertmanager.yml": dump(alertmanager_config(topology))},
            ready_url=topology.alertmanager_url + "/-/ready",
            stage=STAGE_MONITORING,
            data_dir=data_dir(run_dir, ALERTMANAGER),
            listens=((monitoring.address, monitoring.alertmanager_port),),
        )
    )
    own = component_dir(run_dir, PROMETHEUS)
    files = {
        RULES_FILE: rules.rules_yaml(topology),
        "prometheus.yml": dump(
            prometheus_config(
                topology,
                str(own / RULES_FILE),
                str(own / TOKEN_FILE) if operator_token else None,
                str(own / TLS_CA_FILE) if ca_cert else None,
                (str(own / TLS_CLIENT_CERT_FILE), str(own / TLS_CLIENT_KEY_FILE))
                if ca_cert and client_cert
                else None,
            )
        ),
    }
    if ca_cert:
        files[TLS_CA_FILE] = ca_cert
        if client_cert:
            files[TLS_CLIENT_CERT_FILE] = client_cert["cert"]
            files[TLS_CLIENT_KEY_FILE] = client_cert["key"]  # written 0600, like every component file
    if operator_token:
        files[TOKEN_FILE] = operator_token  # written 0600, like every component file
    found.append(
        Component(
            name=PROMETHEUS,
            kind=PROMETHEUS,
            site=None,
            cell=None,
            argv=[
                PROMETHEUS_BIN,
                f"--config.file={own / 'prometheus.yml'}",
                f"--storage.tsdb.path={data_dir(run_dir, PROMETHEUS)}",
                f"--storage.tsdb.retention.time={RETENTION}",
                f"--web.listen-address={monitoring.address}:{monitoring.prometheus_port}",
                "--web.enable-lifecycle",
                "--log.level=warn",
            ],
            files=files,
            ready_url=topology.prometheus_url + "/-/ready",
            stage=STAGE_MONITORING,
            data_dir=data_dir(run_dir, PROMETHEUS),
            listens=((monitoring.address, monitoring.prometheus_port),),
        )
    )
    return found
