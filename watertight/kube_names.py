"""The names the topology carries in Kubernetes: labels every pod has, the objects, containers,
paths and annotations that the Pulumi program declares and that the chaos target, the runbooks
and `watertight cluster` address.

Owns: those names, once, at the bottom of the toolkit (the Pulumi program in infra/, the chaos
kubernetes target, the runbooks' kubernetes target and the local cluster import them from here).
Never: import anything of the toolkit, talk to a cluster, or read configuration.
"""

from __future__ import annotations

# ---- labels (selectors of the chaos target, the runbooks and the cluster's Python API) ----------
NAMESPACE_DEFAULT = "watertight"
LABEL_PART_OF = "app.kubernetes.io/part-of"
PART_OF = "watertight"
LABEL_SITE = "watertight.io/site"
LABEL_CELL = "watertight.io/cell"
LABEL_COMPONENT = "watertight.io/component"
LABEL_KIND = "watertight.io/kind"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
MANAGED_BY = "pulumi"


def labels(site: str, kind: str, cell: int | None = None, component: str | None = None) -> dict[str, str]:
    """The labels a pod of the topology carries (the Pulumi program sets exactly these)."""
    found = {LABEL_PART_OF: PART_OF, LABEL_SITE: site, LABEL_KIND: kind}
    if cell is not None:
        found[LABEL_CELL] = str(cell)
    if component is not None:
        found[LABEL_COMPONENT] = component
    return found


def selector(terms: dict[str, str]) -> str:
    """A label selector string (``a=b,c=d``) from exact-match terms."""
    return ",".join(f"{key}={value}" for key, value in terms.items())


# ---- objects the program declares in each site's namespace ---------------------------------------
CREDENTIALS_SECRET = "watertight-credentials"  # the PostgreSQL passwords (render's secret names)
# the digests of the accepted API tokens, mounted (as a directory: the kubelet refreshes it, and
# the servers read it again, so a rotation needs no restart) into every app server and gateway
API_TOKENS_SECRET = "watertight-api-tokens"
API_TOKENS_DIR = "/etc/cardcore-tokens"
# the clients' side: {"api_tokens": {...}} as `secrets.json` (Locust) and the operator's token
# alone as `operator` (Prometheus scraping /metrics)
API_CLIENTS_SECRET = "watertight-api-clients"
API_CLIENTS_DIR = "/etc/watertight-clients"
API_CLIENTS_FILE = "secrets.json"
DEFAULT_DENY_POLICY = "default-deny-ingress"
# the cells drained for maintenance: one ConfigMap per site that drain-cell rewrites
DRAIN_CONFIG_MAP = "watertight-drain"
DRAIN_FILE = "drained-cells.json"
# on each app, gateway and Locust Deployment: the size activate-dr (dr) and failback (the
# centers) scale it to
ANNOTATION_ACTIVE_REPLICAS = "watertight.io/active-replicas"
ANNOTATION_CONFIG_CHECKSUM = "watertight.io/config-sha256"
# on a workload a chaos kill holds down (scaled to 0, as a lost machine stays lost): the replicas
# it had, which the target's start gives it back
ANNOTATION_HELD_DOWN = "watertight.io/held-down-replicas"

# ---- inside the pods -----------------------------------------------------------------------------
PATRONI_CONTAINER = "patroni"
PATRONI_CONFIG_DIR = "/etc/patroni"
PATRONI_FILE = "patroni.yml"
PATRONI_CONFIG = f"{PATRONI_CONFIG_DIR}/{PATRONI_FILE}"
POSTGRES_DATA_DIR = "/var/lib/postgresql/data"  # the data volume: PGDATA, the socket and pgpass
DATA_CLAIM = "data"  # a StatefulSet member's PersistentVolumeClaim is <claim>-<statefulset>-<ordinal>
# the member guard (watertight/runtime/guard.py) in the patroni image: the container's command, so
# PostgreSQL never outlives Patroni in a pod either; its watchdog pipe is on the pod's /tmp
MEMBER_GUARD = "/opt/watertight/guard.py"
WATCHDOG_PIPE = "/tmp/watertight-watchdog"
ETCD_CONTAINER = "etcd"
APP_CONTAINER = "app"
GATEWAY_CONTAINER = "gateway"
LOCUST_CONTAINER = "locust"
LOCUST_MASTER = "locust-master"
LOCUST_WORKER = "locust-worker"


def stateful_pod(component: str, ordinal: int = 0) -> str:
    """The pod of a StatefulSet member (etcd-<site>, pg-cell<N>-<site>): ``<component>-<ordinal>``."""
    return f"{component}-{ordinal}"


def data_claim(component: str, ordinal: int = 0) -> str:
    """The PersistentVolumeClaim of a StatefulSet member's data volume."""
    return f"{DATA_CLAIM}-{component}-{ordinal}"
