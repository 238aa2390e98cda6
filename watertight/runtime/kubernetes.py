"""The Kubernetes runtime: every site of the topology as pods of a Kubernetes cluster (one kube
context and namespace per site), behind the same Target interface as the local runtime.

Owns: the kubeconfig (the server, CA and token of each site's context), the REST calls to the API
server (list, delete and create objects; exec through kubectl), the translation of topology names
(site, cell, component, role) into pods by the labels of ``watertight.kube_names``, the members'
endpoints (pod IPs: the pod network must be routable from where the toolkit runs, as it is on the
node of ``watertight cluster``), and what the pods' Patroni and PostgreSQL say.
Never: start or stop the cluster (``watertight cluster`` does), guess a context, namespace or
network (every missing piece is named), or do what it cannot do faithfully: that raises
``TargetUnsupported`` naming the operation and what it needs.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import yaml
from cardcore.platform import auth

from watertight import private_files, render
from watertight import topology as topology_module
from watertight.kube_names import (
    ANNOTATION_HELD_DOWN,
    API_CLIENTS_FILE,
    API_CLIENTS_SECRET,
    APP_CONTAINER,
    CREDENTIALS_SECRET,
    ETCD_CONTAINER,
    GATEWAY_CONTAINER,
    LABEL_COMPONENT,
    LABEL_PART_OF,
    LABEL_SITE,
    MEMBER_GUARD,
    NAMESPACE_DEFAULT,
    PART_OF,
    PATRONI_CONTAINER,
    selector,
    stateful_pod,
)
from watertight.render import DR_SITE
from watertight.runtime.common import cell_not_steady, cell_view_of, writers_in_flight
from watertight.runtime.local import RUN_DIR_DEFAULT, choose_view, http_json
from watertight.runtime.target import Alerting, Member, Progress, TargetUnsupported
from watertight.topology import CENTERS, SITE_NAMES, Topology

TARGET = "kubernetes"
PYTHON = "python"  # the images' interpreter (their venv's, first on PATH), as the program runs it
HTTP_TIMEOUT_S = 10.0
EXEC_TIMEOUT_S = 30.0
PATRONI_TIMEOUT_S = 1.0
UP_TIMEOUT_S = 300.0
POLL_S = 1.0
PARTITION_POLICY = "watertight-partition"
LATENCY_FAULT = "watertight-latency"
CHAOS_MESH_API = "/apis/chaos-mesh.org/v1alpha1"
KUBECONFIG_ENV = "KUBECONFIG"
KUBECTL_ENV = "WATERTIGHT_KUBECTL"
TOPOLOGY_ENV = "WATERTIGHT_TOPOLOGY"
TOKENS_FILE = "kubernetes-api-tokens.json"
# the container of each kind of pod (the one exec and kill_process address)
CONTAINER_OF_KIND = {
    "patroni": PATRONI_CONTAINER,
    "etcd": ETCD_CONTAINER,
    "etcd-dr": ETCD_CONTAINER,
    "app": APP_CONTAINER,
    "gateway": GATEWAY_CONTAINER,
}
# lists the container's processes as JSON [[pid, ppid, cmdline], ...]; its own line carries the
# marker so the list leaves it out
PROCESS_MARKER = "watertight-process-list"
LIST_PROCESSES = (
    f"# {PROCESS_MARKER}\n"
    "import json, os\n"
    "found = []\n"
    "for name in os.listdir('/proc'):\n"
    "    if not name.isdigit():\n"
    "        continue\n"
    "    try:\n"
    "        stat = open(f'/proc/{name}/stat').read()\n"
    "        line = open(f'/proc/{name}/cmdline', 'rb').read().replace(b'\\0', b' ').decode(errors='replace')\n"
    "    except OSError:\n"
    "        continue\n"
    "    found.append([int(name), int(stat[stat.rfind(')') + 2:].split()[1]), line.strip()])\n"
    "print(json.dumps(found))\n"
)


class KubernetesRuntimeError(RuntimeError):
    """The cluster could not be reached or answered an error; the message names the call."""


# ---- the API -----------------------------------------------------------------------------------


class Api(Protocol):
    """What the runtime asks of the clusters, by site: REST calls and exec in a container."""

    def request(self, site: str, method: str, path: str, body: Any = None) -> Any:
        """The decoded JSON answer; raises ApiError with the status when it is not 2xx."""
        ...

    def exec(
        self, site: str, namespace: str, pod: str, container: str, argv: Sequence[str], timeout_s: float
    ) -> tuple[int, str, str]:
        """Run ``argv`` in a container: (exit code, stdout, stderr)."""
        ...


class ApiError(KubernetesRuntimeError):
    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class ContextConfig:
    """One kube context: where its API server is and how to authenticate to it."""

    name: str
    server: str
    ca_pem: str | None
    token: str | None
    namespace: str | None
    client_cert_file: str | None = None
    client_key_file: str | None = None


def read_kubeconfig(path: Path) -> dict[str, ContextConfig]:
    """The contexts of a kubeconfig (token or client-certificate-file users; CA inline or file)."""
    try:
        document = yaml.safe_load(path.read_text()) or {}
    except OSError as error:
        raise KubernetesRuntimeError(f"kubeconfig {path}: {error.strerror}") from None
    clusters = {c["name"]: c.get("cluster") or {} for c in document.get("clusters") or []}
    users = {u["name"]: u.get("user") or {} for u in document.get("users") or []}
    found = {}
    for entry in document.get("contexts") or []:
        context = entry.get("context") or {}
        cluster = clusters.get(context.get("cluster"), {})
        user = users.get(context.get("user"), {})
        ca_pem = None
        if cluster.get("certificate-authority-data"):
            ca_pem = base64.b64decode(cluster["certificate-authority-data"]).decode()
        elif cluster.get("certificate-authority"):
            ca_pem = Path(cluster["certificate-authority"]).read_text()
        token = user.get("token")
        if not token and user.get("tokenFile"):
            token = Path(user["tokenFile"]).read_text().strip()
        if not token and not user.get("client-certificate"):
            raise KubernetesRuntimeError(
                f"kubeconfig {path}: the user of context {entry['name']!r} has neither a token nor a "
                "client-certificate file (exec plugins and inline certificates are not supported)"
            )
        found[entry["name"]] = ContextConfig(
            name=entry["name"],
            server=str(cluster.get("server") or ""),
            ca_pem=ca_pem,
            token=token,
            namespace=context.get("namespace"),
            client_cert_file=user.get("client-certificate"),
            client_key_file=user.get("client-key"),
        )
    return found


class RestApi:
    """The clusters' API servers over HTTPS (one per site's context), exec through kubectl."""

    def __init__(self, kubeconfig: Path, contexts: Mapping[str, str], kubectl: str = "kubectl") -> None:
        self.kubeconfig = kubeconfig
        self.site_contexts = dict(contexts)
        self.kubectl = kubectl
        configs = read_kubeconfig(kubeconfig)
        missing = [c for c in self.site_contexts.values() if c not in configs]
        if missing:
            raise KubernetesRuntimeError(
                f"kubeconfig {kubeconfig} has no context {', '.join(missing)}; it has {', '.join(configs) or 'none'}"
            )
        self.configs = {site: configs[context] for site, context in self.site_contexts.items()}
        self._ssl: dict[str, ssl.SSLContext] = {}

    def _context(self, site: str) -> ssl.SSLContext:
        if site not in self._ssl:
            config = self.configs[site]
            context = (
                ssl.create_default_context(cadata=config.ca_pem)
                if config.ca_pem
                else ssl.create_default_context()
            )
            if config.client_cert_file:
                context.load_cert_chain(config.client_cert_file, config.client_key_file)
            self._ssl[site] = context
        return self._ssl[site]

    def request(self, site: str, method: str, path: str, body: Any = None) -> Any:
        config = self.configs[site]
        # a PATCH is a JSON merge patch (RFC 7386: null removes a key)
        content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        if config.token:
            headers["Authorization"] = f"Bearer {config.token}"
        request = urllib.request.Request(
            config.server + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers=headers,
        )
        try:
            with urllib.request.urlopen(
                request, timeout=HTTP_TIMEOUT_S, context=self._context(site)
            ) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ApiError(
                f"{method} {path} ({site}): {error.code} {error.read()[:300]!r}", error.code
            ) from None
        except OSError as error:
            raise KubernetesRuntimeError(
                f"{method} {path} ({site}, {config.server}): {error}; is the cluster up (watertight cluster status)?"
            ) from None

    def exec(
        self, site: str, namespace: str, pod: str, container: str, argv: Sequence[str], timeout_s: float
    ) -> tuple[int, str, str]:
        command = [
            self.kubectl, "--kubeconfig", str(self.kubeconfig), "--context", self.site_contexts[site],
            "-n", namespace, "exec", pod, "-c", container, "--", *argv,
        ]  # fmt: skip
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, check=False)
        except subprocess.TimeoutExpired:
            return 124, "", f"kubectl exec {pod}: no answer within {timeout_s:g} s"
        except OSError as error:
            raise KubernetesRuntimeError(f"kubectl ({self.kubectl}): {error}") from None
        return done.returncode, done.stdout, done.stderr


# ---- names -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """A component's Deployment or StatefulSet as the cluster has it now."""

    name: str
    site: str
    kind: str  # deployments or statefulsets (the API's resource)
    replicas: int
    held: int | None  # the replicas a chaos kill holds it down from (ANNOTATION_HELD_DOWN)


