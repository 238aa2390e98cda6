"""What the local cluster is, read from the stack that describes it (infra/Pulumi.local.yaml).

Owns: the cluster's fixed facts (node name, bridge, service network, ports on loopback) and those
the stack names (the pod network and the node's address on it, one kube context and namespace per
site, the cluster domain, the storage class, the entry's address), checked for being one cluster.
Never: start anything or touch the machine.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from watertight.topology import SITE_NAMES

STACK = "local"
INFRA_DIR = Path(__file__).resolve().parent.parent.parent / "infra"
NODE_NAME = "watertight-node"
BRIDGE = "watertight0"
SERVICE_NETWORK = "10.96.0.0/16"
API_PORT = 6443
NODE_PORT_RANGE = "30000-32767"
# on loopback: nothing else in the cluster calls them
ETCD_CLIENT_PORT = 23790
ETCD_PEER_PORT = 23800
CONTROLLER_MANAGER_PORT = 10257
SCHEDULER_PORT = 10259
KUBELET_PORT = 10250  # on the node's address: the API server calls it for exec and logs
KUBELET_HEALTHZ_PORT = 10248
PROXY_HEALTHZ_PORT = 10256
PROXY_METRICS_PORT = 10249
DNS_PORT = 53
STORAGE_PROVISIONER = "watertight.io/hostpath"


class SpecError(ValueError):
    """The stack does not describe one single-node cluster; the message names the key."""


@dataclass(frozen=True)
class ClusterSpec:
    pod_network: str  # every site's network: one node, one pod network
    node_ip: str  # the bridge's address: the node's, the API server's, DNS's and the entry's
    contexts: dict[str, str]  # site -> kube context
    namespaces: dict[str, str]  # site -> namespace
    cluster_domain: str  # cluster.local, from serviceDomain svc.<domain>
    storage_class: str
    entry_url: str

    @property
    def service_ip(self) -> str:
        """The `kubernetes` Service's address: the first of the service network."""
        return str(next(ipaddress.ip_network(SERVICE_NETWORK).hosts()))

    @property
    def api_url(self) -> str:
        return f"https://{self.node_ip}:{API_PORT}"

    @property
    def entry_port(self) -> int:
        port = urlsplit(self.entry_url).port
        assert port is not None
        return port

    @property
    def bridge_cidr(self) -> str:
        return f"{self.node_ip}/{ipaddress.ip_network(self.pod_network).prefixlen}"


def from_stack_config(values: dict[str, object]) -> ClusterSpec:
    """The cluster a stack's ``watertight:`` values describe (see infra/Pulumi.local.yaml)."""
    sites = values.get("sites")
    if not isinstance(sites, dict) or sorted(sites) != sorted(SITE_NAMES):
        raise SpecError(f"sites: the local stack must name exactly {', '.join(SITE_NAMES)}")
    networks = {tuple(site.get("networks") or ()) for site in sites.values()}
    if len(networks) != 1 or len(next(iter(networks))) != 1:
        raise SpecError(
            "sites.<site>.networks: every site of the one-node cluster has the same one pod network"
        )
    pod_network = next(iter(networks))[0]
    try:
        network = ipaddress.ip_network(pod_network)
    except ValueError:
        raise SpecError(f"sites.<site>.networks: {pod_network!r} is not a CIDR") from None
    if network.overlaps(ipaddress.ip_network(SERVICE_NETWORK)):
        raise SpecError(
            f"sites.<site>.networks: {pod_network} overlaps the service network {SERVICE_NETWORK}"
        )
    node_ip = str(next(network.hosts()))
    domains = {str(site.get("serviceDomain") or "") for site in sites.values()}
    if len(domains) != 1 or not next(iter(domains)).startswith("svc."):
        raise SpecError(
            "sites.<site>.serviceDomain: every site has the same svc.<cluster domain> (svc.cluster.local)"
        )
    classes = {site.get("storageClass") for site in sites.values()}
    if len(classes) != 1 or not next(iter(classes)):
        raise SpecError("sites.<site>.storageClass: every site names the cluster's one StorageClass")
    contexts = {name: str(site.get("context") or "") for name, site in sites.items()}
    namespaces = {
        name: str(site.get("namespace") or values.get("namespace") or "") for name, site in sites.items()
    }
    if len(set(namespaces.values())) != len(SITE_NAMES) or not all(namespaces.values()):
        raise SpecError(
            "sites.<site>.namespace: each site needs a namespace of its own on the one API server"
        )
    if len(set(contexts.values())) != len(SITE_NAMES) or not all(contexts.values()):
        raise SpecError("sites.<site>.context: each site needs a context of its own")
    entry_url = str(values.get("entryUrl") or "")
    parts = urlsplit(entry_url)
    if parts.scheme != "http" or parts.hostname != node_ip or not parts.port:
        raise SpecError(f"entryUrl: must be http://{node_ip}:<port> (the entry runs on the node's address)")
    return ClusterSpec(
        pod_network=str(network),
        node_ip=node_ip,
        contexts={s: contexts[s] for s in SITE_NAMES},
        namespaces={s: namespaces[s] for s in SITE_NAMES},
        cluster_domain=next(iter(domains)).removeprefix("svc."),
        storage_class=str(next(iter(classes))),
        entry_url=entry_url,
    )


def load(stack: str = STACK) -> ClusterSpec:
    from watertight_infra import harness  # the stack file as the program reads it

    return from_stack_config(harness.stack_config(stack))
