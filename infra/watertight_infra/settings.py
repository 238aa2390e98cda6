"""The configuration of one stack (``Pulumi.<stack>.yaml``, namespace ``watertight:``), typed.

Owns: every config key the program reads, its default and its validation: a wrong key fails with
the key named, before any resource is declared. The topology itself (cells, ports, Patroni
timings, PostgreSQL and app tuning, SLOs) comes from the toolkit's topology file, so the clusters
and the local runtime are rendered from one description. Never: read secrets here (they stay
Pulumi secrets, see ``SECRET_KEYS``) or contact a cluster.
"""

from __future__ import annotations

import ipaddress
import json
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from watertight import topology as topology_module
from watertight.topology import SITE_NAMES, Topology, key_message

PROJECT = "watertight"
INFRA_DIR = Path(__file__).resolve().parent.parent

# Pulumi secrets (``pulumi config set --secret watertight:<key> ...``): the program passes them to
# Kubernetes Secrets only, never to a ConfigMap, an annotation or an output
SECRET_SUPERUSER_PASSWORD = "superuserPassword"
SECRET_REPLICATION_PASSWORD = "replicationPassword"
SECRET_PAN_KEY = "panKeyHex"
# the API tokens clients send, one per client kind, as JSON: {"acquirer": ..., "channel": ...,
# "operator": ...}; the servers get their SHA-256 digests only
SECRET_API_TOKENS = "apiTokens"
# optional, the same shape: the tokens of before a rotation, still accepted until it is removed
SECRET_API_TOKENS_PREVIOUS = "apiTokensPrevious"
SECRET_KEYS = (
    SECRET_SUPERUSER_PASSWORD,
    SECRET_REPLICATION_PASSWORD,
    SECRET_PAN_KEY,
    SECRET_API_TOKENS,
    SECRET_API_TOKENS_PREVIOUS,
)

# the Kubernetes version the program is written against; an older cluster (kubernetesVersion)
# gets the older API versions of the same objects, with the same fields
KUBERNETES_VERSION_DEFAULT = "1.31"
# (first minor version with the GA API, the older API version used below it)
PDB_V1_SINCE = 21  # policy/v1 PodDisruptionBudget; policy/v1beta1 before
HPA_V2_SINCE = 23  # autoscaling/v2 HorizontalPodAutoscaler; autoscaling/v2beta2 before
KUBERNETES_MINOR_MIN = 20

ServiceType = Literal["ClusterIP", "NodePort", "LoadBalancer"]
Fraction = Annotated[float, msgspec.Meta(gt=0, le=1)]
NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class SettingsError(ValueError):
    """The stack configuration is unusable; the message names the key."""