def wanted_replicas(workloads: Mapping[str, Workload]) -> dict[str, int]:
    """component -> the replicas its workload wants (0 for dr's idle app server and gateway); one
    a kill holds down wants what it had."""
    return {name: w.held if w.held is not None else w.replicas for name, w in workloads.items()}


@dataclass(frozen=True)
class Component:
    """A component of the topology as the program declares it: a workload named like it."""

    name: str
    site: str
    kind: str  # etcd, etcd-dr, patroni, app, gateway (the pods' watertight.io/kind)
    cell: int | None = None

    @property
    def stateful(self) -> bool:
        return self.kind in ("etcd", "etcd-dr", "patroni")


def components_of_topology(topology: Topology) -> list[Component]:
    """Every component the program declares for ``topology``, in start order."""
    found = [Component(render.etcd_name(site), site, "etcd") for site in SITE_NAMES]
    found.append(Component(render.ETCD_DR_NAME, DR_SITE, "etcd-dr"))
    found += [
        Component(render.pg_name(cell, site), site, "patroni", cell)
        for cell in topology.cell_numbers
        for site in SITE_NAMES
    ]
    found += [Component(render.app_name(site), site, "app") for site in SITE_NAMES]
    found += [Component(render.gateway_name(site), site, "gateway") for site in SITE_NAMES]
    return found


