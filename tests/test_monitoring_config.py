"""What the local Prometheus, Alertmanager and exporters are told: every component of the topology
as a target with its kind, site and cell; the operator token only from a 0600 file; no password on
a command line; their own ports and data under the run directory."""

from __future__ import annotations

import re
from pathlib import Path

import msgspec
import yaml

from watertight import topology as topology_module
from watertight.monitoring import config
from watertight.render import generate_secrets, render_local

TOPOLOGY = topology_module.load(topology_module.DEFAULT_PATH)


def targets(document: dict, job: str) -> list[dict]:
    scrape = next(s for s in document["scrape_configs"] if s["job_name"] == job)
    return [{"target": t, **group["labels"]} for group in scrape["static_configs"] for t in group["targets"]]


def test_prometheus_scrapes_every_component_with_its_site_and_cell() -> None:
    document = config.prometheus_config(TOPOLOGY, "/run/rules.yml")
    members = [(cell, site) for cell in TOPOLOGY.cell_numbers for site in TOPOLOGY.sites]
    assert sorted((int(t["cell"]), t["site"]) for t in targets(document, "patroni")) == sorted(members)
    assert sorted((int(t["cell"]), t["site"]) for t in targets(document, "postgres")) == sorted(members)
    assert {t["site"] for t in targets(document, "gateway")} == set(TOPOLOGY.sites)
    assert {t["site"] for t in targets(document, "app")} == set(TOPOLOGY.sites)
    assert [t["target"] for t in targets(document, "entry")] == ["127.0.0.1:18080"]
    assert len(targets(document, "etcd")) == len(TOPOLOGY.sites) + 1  # and dr's own
    assert document["rule_files"] == ["/run/rules.yml"]
    assert document["global"]["scrape_interval"] == "2000ms"
    assert document["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:18093"]
    # the entry's upstream URLs become sites, for SiteUnreachableFromEntry
    relabel = next(s for s in document["scrape_configs"] if s["job_name"] == "entry")[
        "metric_relabel_configs"
    ]
    assert {r["replacement"] for r in relabel} == set(TOPOLOGY.sites)


def test_the_operator_token_goes_to_prometheus_in_a_file_only() -> None:
    without = config.prometheus_config(TOPOLOGY, "/run/rules.yml")
    assert all("authorization" not in s for s in without["scrape_configs"])
    with_token = config.prometheus_config(TOPOLOGY, "/run/rules.yml", "/run/prometheus/operator-token")
    guarded = {s["job_name"] for s in with_token["scrape_configs"] if "authorization" in s}
    assert guarded == {"entry", "gateway", "app"}
    for scrape in with_token["scrape_configs"]:
        if "authorization" in scrape:
            assert scrape["authorization"] == {
                "type": "Bearer",
                "credentials_file": "/run/prometheus/operator-token",
            }


def test_prometheus_scrapes_patroni_over_tls_verified_with_the_runs_ca(tmp_path: Path) -> None:
    """With the run's CA, Patroni's REST API and etcd speak TLS only: Prometheus scrapes them with https and
    the CA (a file of its own); the gateway's https upstreams are mapped to their site too."""
    clear = config.prometheus_config(TOPOLOGY, "/run/rules.yml")
    assert all("scheme" not in s and "tls_config" not in s for s in clear["scrape_configs"])
    with_ca = config.prometheus_config(TOPOLOGY, "/run/rules.yml", ca_path="/run/prometheus/tls/ca.crt")
    over_tls = {s["job_name"]: s for s in with_ca["scrape_configs"] if s.get("scheme") == "https"}
    assert set(over_tls) == {"patroni", "etcd"}
    assert over_tls["patroni"]["tls_config"] == {"ca_file": "/run/prometheus/tls/ca.crt"}
    gateway = next(s for s in with_ca["scrape_configs"] if s["job_name"] == "gateway")
    mapped = {r["regex"]: r["replacement"] for r in gateway["metric_relabel_configs"]}
    assert mapped[re.escape(TOPOLOGY.app_tls_url("samecity")) + "/?"] == "samecity"
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    prometheus = {c.name: c for c in config.components(TOPOLOGY, tmp_path, ca_cert=ca)}["prometheus"]
    assert prometheus.files["tls/ca.crt"] == ca
    document = yaml.safe_load(prometheus.files["prometheus.yml"])
    patroni = next(s for s in document["scrape_configs"] if s["job_name"] == "patroni")
    assert patroni["tls_config"]["ca_file"] == str(
        config.component_dir(tmp_path, "prometheus") / "tls/ca.crt"
    )