class SiteSettings(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """How to reach a site's cluster and how the other sites reach it."""

    context: str  # the kube context of the site's cluster (adopt by kubeconfig + context)
    service_domain: str  # <component>.<namespace>.<serviceDomain> resolves from every site
    networks: list[str]  # pod and node CIDRs of the site: pg_hba and NetworkPolicy ipBlocks
    kubeconfig: str | None = None  # path or content; None: $KUBECONFIG or ~/.kube/config
    storage_class: str | None = None  # None: the cluster's default StorageClass
    # the site's namespace when it differs from the stack's ``namespace``: several sites sharing
    # one cluster (one namespace each), as on the local cluster of `watertight cluster`
    namespace: str | None = None


class Images(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    core: str = "watertight/core:0.1.0"  # app server and gateway: core-app/Containerfile
    patroni: str = "watertight/patroni:0.1.0"  # Patroni + PostgreSQL 15: --target patroni
    etcd: str = "quay.io/coreos/etcd:v3.5.17"
    locust: str = "watertight/locust:0.1.0"  # --target locust
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"


class PodSize(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """Requests equal limits (Guaranteed QoS): a pod's CPU is what the sizing counted on."""

    cpu_millis: Annotated[int, msgspec.Meta(ge=10, le=256_000)]
    memory_mib: Annotated[int, msgspec.Meta(ge=16, le=1_048_576)]


class Resources(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    app: PodSize = PodSize(cpu_millis=1000, memory_mib=512)
    gateway: PodSize = PodSize(cpu_millis=1000, memory_mib=256)
    postgres: PodSize = PodSize(cpu_millis=2000, memory_mib=2048)
    etcd: PodSize = PodSize(cpu_millis=500, memory_mib=512)
    locust_worker: PodSize = PodSize(cpu_millis=1000, memory_mib=512)
    postgres_storage_gib: Annotated[int, msgspec.Meta(ge=1)] = 20
    etcd_storage_gib: Annotated[int, msgspec.Meta(ge=1)] = 2


class Load(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """The headline load the plan is sized for (transactions per second, both centers together)."""

    financial_tps: NonNegative = 10_000
    nonfinancial_tps: NonNegative = 50_000


class CpuShare(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """Where a transaction's CPU goes; weights, normalized (``watertight bench --json`` prints them
    per kind as ``us_per_txn_by_kind``)."""

    app: NonNegative
    gateway: NonNegative
    postgres: NonNegative
    etcd: NonNegative = 0.0

    def normalized(self) -> dict[str, float]:
        weights = {"app": self.app, "gateway": self.gateway, "postgres": self.postgres, "etcd": self.etcd}
        total = sum(weights.values())
        if total <= 0:
            raise SettingsError("cpuCost: a share must have a positive weight")
        return {kind: value / total for kind, value in weights.items()}


class CpuCost(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    """CPU microseconds per transaction, summed over every process (``watertight bench``). The
    defaults were measured on a 2-core AMD EPYC with all three sites and the load generator on it
    (README, Performance): upper bounds, noisy."""

    financial_us: Annotated[float, msgspec.Meta(gt=0)] = 2776.0
    nonfinancial_us: Annotated[float, msgspec.Meta(gt=0)] = 1084.0
    financial_share: CpuShare = CpuShare(app=648, gateway=583, postgres=1505, etcd=41)
    nonfinancial_share: CpuShare = CpuShare(app=345, gateway=341, postgres=396, etcd=3)


class Sizing(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    target_cpu_utilization: Fraction = 0.7  # what a pod may use of its CPU at the headline load
    each_center_carries_full_load: bool = True  # a center must carry everything when the other is lost
    replicas_min: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 2
    autoscale_max_factor: Annotated[float, msgspec.Meta(ge=1, le=10)] = 2.0


class Locust(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    enabled: bool = False
    site: Literal["prod", "samecity"] = "prod"
    # one FastHttpUser process does ~5,300 requests/s on one core here (DESIGN.md)
    requests_per_second_per_worker: Annotated[int, msgspec.Meta(ge=1)] = 5000
    workers_max: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 100


class Monitoring(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    crds_present: bool = False  # the Prometheus operator's CRDs (ServiceMonitor, PrometheusRule)
    namespace: str = "monitoring"  # where Prometheus runs: allowed to scrape through the NetworkPolicies
    rule_labels: dict[str, str] = {}  # labels the Prometheus' selectors need (e.g. release: kube-prometheus)
    dashboard_label: str = "grafana_dashboard"  # the Grafana sidecar's label for dashboard ConfigMaps


class StackSettings(msgspec.Struct, forbid_unknown_fields=True, rename="camel", frozen=True):
    sites: dict[str, SiteSettings]
    topology: str = "../topology.yaml"  # relative to infra/
    cells: int | None = None  # overrides the topology's cell count
    namespace: str = "watertight"
    # "1.<minor>" of the oldest cluster: PodDisruptionBudgets and autoscalers take the API
    # version it serves (policy/v1beta1 before 1.21, autoscaling/v2beta2 before 1.23)
    kubernetes_version: str = KUBERNETES_VERSION_DEFAULT
    entry_url: str | None = None  # the global load balancer's URL in front of the gateways
    images: Images = Images()
    postgres_bin_dir: str = "/usr/lib/postgresql/15/bin"
    # a cell's member in its standby center waits this long, at its first start only, for the
    # member in its leader center to lead, so the cells start led as the topology says
    leader_bootstrap_wait_seconds: Annotated[int, msgspec.Meta(ge=0, le=3600)] = 600
    etcd_binary: str = "/usr/local/bin/etcd"
    # what the kubelet asks an etcd member to see it alive: etcd 3.5 answers this without quorum;
    # etcd 3.4 (Debian's, the local stack) ignores `serializable` and needs a leader, so a member
    # cut off or starved would be restarted for it: there, /version
    etcd_liveness_path: str = "/health?serializable=true"
    cross_site_service_type: ServiceType = "ClusterIP"
    cross_site_service_annotations: dict[str, str] = {}
    gateway_service_type: ServiceType = "LoadBalancer"
    resources: Resources = Resources()
    load: Load = Load()
    cpu_cost: CpuCost = CpuCost()
    sizing: Sizing = Sizing()
    locust: Locust = Locust()
    monitoring: Monitoring = Monitoring()

    def validate(self) -> None:
        if sorted(self.sites) != sorted(SITE_NAMES):
            raise SettingsError(
                f"sites: must name exactly {', '.join(SITE_NAMES)}; got {', '.join(sorted(self.sites)) or 'none'}"
            )
        for name, site in self.sites.items():
            if not site.networks:
                raise SettingsError(f"sites.{name}.networks: needs at least one CIDR")
            for cidr in site.networks:
                try:
                    ipaddress.ip_network(cidr)
                except ValueError:
                    raise SettingsError(f"sites.{name}.networks: {cidr!r} is not a CIDR") from None
            if not site.service_domain or site.service_domain.startswith("."):
                raise SettingsError(
                    f"sites.{name}.serviceDomain: must be a DNS suffix like svc.{name}.example"
                )
        _dns_label("namespace", self.namespace)
        for name, site in self.sites.items():
            if site.namespace is not None:
                _dns_label(f"sites.{name}.namespace", site.namespace)
        namespaces = [self.namespace_of(name) for name in self.sites]
        shared = {self.sites[name].context for name in self.sites}
        if len(shared) < len(self.sites) and len(set(namespaces)) < len(namespaces):
            raise SettingsError(
                "sites: two sites share a kube context and a namespace; give each its own "
                "sites.<site>.namespace (their objects have the same names)"
            )
        self.kubernetes_minor()

    def namespace_of(self, site: str) -> str:
        """The namespace of ``site``'s objects in its cluster."""
        return self.sites[site].namespace or self.namespace

    def kubernetes_minor(self) -> int:
        major, _, minor = self.kubernetes_version.partition(".")
        if major != "1" or not minor.isdigit() or int(minor) < KUBERNETES_MINOR_MIN:
            raise SettingsError(
                f"kubernetesVersion: {self.kubernetes_version!r} is not 1.<minor> with minor >= "
                f"{KUBERNETES_MINOR_MIN} (the oldest cluster the stack deploys to, e.g. 1.31)"
            )
        return int(minor)


def _dns_label(key: str, value: str) -> None:
    if not (
        0 < len(value) <= 63
        and value[0].isalnum()
        and value[-1].isalnum()
        and all(c.isdigit() or ("a" <= c <= "z") or c == "-" for c in value)
    ):
        raise SettingsError(f"{key}: {value!r} is not a DNS label (lower case, digits, '-', at most 63)")


def key_names() -> list[str]:
    """Every top-level config key the program reads (without the ``watertight:`` prefix)."""
    return [field.encode_name for field in msgspec.structs.fields(StackSettings)] + list(SECRET_KEYS)


def parse(values: Mapping[str, Any]) -> StackSettings:
    """Settings from already-decoded config values (top-level key -> value)."""
    try:
        settings = msgspec.convert(dict(values), type=StackSettings, strict=False)
    except msgspec.ValidationError as error:
        raise SettingsError(key_message(str(error))) from None
    settings.validate()
    return settings


_STRING_KEYS = frozenset(
    (
        "topology",
        "namespace",
        "kubernetesVersion",
        "entryUrl",
        "postgresBinDir",
        "etcdBinary",
        "etcdLivenessPath",
        "crossSiteServiceType",
        "gatewayServiceType",
    )
)


def from_config(get: Callable[[str], str | None]) -> StackSettings:
    """Settings from raw config strings (``pulumi.Config(PROJECT).get``): a structured value
    arrives as JSON, a plain string as itself."""
    values: dict[str, Any] = {}
    for field in msgspec.structs.fields(StackSettings):
        raw = get(field.encode_name)
        if raw is None:
            continue
        if field.encode_name in _STRING_KEYS:
            values[field.encode_name] = raw
            continue
        try:
            values[field.encode_name] = json.loads(raw)
        except json.JSONDecodeError:
            raise SettingsError(
                f"{field.encode_name}: not a number, a boolean or an object: {raw!r}"
            ) from None
    return parse(values)


def load_topology(settings: StackSettings) -> Topology:
    """The topology file the stack names (relative to infra/), with the stack's cell count."""
    path = Path(settings.topology)
    if not path.is_absolute():
        path = INFRA_DIR / path
    return topology_module.load(path, cells=settings.cells)


def ceil_div(numerator: float, denominator: float) -> int:
    return max(0, math.ceil(numerator / denominator - 1e-9))