def roles_of(listed: Sequence[Sequence[Any]]) -> dict[int, str]:
    """The role of each process of a member's container (``[[pid, ppid, cmdline], ...]``), as the
    local runtime names them: guard, keeper, patroni, postgres (the postmaster), postgres-child,
    child. The listing process itself is left out."""
    procs = {int(p): (int(pp), str(line)) for p, pp, line in listed if PROCESS_MARKER not in str(line)}

    def argv0(pid: int) -> str:
        line = procs[pid][1]
        return line.split(" ", 1)[0] if line else ""

    def is_postgres(pid: int) -> bool:
        return pid in procs and os.path.basename(argv0(pid)) in ("postgres", "postmaster")

    postmasters = {pid for pid, (parent, _) in procs.items() if is_postgres(pid) and not is_postgres(parent)}

    def under_postmaster(pid: int) -> bool:
        seen = 0
        while pid in procs and seen <= len(procs):  # bounded: a listing is a snapshot, not a tree
            pid, seen = procs[pid][0], seen + 1
            if pid in postmasters:
                return True
        return False

    roles: dict[int, str] = {}
    for pid, (_, line) in procs.items():
        if MEMBER_GUARD in line or "watertight.runtime.guard" in line:
            roles[pid] = "keeper" if "--keeper" in line else "guard"
        elif pid in postmasters:
            roles[pid] = "postgres"
        elif under_postmaster(pid):
            roles[pid] = "postgres-child"
        elif " -m patroni" in f" {line} " or os.path.basename(argv0(pid)) == "patroni":
            roles[pid] = "patroni"
        else:
            roles[pid] = "child"
    return roles