def test_prometheus_presents_the_toolkits_client_certificate_to_etcd_only(tmp_path: Path) -> None:
    """etcd admits no client without a certificate the run's CA signed: Prometheus gets the
    toolkit's (files of its own, 0600 like every component file) and presents it to etcd."""
    ca = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    client = {"cert": "CLIENT CERT", "key": "CLIENT KEY"}
    found = {c.name: c for c in config.components(TOPOLOGY, tmp_path, ca_cert=ca, client_cert=client)}
    prometheus = found["prometheus"]
    assert prometheus.files["tls/client.crt"] == "CLIENT CERT"
    assert prometheus.files["tls/client.key"] == "CLIENT KEY"
    own = config.component_dir(tmp_path, "prometheus")
    jobs = {s["job_name"]: s for s in yaml.safe_load(prometheus.files["prometheus.yml"])["scrape_configs"]}
    assert jobs["etcd"]["tls_config"] == {
        "ca_file": str(own / "tls/ca.crt"),
        "cert_file": str(own / "tls/client.crt"),
        "key_file": str(own / "tls/client.key"),
    }
    assert "cert_file" not in jobs["patroni"]["tls_config"]
    without = {c.name: c for c in config.components(TOPOLOGY, tmp_path, client_cert=client)}["prometheus"]
    assert "tls/client.key" not in without.files  # no CA: nothing speaks TLS, nothing to present


def test_components_listen_on_the_topologys_ports_with_data_in_the_run_directory(tmp_path: Path) -> None:
    found = {c.name: c for c in config.components(TOPOLOGY, tmp_path, operator_token="s3cret-token")}
    prometheus, alertmanager = found["prometheus"], found["alertmanager"]
    assert prometheus.listens == (("127.0.0.1", 18090),) and alertmanager.listens == (("127.0.0.1", 18093),)
    assert prometheus.data_dir == tmp_path / "data" / "prometheus"
    assert f"--storage.path={tmp_path / 'data' / 'alertmanager'}" in alertmanager.argv
    assert "--cluster.listen-address=" in alertmanager.argv  # no gossip port of its own
    assert prometheus.site is None and alertmanager.site is None  # no site fault cuts them
    assert prometheus.files[config.TOKEN_FILE] == "s3cret-token"
    assert not any("s3cret-token" in arg for c in found.values() for arg in c.argv)
    loaded = yaml.safe_load(prometheus.files["prometheus.yml"])
    assert loaded["rule_files"] == [str(tmp_path / "components" / "prometheus" / "rules.yml")]
    exporters = [c for c in found.values() if c.kind == "postgres-exporter"]
    assert len(exporters) == TOPOLOGY.cells * len(TOPOLOGY.sites)
    for exporter in exporters:
        assert exporter.service_user and "DATA_SOURCE_NAME" in exporter.env
        assert "password" not in exporter.env["DATA_SOURCE_NAME"]
        assert exporter.site in TOPOLOGY.sites and exporter.cell in TOPOLOGY.cell_numbers


def test_alertmanager_delivers_every_alert_and_its_resolution_to_the_drill() -> None:
    document = config.alertmanager_config(TOPOLOGY)
    assert document["route"]["group_by"] == ["..."] and document["route"]["group_wait"] == "1s"
    (hook,) = document["receivers"][0]["webhook_configs"]
    assert hook == {"url": "http://127.0.0.1:18094/alerts", "send_resolved": True, "max_alerts": 0}


def test_monitoring_can_be_switched_off_and_its_ports_must_not_collide(tmp_path: Path) -> None:
    off = msgspec.structs.replace(
        TOPOLOGY, monitoring=msgspec.structs.replace(TOPOLOGY.monitoring, enabled=False)
    )
    assert config.components(off, tmp_path) == []
    text = topology_module.DEFAULT_PATH.read_text().replace(
        "alertmanager_port: 18093", "alertmanager_port: 18090"
    )
    try:
        topology_module.parse(text, "clash")
    except topology_module.TopologyError as error:
        assert "monitoring.alertmanager_port" in str(error)
    else:
        raise AssertionError("two monitoring components on one port were accepted")


def test_the_core_components_are_rendered_as_before(tmp_path: Path) -> None:
    names = {c.name for c in render_local(TOPOLOGY, tmp_path, "/usr/bin/python3", generate_secrets())}
    assert not names & {"prometheus", "alertmanager"}  # monitoring is added by the runtime, beside them
