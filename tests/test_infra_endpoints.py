"""render.KubernetesEndpoints: the addresses the renderers write when each site is a cluster, so
etcd, Patroni, app servers and gateways are configured by the same code as the local runtime."""

from __future__ import annotations

from pathlib import Path

import pytest

from watertight import render, topology
from watertight.topology import Topology

DOMAINS = {"prod": "svc.a.example", "samecity": "svc.b.example", "dr": "svc.c.example"}
NETWORKS = {"prod": ("10.1.0.0/16",), "samecity": ("10.2.0.0/16", "10.1.0.0/16"), "dr": ("10.3.0.0/16",)}


@pytest.fixture
def topo() -> Topology:
    return topology.load(topology.DEFAULT_PATH, cells=3)


@pytest.fixture
def endpoints(topo: Topology) -> render.KubernetesEndpoints:
    return render.KubernetesEndpoints(topo, "core", DOMAINS, NETWORKS, "https://cards.example")


def test_components_are_named_by_their_service_in_their_sites_domain(
    endpoints: render.KubernetesEndpoints, topo: Topology
) -> None:
    assert (
        endpoints.postgres_member(2, "samecity")
        == f"pg-cell2-samecity.core.svc.b.example:{topo.postgres_port(2)}"
    )
    assert (
        endpoints.patroni_api_url(3, "dr") == f"http://pg-cell3-dr.core.svc.c.example:{topo.patroni_port(3)}"
    )
    assert (
        endpoints.etcd_client_url("prod") == f"http://etcd-prod.core.svc.a.example:{topo.ports.etcd_client}"
    )
    assert (
        endpoints.etcd_dr_peer_url() == f"http://etcd-dr-local.core.svc.c.example:{topo.ports.etcd_dr_peer}"
    )
    assert endpoints.app_url("samecity") == f"http://app-samecity.core.svc.b.example:{topo.ports.app}"
    assert endpoints.gateway_url("prod") == f"http://gateway-prod.core.svc.a.example:{topo.ports.gateway}"
    assert endpoints.entry_url() == "https://cards.example"


def test_pods_listen_on_every_interface_and_clients_come_from_the_sites_networks(
    endpoints: render.KubernetesEndpoints, topo: Topology
) -> None:
    assert endpoints.listen_address("prod") == "0.0.0.0"
    assert endpoints.client_networks() == ["10.1.0.0/16", "10.2.0.0/16", "10.3.0.0/16"]
    args = render.etcd_args(topo, endpoints, "samecity", Path("/var/lib/etcd/data"))
    assert args[args.index("--listen-peer-urls") + 1] == f"http://0.0.0.0:{topo.ports.etcd_peer}"
    assert args[args.index("--initial-advertise-peer-urls") + 1] == endpoints.etcd_peer_url("samecity")
    config = render.patroni_config(
        topo, endpoints, 1, "prod", Path("/var/lib/postgresql/data"), Path("/usr/lib/postgresql/15/bin")
    )
    assert config["restapi"]["listen"] == f"0.0.0.0:{topo.patroni_port(1)}"
    assert config["restapi"]["connect_address"] == f"pg-cell1-prod.core.svc.a.example:{topo.patroni_port(1)}"
    assert "host replication replicator 10.3.0.0/16 scram-sha-256" in config["postgresql"]["pg_hba"]


def test_a_site_without_a_domain_or_networks_is_refused(topo: Topology) -> None:
    with pytest.raises(ValueError, match="service domain for site 'dr'"):
        render.KubernetesEndpoints(topo, "core", {"prod": "a", "samecity": "b"}, NETWORKS, "")
    with pytest.raises(ValueError, match="networks for site 'samecity'"):
        render.KubernetesEndpoints(topo, "core", DOMAINS, {**NETWORKS, "samecity": ()}, "")