def partition_policy(others_cidrs: list[str]) -> dict[str, Any]:
    """A NetworkPolicy for every pod of the topology in one site's namespace: traffic to and from
    anything but the other sites' networks stays allowed; the other sites are cut both ways."""
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": PARTITION_POLICY},
        "spec": {
            "podSelector": {"matchLabels": {LABEL_PART_OF: PART_OF}},
            "policyTypes": ["Ingress", "Egress"],
            "ingress": [{"from": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": others_cidrs}}]}],
            "egress": [{"to": [{"ipBlock": {"cidr": "0.0.0.0/0", "except": others_cidrs}}]}],
        },
    }


def latency_fault(delay_ms: int, others_cidrs: list[str]) -> dict[str, Any]:
    """A Chaos Mesh NetworkChaos delaying every pod of the topology's packets toward ``others``."""
    return {
        "apiVersion": "chaos-mesh.org/v1alpha1",
        "kind": "NetworkChaos",
        "metadata": {"name": LATENCY_FAULT},
        "spec": {
            "action": "delay",
            "mode": "all",
            "selector": {"labelSelectors": {LABEL_PART_OF: PART_OF}},
            "direction": "to",
            "externalTargets": others_cidrs,
            "delay": {"latency": f"{delay_ms}ms"},
        },
    }


def _pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return (pod.get("metadata") or {}).get("deletionTimestamp") is None and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


# ---- the runtime -------------------------------------------------------------------------------


class KubernetesRuntime:
    """The topology deployed by the Pulumi program, one namespace (and kube context) per site."""

    name = TARGET

    def __init__(
        self,
        api: Api,
        topology: Topology,
        namespaces: Mapping[str, str],
        entry_url: str,
        site_cidrs: Mapping[str, Sequence[str]] | None = None,
        run_dir: Path = RUN_DIR_DEFAULT,
        contexts: Mapping[str, str] | None = None,
        network_policy_enforced: bool = True,
    ) -> None:
        missing = [site for site in SITE_NAMES if site not in namespaces]
        if missing:
            raise KubernetesRuntimeError(f"target kubernetes needs a namespace for site {', '.join(missing)}")
        self.api = api
        self.topology = topology
        self.namespaces = dict(namespaces)
        self._entry_url = entry_url
        self.site_cidrs = {site: list(cidrs) for site, cidrs in (site_cidrs or {}).items()}
        self.run_dir = run_dir.absolute()
        self.contexts = dict(contexts or {})
        # whether the clusters' CNI enforces NetworkPolicy (configuration network_policy_enforced):
        # a partition where it does not would cut nothing and a drill would pass on no fault
        self.network_policy_enforced = network_policy_enforced
        self.components = components_of_topology(topology)

    # ---- construction --------------------------------------------------------------------------

    @classmethod
    def from_configuration(
        cls, configuration: Mapping[str, Any] | None, run_dir: Path = RUN_DIR_DEFAULT
    ) -> KubernetesRuntime:
        """From an experiment's configuration (``kube_contexts``, ``kube_namespace(s)``,
        ``site_cidrs``, ``entry_url``, ``kubeconfig``, ``topology``); without ``kube_contexts``,
        the local cluster of ``watertight cluster`` ($WATERTIGHT_CLUSTER_DIR)."""
        configuration = configuration or {}
        contexts = configuration.get("kube_contexts")
        if not contexts:
            return cls.local_cluster(run_dir)
        if not isinstance(contexts, Mapping):
            raise KubernetesRuntimeError(
                'target kubernetes needs the configuration key kube_contexts: {"prod": "<context>", '
                '"samecity": "<context>", "dr": "<context>"}, one per site'
            )
        from watertight.runbooks import kube

        # the runbooks' rule: every site has one (raises KubeTargetError naming the missing ones)
        contexts = kube.parse_contexts(",".join(f"{site}={context}" for site, context in contexts.items()))
        namespace = str(configuration.get("kube_namespace") or NAMESPACE_DEFAULT)
        per_site = configuration.get("kube_namespaces") or {}
        namespaces = {site: str(per_site.get(site) or namespace) for site in SITE_NAMES}
        entry_url = str(configuration.get("entry_url") or "")
        if not entry_url:
            raise KubernetesRuntimeError(
                "target kubernetes needs the configuration key entry_url (the URL clients use)"
            )
        kubeconfig = Path(
            str(
                configuration.get("kubeconfig")
                or os.environ.get(KUBECONFIG_ENV)
                or Path.home() / ".kube" / "config"
            )
        )
        topology_path = Path(
            str(configuration.get("topology") or os.environ.get(TOPOLOGY_ENV) or topology_module.DEFAULT_PATH)
        )
        topology = topology_module.parse(topology_path.read_text(), str(topology_path))
        cidrs = configuration.get("site_cidrs") or {}
        site_cidrs = {
            site: [value] if isinstance(value, str) else list(value) for site, value in cidrs.items()
        }
        kubectl = os.environ.get(KUBECTL_ENV) or shutil.which("kubectl") or "kubectl"
        api = RestApi(kubeconfig, {site: str(contexts[site]) for site in SITE_NAMES}, kubectl)
        return cls(
            api, topology, namespaces, entry_url, site_cidrs, run_dir, api.site_contexts,
            network_policy_enforced=bool(configuration.get("network_policy_enforced", True)),
        )  # fmt: skip

    @classmethod
    def local_cluster(cls, run_dir: Path = RUN_DIR_DEFAULT, root: Path | None = None) -> KubernetesRuntime:
        """The cluster of ``watertight cluster up`` (its kubeconfig, contexts and namespaces), with
        the topology the local stack deploys."""
        from watertight.cluster import api as cluster_api

        try:
            cluster = cluster_api.Cluster.from_directory(root)
        except cluster_api.ClusterApiError as error:
            raise KubernetesRuntimeError(str(error)) from None
        from watertight.cluster.spec import STACK
        from watertight_infra import harness
        from watertight_infra import settings as infra_settings

        topology = infra_settings.load_topology(infra_settings.parse(harness.stack_config(STACK)))
        configuration = cluster.chaos_configuration()
        api = RestApi(cluster.kubeconfig, cluster.contexts, str(cluster.kubectl_path))
        return cls(
            api,
            topology,
            cluster.namespaces,
            str(configuration["entry_url"]),
            configuration["site_cidrs"],
            run_dir,
            cluster.contexts,
            network_policy_enforced=bool(configuration["network_policy_enforced"]),
        )

    # ---- selection -----------------------------------------------------------------------------

    def _check_site(self, site: str | None) -> None:
        if site is not None and site not in SITE_NAMES:
            raise KubernetesRuntimeError(f"no site named {site!r}; sites are {', '.join(SITE_NAMES)}")

    def select(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[Component]:
        self._check_site(site)
        if cell is not None and cell not in self.topology.cell_numbers:
            raise KubernetesRuntimeError(f"no cell {cell}; cells are 1..{self.topology.cells}")
        if component == "entry":
            raise KubernetesRuntimeError(
                "the entry stands for the bank's global load balancer; on kubernetes it is not a pod of the topology"
            )
        chosen = [
            c
            for c in self.components
            if (site is None or c.site == site)
            and (cell is None or c.cell == cell)
            and (component is None or c.name == component)
        ]
        if component is not None and not chosen:
            if any(c.name == component for c in self.components):
                raise KubernetesRuntimeError(f"component {component} is not in site {site}")
            raise KubernetesRuntimeError(
                f"no component named {component!r}; names are etcd-<site>, etcd-dr-local, "
                "pg-cell<N>-<site>, app-<site>, gateway-<site>"
            )
        return chosen

    def components_of(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return [c.name for c in self.select(site, cell, component)]

    def namespace(self, site: str) -> str:
        return self.namespaces[site]

    def _pods_path(self, site: str, terms: Mapping[str, str] | None = None) -> str:
        query = f"?labelSelector={urllib.parse.quote(selector(dict(terms)))}" if terms else ""
        return f"/api/v1/namespaces/{self.namespaces[site]}/pods{query}"

    def pods(self, site: str, terms: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The pods of ``site``'s namespace whose labels match ``terms``."""
        return list(self.api.request(site, "GET", self._pods_path(site, terms))["items"])

    def pods_by_component(self, chosen: Sequence[Component]) -> dict[str, list[dict[str, Any]]]:
        """The pods of each chosen component (one list call per site involved)."""
        found: dict[str, list[dict[str, Any]]] = {c.name: [] for c in chosen}
        for site in dict.fromkeys(c.site for c in chosen):
            for pod in self.pods(site, {LABEL_PART_OF: PART_OF, LABEL_SITE: site}):
                name = ((pod.get("metadata") or {}).get("labels") or {}).get(LABEL_COMPONENT)
                if name in found:
                    found[name].append(pod)
        return found

    def instances(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        chosen = self.select(site, cell, component)
        by_site = {c.name: c.site for c in chosen}
        return [
            f"{by_site[name]}/{pod['metadata']['name']}"
            for name, pods in self.pods_by_component(chosen).items()
            for pod in pods
        ]

    def _pod(self, component: Component) -> dict[str, Any] | None:
        """The pod of a member or etcd (a StatefulSet of one: ``<component>-0``), or None."""
        path = f"/api/v1/namespaces/{self.namespaces[component.site]}/pods/{stateful_pod(component.name)}"
        try:
            pod: dict[str, Any] = self.api.request(component.site, "GET", path)
        except ApiError as error:
            if error.status == 404:
                return None
            raise
        return pod

    # ---- faults --------------------------------------------------------------------------------

    def _delete_pods(self, chosen: Sequence[Component], grace_period_s: int | None) -> list[str]:
        hit = []
        body = {"gracePeriodSeconds": grace_period_s} if grace_period_s is not None else None
        for name, pods in self.pods_by_component(chosen).items():
            site = next(c.site for c in chosen if c.name == name)
            deleted = False
            for pod in pods:
                path = f"/api/v1/namespaces/{self.namespaces[site]}/pods/{pod['metadata']['name']}"
                try:
                    self.api.request(site, "DELETE", path, body)
                    deleted = True
                except ApiError as error:
                    if error.status != 404:  # gone already: as good as deleted
                        raise
            if deleted:
                hit.append(name)
        return hit

    def kill(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Delete the selection's pods with no grace period (the machine is gone) and hold them
        down, as a lost machine stays lost and a killed local process stays dead: each workload is
        scaled to 0 with its replicas kept in an annotation, which ``start`` gives back. The pods
        are deleted first, so no graceful shutdown (Patroni's handing over) comes before."""
        chosen = self.select(site, cell, component)
        killed = self._delete_pods(chosen, grace_period_s=0)
        self._hold_down(chosen)
        return killed

    def stop(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Delete the selection's pods with their grace period (SIGTERM first); their
        controllers recreate them."""
        return self._delete_pods(self.select(site, cell, component), grace_period_s=None)

    def restart(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        chosen = self.select(site, cell, component)
        self._delete_pods(chosen, grace_period_s=None)
        return [c.name for c in chosen]

    def start(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Give the workloads a kill held down their replicas back (the controllers recreate
        the pods). Returns the components of the selection that want pods and have none Ready now
        (the ones being recreated)."""
        chosen = self.select(site, cell, component)
        names = {c.name for c in chosen}
        workloads = self._workloads({c.site for c in chosen})
        for workload in workloads.values():
            if workload.held is not None and workload.name in names:
                self._scale(workload, workload.held, held=None)
        wanted = wanted_replicas(workloads)  # what each wants is what it is given back
        pods = self.pods_by_component(chosen)
        return [
            c.name
            for c in chosen
            if wanted.get(c.name, 0) > 0 and not any(_pod_ready(p) for p in pods[c.name])
        ]

    def _workloads(self, sites: set[str]) -> dict[str, Workload]:
        """component -> its Deployment or StatefulSet in ``sites``."""
        found: dict[str, Workload] = {}
        for site in sorted(sites):
            for kind in ("deployments", "statefulsets"):
                path = f"/apis/apps/v1/namespaces/{self.namespaces[site]}/{kind}"
                for item in self.api.request(site, "GET", path)["items"]:
                    held = ((item.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_HELD_DOWN)
                    name = item["metadata"]["name"]
                    found[name] = Workload(
                        name, site, kind, int((item.get("spec") or {}).get("replicas") or 0),
                        int(held) if held is not None and str(held).isdigit() else None,
                    )  # fmt: skip
        return found

    def _scale(self, workload: Workload, replicas: int, held: int | None) -> None:
        """Set a workload's replicas and its held-down annotation (None removes it)."""
        path = f"/apis/apps/v1/namespaces/{self.namespaces[workload.site]}/{workload.kind}/{workload.name}"
        body = {
            "metadata": {"annotations": {ANNOTATION_HELD_DOWN: None if held is None else str(held)}},
            "spec": {"replicas": replicas},
        }
        self.api.request(workload.site, "PATCH", path, body)

    def _hold_down(self, chosen: Sequence[Component]) -> None:
        """Scale the chosen components' workloads to 0, keeping their replicas to give back."""
        names = {c.name for c in chosen}
        for workload in self._workloads({c.site for c in chosen}).values():
            if workload.name in names and workload.held is None and workload.replicas > 0:
                self._scale(workload, 0, held=workload.replicas)

    def _replicas_wanted(self, sites: set[str]) -> dict[str, int]:
        return wanted_replicas(self._workloads(sites))

    def freeze(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        self.select(site, cell, component)
        raise TargetUnsupported(
            "freeze",
            TARGET,
            "every process of a pod stopped (SIGSTOP), which a container's PID 1 ignores from inside "
            "the pod: Chaos Mesh PodChaos or the node's cgroup freezer (not built)",
            "use kill (the pods deleted) or partition instead",
        )

    def thaw(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Nothing is ever frozen on this target (freeze is not built): thaws nothing."""
        self.select(site, cell, component)
        return []

    def frozen(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        self.select(site, cell, component)
        return []

    def processes_of(self, component: str) -> list[dict[str, Any]]:
        """The processes of a component's pod (a StatefulSet's), with their roles."""
        (chosen,) = self.select(component=component)
        if not chosen.stateful:
            raise TargetUnsupported(
                f"the processes of {component}",
                TARGET,
                "one pod per component (a StatefulSet's); a Deployment's pods are many",
                "kill the component instead",
            )
        container = CONTAINER_OF_KIND[chosen.kind]
        code, out, err = self.api.exec(
            chosen.site, self.namespaces[chosen.site], stateful_pod(chosen.name), container,
            [PYTHON, "-c", LIST_PROCESSES], EXEC_TIMEOUT_S,
        )  # fmt: skip
        if code != 0:
            raise KubernetesRuntimeError(
                f"listing the processes of {stateful_pod(chosen.name)} ({chosen.site}) failed ({code}): {err.strip()[-300:]}"
            )
        listed = json.loads(out)
        roles = roles_of(listed)
        return [{"pid": pid, "role": role} for pid, role in sorted(roles.items())]

    def kill_process(self, component: str, role: str) -> list[Any]:
        """SIGKILL only the processes of ``role`` in the component's pod (exec in its container).
        Returns the PIDs killed, as the pod's PID namespace numbers them."""
        (chosen,) = self.select(component=component)
        described = self.processes_of(component)
        pids = [p["pid"] for p in described if p["role"] == role]
        if not pids:
            roles = sorted({p["role"] for p in described}) or ["none"]
            raise KubernetesRuntimeError(
                f"{component} has no {role} process; its processes are {', '.join(roles)}"
            )
        script = f"import os, signal\nfor pid in {pids!r}:\n    os.kill(pid, signal.SIGKILL)\n"
        code, _, err = self.api.exec(
            chosen.site, self.namespaces[chosen.site], stateful_pod(chosen.name),
            CONTAINER_OF_KIND[chosen.kind], [PYTHON, "-c", script], EXEC_TIMEOUT_S,
        )  # fmt: skip
        if code != 0:
            raise KubernetesRuntimeError(
                f"killing {role} of {component} failed ({code}): {err.strip()[-300:]}"
            )
        return pids

    def kill_listed_pids(self, site: str, every_process: bool = False) -> dict[str, Any]:
        self._check_site(site)
        raise TargetUnsupported(
            "kill_listed_pids",
            TARGET,
            "the PIDs of `watertight status --json`, which pods do not list",
            "kill_site deletes every pod of the site",
        )

    def writers_in_flight(self, site: str) -> int:
        return writers_in_flight(self, site)

    # ---- the members and what Patroni says -----------------------------------------------------

    def members(self, cell: int) -> list[Member]:
        """Each member of ``cell`` at its pod's address (empty while it has no pod or address)."""
        found = []
        for component in self.select(cell=cell):
            pod = self._pod(component)
            address = str(((pod or {}).get("status") or {}).get("podIP") or "")
            found.append(
                Member(
                    name=component.name,
                    site=component.site,
                    # "": no pod, or no address yet; nothing answers there
                    postgres_host=address,
                    postgres_port=self.topology.postgres_port(cell),
                    patroni_url=f"http://{address}:{self.topology.patroni_port(cell)}" if address else "",
                )
            )
        return found

    def _cluster_members(self, members: Sequence[Member]) -> list[dict[str, Any]]:
        urls = {m.name: m.patroni_url for m in members}
        views = []
        for member in members:
            if not member.patroni_url:
                continue
            status, body = http_json(f"{member.patroni_url}/cluster", timeout_s=PATRONI_TIMEOUT_S)
            if status == 200 and isinstance(body, dict):
                views.append(body.get("members", []))

        def claims_primary(reported: dict[str, Any]) -> bool:
            url = urls.get(str(reported.get("name")))
            if not url:
                return False
            status, body = http_json(url, timeout_s=0.5)
            return status == 200 and isinstance(body, dict) and body.get("role") in ("primary", "master")

        return choose_view(views, claims_primary)

    @staticmethod
    def site_of_member(member: Mapping[str, Any]) -> str | None:
        name = str(member.get("name") or "")
        return next((site for site in SITE_NAMES if name.endswith(f"-{site}")), None)

    def cell_view(self, cell: int) -> dict[str, Any]:
        endpoints = self.members(cell)
        members = self._cluster_members([m for m in endpoints if m.site != DR_SITE])
        dr_members = self._cluster_members([m for m in endpoints if m.site == DR_SITE])
        return cell_view_of(members, dr_members, self.site_of_member)

    def leader_site(self, cell: int) -> str:
        self.select(cell=cell)
        site = self.cell_view(cell)["leader_site"]
        if site is None:
            raise KubernetesRuntimeError(
                f"cell {cell} has no leader now; see `watertight status --target kubernetes`"
            )
        return str(site)

    @property
    def dr_active(self) -> bool:
        """dr serves once activate-dr has scaled its app server up (failback scales it to 0)."""
        return self._replicas_wanted({DR_SITE}).get(render.app_name(DR_SITE), 0) > 0

    def primary_sites(self) -> list[str]:
        return [DR_SITE] if self.dr_active else list(CENTERS)

    def primary_hosts(self, cell: int) -> list[str]:
        sites = self.primary_sites()
        return [m.postgres_host for m in self.members(cell) if m.site in sites and m.postgres_host]

    # ---- clients' side -------------------------------------------------------------------------

    @property
    def entry_url(self) -> str:
        return self._entry_url

    def gateway_urls(self) -> dict[str, str]:
        """The centers' gateways at one Ready pod each (pod IP and the topology's port)."""
        found = {}
        chosen = [c for c in self.components if c.kind == "gateway" and c.site in CENTERS]
        for name, pods in self.pods_by_component(chosen).items():
            ready = [p for p in pods if _pod_ready(p) and (p.get("status") or {}).get("podIP")]
            if ready:
                site = next(c.site for c in chosen if c.name == name)
                found[site] = f"http://{ready[0]['status']['podIP']}:{self.topology.ports.gateway}"
        return found

    def alerting(self) -> Alerting | None:
        """None: the program's alerting is the Prometheus operator's (ServiceMonitor, PrometheusRule),
        where its CRDs are present; the drill reads no Alertmanager of a cluster yet (not built)."""
        return None

    def _secret(self, name: str) -> dict[str, str]:
        site = CENTERS[0]
        path = f"/api/v1/namespaces/{self.namespaces[site]}/secrets/{name}"
        data = self.api.request(site, "GET", path).get("data") or {}
        return {key: base64.b64decode(value).decode() for key, value in data.items()}

    def api_tokens(self) -> dict[str, str]:
        """The clients' tokens, from the Secret the program gives Locust and Prometheus."""
        document = json.loads(self._secret(API_CLIENTS_SECRET)[API_CLIENTS_FILE])
        return dict(document[render.SECRET_API_TOKENS])

    def client_tokens(self) -> auth.ClientTokens:
        return auth.ClientTokens(self.api_tokens())

    def api_tokens_file(self) -> Path:
        path = self.run_dir / TOKENS_FILE
        self.run_dir.mkdir(parents=True, exist_ok=True)
        private_files.write_private_json(path, {render.SECRET_API_TOKENS: self.api_tokens()})
        return path

    def superuser_password(self) -> str:
        return self._secret(CREDENTIALS_SECRET)[render.SECRET_SUPERUSER_PASSWORD]

    def root_cert(self) -> str | None:
        """None: the stack makes no certificates yet, so its servers speak without TLS."""
        return None

    def ready_urls(self) -> dict[str, str]:
        """Every Ready-or-not pod of the expected gateways (dr's only while it serves) and the entry."""
        sites = [*CENTERS, DR_SITE] if self.dr_active else list(CENTERS)
        chosen = [c for c in self.components if c.kind == "gateway" and c.site in sites]
        urls = {}
        for name, pods in self.pods_by_component(chosen).items():
            if not pods:
                urls[name] = ""  # nothing answers: not ready
            for pod in pods:
                address = (pod.get("status") or {}).get("podIP")
                urls[f"{name}/{pod['metadata']['name']}"] = (
                    f"http://{address}:{self.topology.ports.gateway}/readyz" if address else ""
                )
        urls["entry"] = f"{self.entry_url}/readyz"
        return urls

    def not_ready_reasons(self) -> list[str]:
        reasons = []
        for cell in self.topology.cell_numbers:
            view = self.cell_view(cell)
            if (reason := cell_not_steady(cell, view)) is not None:
                reasons.append(reason)
        for name, url in self.ready_urls().items():
            if not url or http_json(url)[0] != 200:
                reasons.append(f"{name} is not ready")
        return reasons

    # ---- network faults ------------------------------------------------------------------------

    def _cidrs(self, sites: Sequence[str]) -> list[str]:
        found: list[str] = []
        for site in sites:
            if site not in self.site_cidrs:
                raise KubernetesRuntimeError(
                    f'target kubernetes needs the networks of site {site!r} (configuration site_cidrs: {{"prod": ["10.1.0.0/16"], ...}})'
                )
            found.extend(c for c in self.site_cidrs[site] if c not in found)
        return found

    def partition(self, site: str) -> dict[str, Any]:
        """A NetworkPolicy in ``site``'s namespace cutting the other sites' networks both ways
        (enforced only where the CNI enforces NetworkPolicy with ipBlock); refused where the
        configuration says the CNI enforces none."""
        self._check_site(site)
        if not self.network_policy_enforced:
            raise TargetUnsupported(
                "partition",
                TARGET,
                "a CNI that enforces NetworkPolicy (these clusters' configuration says theirs does not: "
                "the bridge plugin of `watertight cluster` enforces none, so the policy would cut nothing)",
                "lose the site instead (kill_site), or run the partition drills on the local target",
            )
        others = [s for s in SITE_NAMES if s != site]
        policy = partition_policy(self._cidrs(others))
        path = f"/apis/networking.k8s.io/v1/namespaces/{self.namespaces[site]}/networkpolicies"
        self.api.request(site, "POST", path, policy)
        return {"site": site, "policy": PARTITION_POLICY, "namespace": self.namespaces[site]}

    def _delete_everywhere(self, collection: str, name: str) -> list[str]:
        removed = []
        for site in SITE_NAMES:
            try:
                self.api.request(
                    site, "DELETE", collection.format(namespace=self.namespaces[site]) + f"/{name}"
                )
                removed.append(site)
            except ApiError as error:
                if error.status != 404:  # not there: nothing to heal
                    raise
        return removed

    def heal_partition(self) -> dict[str, Any]:
        healed = self._delete_everywhere(
            "/apis/networking.k8s.io/v1/namespaces/{namespace}/networkpolicies", PARTITION_POLICY
        )
        return {"healed": healed}

    def add_latency(self, delay_ms: int, sites: list[str] | None = None) -> dict[str, Any]:
        """Chaos Mesh NetworkChaos (delay) in each chosen site's namespace, toward the other
        chosen sites' networks (needs Chaos Mesh in the clusters)."""
        chosen = list(sites or SITE_NAMES)
        for site in chosen:
            self._check_site(site)
        done = []
        for site in chosen:
            fault = latency_fault(delay_ms, self._cidrs([s for s in chosen if s != site]))
            path = f"{CHAOS_MESH_API}/namespaces/{self.namespaces[site]}/networkchaos"
            try:
                self.api.request(site, "POST", path, fault)
            except ApiError as error:
                if error.status == 404:
                    raise TargetUnsupported(
                        "add_latency",
                        TARGET,
                        "Chaos Mesh's NetworkChaos in the clusters (not installed here)",
                    ) from None
                raise
            done.append(site)
        return {"delay_ms": delay_ms, "sites": done}

    def remove_latency(self) -> dict[str, Any]:
        removed = []
        for site in SITE_NAMES:
            path = f"{CHAOS_MESH_API}/namespaces/{self.namespaces[site]}/networkchaos/{LATENCY_FAULT}"
            try:
                self.api.request(site, "DELETE", path)
                removed.append(site)
            except ApiError as error:
                if error.status != 404:  # not there, or no Chaos Mesh at all: nothing to remove
                    raise
        return {"removed": removed}

    def heal_network(self) -> dict[str, Any]:
        return {**self.heal_partition(), **self.remove_latency()}

    # ---- operations ----------------------------------------------------------------------------

    def switchover(self, cell: int, to_site: str) -> dict[str, Any]:
        from watertight.runbooks import ops

        return ops.switchover(self, cell, to_site)

    def status(self) -> dict[str, Any]:
        """Sites, cells and components with their pods (what `watertight status` says locally)."""
        pods = self.pods_by_component(self.components)
        wanted = self._replicas_wanted(set(SITE_NAMES))
        cells = {str(cell): self.cell_view(cell) for cell in self.topology.cell_numbers}
        roles = {
            f"pg-cell{cell}-{m['site']}": m["role"] or "unknown"
            for cell, view in cells.items()
            for m in view["members"]
        }
        components = []
        for component in self.components:
            own = pods[component.name]
            ready = [p for p in own if _pod_ready(p)]
            components.append(
                {
                    "name": component.name,
                    "kind": component.kind,
                    "site": component.site,
                    "cell": component.cell,
                    "role": roles.get(component.name, component.kind),
                    "alive": bool(ready),
                    "expected": wanted.get(component.name, 0) > 0,
                    "replicas_wanted": wanted.get(component.name, 0),
                    "pods": [
                        {
                            "name": p["metadata"]["name"],
                            "ready": _pod_ready(p),
                            "phase": (p.get("status") or {}).get("phase"),
                            "ip": (p.get("status") or {}).get("podIP"),
                            "restarts": sum(
                                int(c.get("restartCount") or 0)
                                for c in (p.get("status") or {}).get("containerStatuses") or []
                            ),
                        }
                        for p in own
                    ],
                }
            )
        sites = {}
        for site in SITE_NAMES:
            own = [c for c in components if c["site"] == site and c["expected"]]
            sites[site] = {
                "up": bool(own) and all(c["alive"] for c in own),
                "role": self.topology.sites[site].role,
                "namespace": self.namespaces[site],
                "context": self.contexts.get(site),
                "components_alive": sum(1 for c in own if c["alive"]),
                "components": len(own),
            }
        return {
            "target": TARGET,
            "name": self.topology.name,
            "run_dir": str(self.run_dir),
            "entry": self.entry_url,
            "sites": sites,
            "cells": cells,
            "components": components,
            "mode": {"dr_active": wanted.get(render.app_name(DR_SITE), 0) > 0},
        }

    def up(self, progress: Progress = lambda _: None) -> dict[str, Any]:
        """The cluster's topology is deployed by `watertight cluster up` (or `pulumi up`): wait,
        bounded by UP_TIMEOUT_S, until it is steady; raises naming what is missing."""
        started = time.monotonic()
        last_note = started
        while True:
            reasons = self.not_ready_reasons()
            if not reasons:
                seconds = round(time.monotonic() - started, 1)
                progress(f"the topology on kubernetes is steady ({seconds} s)")
                return {"started": [], "seconds": seconds, "entry": self.entry_url}
            if time.monotonic() - started > UP_TIMEOUT_S:
                raise KubernetesRuntimeError(
                    f"the topology on kubernetes is not steady after {UP_TIMEOUT_S:.0f} s: {'; '.join(reasons)}; "
                    "see `watertight cluster status` (deploy it with `watertight cluster up`)"
                )
            if time.monotonic() - last_note > 10:
                progress(f"waiting for the topology on kubernetes: {'; '.join(reasons)}")
                last_note = time.monotonic()
            time.sleep(POLL_S)

    def cpu_sample(self) -> dict[Any, tuple[str, float]]:
        raise TargetUnsupported(
            "bench (CPU per transaction)",
            TARGET,
            "the pods' CPU counters (the metrics API or the node's cgroups; not built)",
            "run `watertight bench` on the local topology",
        )

    def runbook_vars(self) -> dict[str, Any]:
        from watertight.runbooks import kube

        if not self.contexts:
            raise KubernetesRuntimeError("the runbooks need the kube context of every site")
        target = kube.KubeTarget(dict(self.contexts), self.namespaces[CENTERS[0]], self.topology)
        found = target.runbook_vars()
        found["kube_namespaces"] = dict(self.namespaces)
        kubeconfig = getattr(self.api, "kubeconfig", None)
        if kubeconfig is not None:  # the tasks' client reads it from K8S_AUTH_KUBECONFIG
            found["kube_kubeconfig"] = str(kubeconfig)
        return found
