"""The kubernetes target without a cluster: which pods and objects each fault and probe hits,
through the same chaos actions as the local target, answered from a recording of the API (the
pods the Pulumi program's local stack declares, with the labels it gives them), and errors that
say plainly what is missing or what the target cannot do."""

from __future__ import annotations

import ast
import base64
import copy
import json
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from watertight import drill, render
from watertight.chaos import actions, probes, targets
from watertight.cluster import deploy
from watertight.kube_names import ANNOTATION_HELD_DOWN, LABEL_COMPONENT, MEMBER_GUARD
from watertight.runbooks import kube
from watertight.runtime import kubernetes as kube_runtime
from watertight.runtime.kubernetes import ApiError, KubernetesRuntime, KubernetesRuntimeError
from watertight.runtime.local import LocalRuntime
from watertight.runtime.target import Target, TargetUnsupported
from watertight.topology import SITE_NAMES
from watertight_infra import harness
from watertight_infra import settings as infra_settings

REPO = Path(__file__).resolve().parent.parent
NAMESPACES = {site: f"watertight-{site}" for site in SITE_NAMES}
CIDRS = {"prod": ["10.1.0.0/16"], "samecity": ["10.2.0.0/16"], "dr": ["10.3.0.0/16"]}
ENTRY = "http://10.244.0.1:30080"
PART = "app.kubernetes.io/part-of=watertight"


# ---- a recording of the API server -------------------------------------------------------------


def _labels_match(labels: dict[str, str], query: str) -> bool:
    selector = urllib.parse.parse_qs(query).get("labelSelector", [""])[0]
    terms = [term.split("=", 1) for term in selector.split(",") if term]
    return all(labels.get(key) == value for key, value in terms)


class RecordedApi:
    """Answers as the API server of the local cluster did for the objects the program declares:
    one pod per replica (a StatefulSet's ``<name>-0``, a Deployment's ``<name>-<hash>-<id>``), Ready,
    each with an address of its site's network; Secrets as ``data`` (base64). Records every call."""

    def __init__(self, declared: dict[str, list[dict[str, Any]]]) -> None:
        self.calls: list[tuple[str, str, str, Any]] = []
        self.pods: dict[str, list[dict[str, Any]]] = {site: [] for site in SITE_NAMES}
        self.workloads: dict[str, dict[str, list[dict[str, Any]]]] = {
            site: {"deployments": [], "statefulsets": []} for site in SITE_NAMES
        }
        self.secrets: dict[str, dict[str, dict[str, Any]]] = {site: {} for site in SITE_NAMES}
        self.objects: dict[str, dict[str, dict[str, Any]]] = {site: {} for site in SITE_NAMES}
        self.exec_answers: list[tuple[int, str, str]] = []
        self.execs: list[tuple[str, str, str, list[str]]] = []
        site_of_namespace = {namespace: site for site, namespace in NAMESPACES.items()}
        for objects in declared.values():
            for item in objects:
                namespace = item["metadata"].get("namespace")
                site = site_of_namespace.get(namespace)
                if site is None:
                    continue
                if item["kind"] == "Secret":
                    data = {
                        k: base64.b64encode(v.encode()).decode()
                        for k, v in (item.get("stringData") or {}).items()
                    }
                    self.secrets[site][item["metadata"]["name"]] = {
                        "metadata": item["metadata"],
                        "data": data,
                    }
                if item["kind"] in ("StatefulSet", "Deployment"):
                    kind = "statefulsets" if item["kind"] == "StatefulSet" else "deployments"
                    self.workloads[site][kind].append(copy.deepcopy(item))
                    for replica in range(int(item["spec"].get("replicas") or 0)):
                        name = item["metadata"]["name"]
                        pod_name = (
                            f"{name}-{replica}" if kind == "statefulsets" else f"{name}-6d9f7c-x{replica}q"
                        )
                        self.pods[site].append(self._pod(site, namespace, pod_name, item))

    def _pod(self, site: str, namespace: str, name: str, workload: dict[str, Any]) -> dict[str, Any]:
        network = CIDRS[site][0].split("/")[0].rsplit(".", 2)[0]
        address = f"{network}.0.{10 + len(self.pods[site])}"
        return {
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": dict(workload["spec"]["template"]["metadata"]["labels"]),
            },
            "status": {
                "phase": "Running",
                "podIP": address,
                "conditions": [{"type": "Ready", "status": "True"}],
                "containerStatuses": [{"name": "main", "restartCount": 0}],
            },
        }

    def request(self, site: str, method: str, path: str, body: Any = None) -> Any:
        self.calls.append((site, method, path, copy.deepcopy(body)))
        parsed = urllib.parse.urlsplit(path)
        parts = parsed.path.strip("/").split("/")
        assert parts[parts.index("namespaces") + 1] == NAMESPACES[site], f"{path} asked through {site}"
        resource = parts[parts.index("namespaces") + 2]
        name = parts[parts.index("namespaces") + 3] if len(parts) > parts.index("namespaces") + 3 else None
        if resource == "pods":
            pods = self.pods[site]
            if method == "GET" and name is None:
                return {"items": [p for p in pods if _labels_match(p["metadata"]["labels"], parsed.query)]}
            found = [p for p in pods if p["metadata"]["name"] == name]
            if not found:
                raise ApiError(f"{method} {path}: 404", 404)
            if method == "DELETE":
                pods.remove(found[0])
                return {"kind": "Pod", "metadata": found[0]["metadata"]}
            return found[0]
        if resource in ("deployments", "statefulsets") and method == "GET":
            return {"items": self.workloads[site][resource]}
        if resource in ("deployments", "statefulsets") and method == "PATCH":
            (workload,) = [w for w in self.workloads[site][resource] if w["metadata"]["name"] == name]
            annotations = workload["metadata"].setdefault("annotations", {})
            for key, value in body["metadata"]["annotations"].items():
                if value is None:
                    annotations.pop(key, None)
                else:
                    annotations[key] = value
            workload["spec"]["replicas"] = body["spec"]["replicas"]
            return workload
        if resource == "secrets" and method == "GET":
            return self.secrets[site][str(name)]
        if method == "POST":
            self.objects[site][f"{resource}/{body['metadata']['name']}"] = body
            return body
        if method == "DELETE":
            if f"{resource}/{name}" not in self.objects[site]:
                raise ApiError(f"DELETE {path}: 404", 404)
            return self.objects[site].pop(f"{resource}/{name}")
        raise AssertionError(f"not recorded: {method} {path}")

    def exec(
        self, site: str, namespace: str, pod: str, container: str, argv: Sequence[str], timeout_s: float
    ) -> tuple[int, str, str]:
        assert namespace == NAMESPACES[site]
        self.execs.append((site, pod, container, list(argv)))
        return self.exec_answers.pop(0)

    def deletes(self) -> list[tuple[str, str, Any]]:
        return [
            (site, path.rsplit("/", 1)[1], body)
            for site, method, path, body in self.calls
            if method == "DELETE"
        ]


@pytest.fixture(scope="module")
def declared() -> dict[str, list[dict[str, Any]]]:
    return deploy.rendered_objects(deploy.generate_secrets())


@pytest.fixture(scope="module")
def topology() -> Any:
    return infra_settings.load_topology(infra_settings.parse(harness.stack_config("local")))


@pytest.fixture
def api(declared: dict[str, list[dict[str, Any]]]) -> RecordedApi:
    return RecordedApi(declared)


@pytest.fixture
def cluster(
    api: RecordedApi, topology: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> KubernetesRuntime:
    """The runtime every chaos action and probe of target kubernetes gets, on the recording."""
    runtime = KubernetesRuntime(
        api, topology, NAMESPACES, ENTRY, CIDRS, tmp_path / "run", {s: f"ctx-{s}" for s in SITE_NAMES}
    )
    monkeypatch.setattr(
        targets,
        "runtime",
        lambda target, run_dir=None, configuration=None: (
            runtime if target == "kubernetes" else LocalRuntime()
        ),
    )
    return runtime


def patroni_answers(monkeypatch: pytest.MonkeyPatch, leaders: dict[int, str], syncs: dict[int, str]) -> None:
    """Each member's Patroni REST API (at its pod's address) as Patroni 3 answers /cluster."""
    topology = infra_settings.load_topology(infra_settings.parse(harness.stack_config("local")))
    cell_of_port = {topology.patroni_port(cell): cell for cell in topology.cell_numbers}

    def answer(url: str, timeout_s: float = 1.0, headers: Any = None) -> tuple[int, Any]:
        parts = urllib.parse.urlsplit(url)
        cell = cell_of_port[int(parts.port or 0)]
        if parts.path == "/cluster" and str(parts.hostname).startswith("10.3."):  # dr's standby cluster
            return 200, {
                "members": [
                    {"name": render.pg_name(cell, "dr"), "role": "standby_leader", "state": "streaming"}
                ]
            }
        if parts.path == "/cluster":
            return 200, {
                "members": [
                    {
                        "name": render.pg_name(cell, leaders[cell]),
                        "role": "leader",
                        "state": "running",
                        "timeline": 3,
                    },
                    {
                        "name": render.pg_name(cell, syncs[cell]),
                        "role": "sync_standby",
                        "state": "streaming",
                        "lag": 0,
                    },
                ]
            }
        return 200, {"role": "primary"}

    monkeypatch.setattr(kube_runtime, "http_json", answer)


# ---- faults: which pods ----------------------------------------------------------------------------


def test_losing_a_site_deletes_every_pod_of_the_sites_namespace_without_grace(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    result = actions.kill_site("prod", target="kubernetes")
    assert result["site"] == "prod"
    assert set(result["killed"]) == {
        "etcd-prod",
        "pg-cell1-prod",
        "pg-cell2-prod",
        "app-prod",
        "gateway-prod",
    }
    deleted = api.deletes()
    assert {site for site, _, _ in deleted} == {"prod"}
    assert all(body == {"gracePeriodSeconds": 0} for _, _, body in deleted)
    assert sorted(name for _, name, _ in deleted if name.endswith("-0")) == [
        "etcd-prod-0", "pg-cell1-prod-0", "pg-cell2-prod-0"
    ]  # fmt: skip
    # the load generator is not part of the site's topology: it keeps running
    assert any(p["metadata"]["name"].startswith("locust-") for p in api.pods["prod"])
    assert not any(p["metadata"]["labels"][LABEL_COMPONENT] == "app-prod" for p in api.pods["prod"])
    # held down as a lost machine stays lost: every workload scaled to 0, after its pods were
    # deleted (no graceful shutdown first), its replicas kept to give back
    patches = [i for i, call in enumerate(api.calls) if call[1] == "PATCH"]
    assert len(patches) == 5 and min(patches) > max(i for i, c in enumerate(api.calls) if c[1] == "DELETE")
    assert held_down(api, "prod") == {
        "etcd-prod": "1", "pg-cell1-prod": "1", "pg-cell2-prod": "1", "app-prod": "1", "gateway-prod": "1",
    }  # fmt: skip
    assert held_down(api, "samecity") == {}


def held_down(api: RecordedApi, site: str) -> dict[str, str]:
    """workload -> the replicas a kill holds it down from, for those at 0 replicas and held."""
    found = {}
    for kind in ("deployments", "statefulsets"):
        for workload in api.workloads[site][kind]:
            held = workload["metadata"].get("annotations", {}).get(ANNOTATION_HELD_DOWN)
            if held is not None:
                assert workload["spec"]["replicas"] == 0, workload["metadata"]["name"]
                found[workload["metadata"]["name"]] = held
    return found


def test_losing_a_cell_deletes_its_members_in_both_centers_and_spares_dr(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    result = actions.kill_cell(1, target="kubernetes")
    assert result["killed"] == ["pg-cell1-prod", "pg-cell1-samecity"]
    assert [(site, name) for site, name, _ in api.deletes()] == [
        ("prod", "pg-cell1-prod-0"),
        ("samecity", "pg-cell1-samecity-0"),
    ]
    api.calls.clear()
    actions.kill_cell(2, include_dr=True, target="kubernetes")
    assert [site for site, _, _ in api.deletes()] == ["prod", "samecity", "dr"]


def test_one_component_is_its_own_pods_only(cluster: KubernetesRuntime, api: RecordedApi) -> None:
    actions.kill_component("gateway-samecity", target="kubernetes")
    actions.kill_etcd_member("dr", target="kubernetes")
    assert [(site, name.split("-6d9f7c")[0]) for site, name, _ in api.deletes()] == [
        ("samecity", "gateway-samecity"),
        ("dr", "etcd-dr-0"),
    ]


def test_the_cells_primary_is_the_pod_patroni_says_leads(
    cluster: KubernetesRuntime, api: RecordedApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    patroni_answers(monkeypatch, {1: "samecity", 2: "prod"}, {1: "prod", 2: "samecity"})
    result = actions.kill_cell_primary(1, target="kubernetes")
    assert result == {
        "cell": 1,
        "site": "samecity",
        "member": "pg-cell1-samecity",
        "killed": ["pg-cell1-samecity"],
    }
    assert [(site, name) for site, name, _ in api.deletes()] == [("samecity", "pg-cell1-samecity-0")]


# a member's container as `ps` would list it: the guard (PID 1), its keeper, Patroni, the
# postmaster Patroni started and PostgreSQL's own processes; and the listing itself
MEMBER_PROCESSES = [
    [1, 0, f"python3 {MEMBER_GUARD} --watchdog /tmp/watertight-watchdog --pid-file /var/lib/postgresql/data/pgdata/postmaster.pid -- python3 -m patroni /etc/patroni/patroni.yml"],
    [7, 1, f"python3 {MEMBER_GUARD} --keeper --watchdog /tmp/watertight-watchdog"],
    [8, 1, "python3 -m patroni /etc/patroni/patroni.yml"],
    [41, 8, "/usr/lib/postgresql/15/bin/postgres -D /var/lib/postgresql/data/pgdata --config-file=/var/lib/postgresql/data/pgdata/postgresql.conf"],
    [42, 41, "postgres: watertight-cell1: checkpointer "],
    [43, 41, "postgres: watertight-cell1: walsender replicator 10.2.0.12(40112) streaming 0/3000148"],
    [90, 0, f"python3 -c # {kube_runtime.PROCESS_MARKER}"],
]  # fmt: skip


def test_a_members_processes_are_named_by_role_as_locally() -> None:
    roles = kube_runtime.roles_of(MEMBER_PROCESSES)
    assert roles == {
        1: "guard",
        7: "keeper",
        8: "patroni",
        41: "postgres",
        42: "postgres-child",
        43: "postgres-child",
    }


def test_a_real_members_container_is_read_as_guard_keeper_patroni_and_postgres() -> None:
    # listed by KubernetesRuntime in pg-cell1-samecity-0 of the local cluster (issue 18's session):
    # Patroni starts PostgreSQL detached, so the postmaster's parent is the guard, PID 1
    listed = json.loads((REPO / "tests" / "data" / "kubernetes-member-processes.json").read_text())
    roles = kube_runtime.roles_of(listed)
    assert roles[1] == "guard" and roles[7] == "keeper" and roles[8] == "patroni" and roles[34] == "postgres"
    assert sorted(pid for pid, role in roles.items() if role == "postgres-child") == [
        35,
        36,
        44,
        48,
        67,
        68,
        69,
        76,
    ]
    assert len(roles) == len(listed) - 1  # the listing itself is left out


@pytest.mark.parametrize(("role", "pids"), [("patroni", [8]), ("postgres", [41])])
def test_killing_the_leaders_patroni_or_postmaster_signals_only_that_process_in_its_pod(
    role: str, pids: list[int], cluster: KubernetesRuntime, api: RecordedApi, monkeypatch: pytest.MonkeyPatch
) -> None:
    patroni_answers(monkeypatch, {1: "prod", 2: "samecity"}, {1: "samecity", 2: "prod"})
    api.exec_answers = [(0, json.dumps(MEMBER_PROCESSES), ""), (0, "", "")]
    call = actions.kill_leader_patroni if role == "patroni" else actions.kill_leader_postgres
    result = call(2, target="kubernetes")
    assert result == {"cell": 2, "site": "samecity", "member": "pg-cell2-samecity", role: pids}
    (site, pod, container, listing), (_, _, _, killing) = api.execs
    assert (site, pod, container) == ("samecity", "pg-cell2-samecity-0", "patroni")
    assert listing[:2] == ["python", "-c"] and "os.kill(pid, signal.SIGKILL)" in killing[2]
    assert f"for pid in {pids!r}" in killing[2]
    assert api.deletes() == []  # the pod stays: only one process died


def test_a_role_the_member_does_not_run_is_named_with_those_it_runs(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    api.exec_answers = [(0, json.dumps(MEMBER_PROCESSES[:3]), "")]
    with pytest.raises(
        KubernetesRuntimeError, match="no postgres process; its processes are guard, keeper, patroni"
    ):
        cluster.kill_process("pg-cell1-prod", "postgres")


def test_healing_a_site_waits_for_its_pods_to_be_recreated_and_the_steady_state(
    cluster: KubernetesRuntime,
    api: RecordedApi,
    declared: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    actions.kill_site("prod", target="kubernetes")
    assert cluster.start(site="prod") == [
        "etcd-prod",
        "pg-cell1-prod",
        "pg-cell2-prod",
        "app-prod",
        "gateway-prod",
    ]
    api.pods["prod"] = RecordedApi(declared).pods["prod"]  # the controllers recreated them
    monkeypatch.setattr(kube_runtime, "http_json", lambda url, timeout_s=1.0, headers=None: (200, {}))
    monkeypatch.setattr(
        KubernetesRuntime, "cell_view", lambda self, cell: {"leader_site": "samecity", "sync_standby": "prod"}
    )
    result = actions.restart_site("prod", wait_s=5, target="kubernetes")
    assert result["started"] == [] and result["steady_after_s"] >= 0
    # the replicas the kill held down are given back, and the mark removed
    assert held_down(api, "prod") == {}
    assert {
        w["metadata"]["name"]: w["spec"]["replicas"]
        for kind in ("deployments", "statefulsets")
        for w in api.workloads["prod"][kind]
        if not w["metadata"]["name"].startswith("locust")
    } == {"etcd-prod": 1, "pg-cell1-prod": 1, "pg-cell2-prod": 1, "app-prod": 1, "gateway-prod": 1}
    assert api.deletes() and all(body == {"gracePeriodSeconds": 0} for _, _, body in api.deletes())


def test_dr_s_idle_app_server_and_gateway_are_not_expected_to_run(cluster: KubernetesRuntime) -> None:
    assert cluster.start(site="dr") == []
    assert cluster.dr_active is False and cluster.primary_sites() == ["prod", "samecity"]


# ---- network faults --------------------------------------------------------------------------------


def test_a_partition_is_a_network_policy_in_the_sites_namespace_cutting_the_other_sites(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    result = actions.partition_site("prod", target="kubernetes")
    assert result == {"site": "prod", "policy": "watertight-partition", "namespace": "watertight-prod"}
    ((site, method, path, policy),) = api.calls
    assert (site, method) == ("prod", "POST") and path.endswith("/namespaces/watertight-prod/networkpolicies")
    spec = policy["spec"]
    assert spec["ingress"][0]["from"][0]["ipBlock"]["except"] == ["10.2.0.0/16", "10.3.0.0/16"]
    assert spec["egress"][0]["to"][0]["ipBlock"]["except"] == ["10.2.0.0/16", "10.3.0.0/16"]
    assert spec["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "watertight"}}
    healed = actions.heal_partition(wait_s=0, target="kubernetes")
    assert healed == {"healed": ["prod"]}  # not found elsewhere: nothing to heal there


def test_a_partition_where_the_cni_enforces_no_network_policy_is_refused_and_nothing_is_made(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    """On the local cluster (the bridge plugin) a NetworkPolicy cuts nothing: a partition drill
    would pass on no fault. The target says so instead, and the drill reports the fault as not
    injected."""
    cluster.network_policy_enforced = False
    with pytest.raises(TargetUnsupported, match="enforces NetworkPolicy") as refused:
        cluster.partition("prod")
    assert "kill_site" in str(refused.value)
    assert [c for c in api.calls if c[1] != "GET"] == []


def test_latency_is_a_chaos_mesh_delay_toward_the_other_chosen_sites(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    actions.add_latency(20, ["prod", "samecity"], target="kubernetes")
    posted = [
        (site, body["spec"]["externalTargets"], body["spec"]["delay"])
        for site, m, _, body in api.calls
        if m == "POST"
    ]
    assert posted == [
        ("prod", ["10.2.0.0/16"], {"latency": "20ms"}),
        ("samecity", ["10.1.0.0/16"], {"latency": "20ms"}),
    ]
    assert actions.remove_latency(target="kubernetes") == {"removed": ["prod", "samecity"]}


def test_latency_without_chaos_mesh_says_what_it_needs(cluster: KubernetesRuntime, api: RecordedApi) -> None:
    def no_chaos_mesh(site: str, method: str, path: str, body: Any = None) -> Any:
        raise ApiError(f"{method} {path}: 404 the server could not find the requested resource", 404)

    api.request = no_chaos_mesh  # type: ignore[method-assign]
    with pytest.raises(
        TargetUnsupported, match="add_latency is not available on target kubernetes: it needs Chaos Mesh"
    ):
        actions.add_latency(20, target="kubernetes")


# ---- what the target cannot do ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "operation"),
    [
        (lambda: actions.freeze_site("prod", target="kubernetes"), "freeze"),
        (lambda: actions.kill_listed_pids("prod", target="kubernetes"), "kill_listed_pids"),
    ],
)
def test_what_the_kubernetes_target_cannot_do_is_one_error_naming_it_and_what_to_do(
    call: Any, operation: str, cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    with pytest.raises(
        TargetUnsupported, match=f"^{operation} is not available on target kubernetes: it needs"
    ) as raised:
        call()
    assert (
        raised.value.operation == operation and raised.value.target == "kubernetes" and raised.value.instead
    )
    assert api.calls == []  # nothing was touched


def test_thawing_on_kubernetes_thaws_nothing_since_nothing_can_be_frozen(
    cluster: KubernetesRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert actions.thaw_site("prod", wait_s=0, target="kubernetes") == {"site": "prod", "thawed": []}


def test_a_failed_action_of_the_drill_says_what_the_target_cannot_do() -> None:
    error = TargetUnsupported("freeze", "kubernetes", "a pod pause", "use kill instead")
    journal = {
        "run": [
            {
                "activity": {"type": "action", "name": "freeze-the-prod-site"},
                "status": "failed",
                "exception": ["Traceback ...\n", f"watertight.runtime.target.TargetUnsupported: {error}\n"],
            }
        ]
    }
    (failed,) = drill.failed_actions(journal)
    assert failed.startswith("freeze-the-prod-site: ")
    assert "freeze is not available on target kubernetes: it needs a pod pause; use kill instead" in failed


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda: actions.kill_site("moon", target="kubernetes"), "no site named 'moon'"),
        (lambda: actions.kill_component("entry", target="kubernetes"), "global load balancer"),
        (lambda: actions.kill_component("pg-cellx", target="kubernetes"), "no component named"),
        (lambda: actions.kill_cell(9, target="kubernetes"), "no cell 9; cells are 1..2"),
        (lambda: actions.partition_site("mars", target="kubernetes"), "no site named 'mars'"),
    ],
)
def test_a_name_that_does_not_exist_is_named_and_nothing_is_touched(
    call: Any, says: str, cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    with pytest.raises(KubernetesRuntimeError, match=says):
        call()
    assert [c for c in api.calls if c[1] != "GET"] == []


# ---- probes and what the drill reads --------------------------------------------------------------


def test_the_members_are_reached_at_their_pods_addresses_and_the_topologys_ports(
    cluster: KubernetesRuntime, api: RecordedApi, topology: Any
) -> None:
    members = {m.name: m for m in cluster.members(1)}
    assert sorted(members) == ["pg-cell1-dr", "pg-cell1-prod", "pg-cell1-samecity"]
    pod = next(p for p in api.pods["samecity"] if p["metadata"]["name"] == "pg-cell1-samecity-0")
    member = members["pg-cell1-samecity"]
    assert member.postgres_host == pod["status"]["podIP"] and member.postgres_port == topology.postgres_port(
        1
    )
    assert member.patroni_url == f"http://{pod['status']['podIP']}:{topology.patroni_port(1)}"
    actions.kill_component("pg-cell1-samecity", target="kubernetes")
    gone = {m.name: m for m in cluster.members(1)}["pg-cell1-samecity"]
    assert gone.postgres_host == "" and gone.patroni_url == ""  # nothing to connect to


def test_the_probes_read_each_cells_leader_and_sync_standby_from_patroni_in_the_pods(
    cluster: KubernetesRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    patroni_answers(monkeypatch, {1: "prod", 2: "samecity"}, {1: "samecity", 2: "prod"})
    assert probes.cell_leader_site(1, target="kubernetes") == "prod"
    assert probes.cell_sync_standby_site(2, target="kubernetes") == "prod"
    assert probes.every_cell_has_leader_and_sync_standby(target="kubernetes") is True
    view = cluster.cell_view(1)
    assert view["dr_copy"] == {"role": "standby_leader", "state": "streaming", "lag": None, "timeline": None}


def test_the_clients_tokens_and_the_superusers_password_come_from_the_programs_secrets(
    cluster: KubernetesRuntime, api: RecordedApi
) -> None:
    clients = json.loads(
        base64.b64decode(api.secrets["prod"]["watertight-api-clients"]["data"]["secrets.json"])
    )
    assert cluster.api_tokens() == clients["api_tokens"] and set(cluster.api_tokens()) >= {
        "operator",
        "acquirer",
    }
    path = cluster.api_tokens_file()
    assert json.loads(path.read_text()) == {"api_tokens": clients["api_tokens"]}
    assert path.stat().st_mode & 0o077 == 0  # private
    password = base64.b64decode(
        api.secrets["prod"]["watertight-credentials"]["data"]["superuser_password"]
    ).decode()
    assert cluster.superuser_password() == password


def test_the_status_lists_each_components_pods(
    cluster: KubernetesRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    patroni_answers(monkeypatch, {1: "prod", 2: "samecity"}, {1: "samecity", 2: "prod"})
    status = cluster.status()
    assert status["target"] == "kubernetes" and status["entry"] == ENTRY
    by_name = {c["name"]: c for c in status["components"]}
    assert (
        by_name["pg-cell1-prod"]["role"] == "leader"
        and by_name["pg-cell1-prod"]["pods"][0]["name"] == "pg-cell1-prod-0"
    )
    assert by_name["app-dr"]["expected"] is False and by_name["app-dr"]["pods"] == []
    assert status["sites"]["dr"]["up"] is True and status["sites"]["prod"]["namespace"] == "watertight-prod"
    assert cluster.instances(component="etcd-samecity") == ["samecity/etcd-samecity-0"]


def test_the_runbooks_get_the_clusters_contexts_and_each_sites_namespace(
    cluster: KubernetesRuntime, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(kube.KubeTarget, "runbook_vars", kube.KubeTarget.extravars)
    found = cluster.runbook_vars()
    assert found["watertight_target"] == "kubernetes"
    assert found["kube_contexts"] == {s: f"ctx-{s}" for s in SITE_NAMES}
    assert found["kube_namespaces"] == NAMESPACES


# ---- construction ---------------------------------------------------------------------------------


def write_kubeconfig(path: Path, contexts: dict[str, str]) -> Path:
    path.write_text(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": "https://10.244.0.1:6443"}}],
                "users": [{"name": "admin", "user": {"token": "t0ken"}}],
                "contexts": [
                    {"name": n, "context": {"cluster": "c", "user": "admin", "namespace": ns}}
                    for n, ns in contexts.items()
                ],
            }
        )
    )
    return path


def test_the_clusters_come_from_the_experiments_configuration_and_the_kubeconfig(tmp_path: Path) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"a": "ns-a", "b": "ns-b", "c": "ns-c"})
    configuration = {
        "kube_contexts": {"prod": "a", "samecity": "b", "dr": "c"},
        "kube_namespace": "cards",
        "kube_namespaces": {"dr": "cards-dr"},
        "site_cidrs": {"prod": "10.1.0.0/16", "samecity": ["10.2.0.0/16"], "dr": ["10.3.0.0/16"]},
        "entry_url": "http://entry.example:8080",
        "kubeconfig": str(kubeconfig),
        "topology": str(REPO / "topology.yaml"),
    }
    runtime = targets.runtime("kubernetes", str(tmp_path / "run"), configuration)
    assert isinstance(runtime, KubernetesRuntime)
    assert runtime.namespaces == {"prod": "cards", "samecity": "cards", "dr": "cards-dr"}
    assert runtime.site_cidrs["prod"] == ["10.1.0.0/16"] and runtime.entry_url == "http://entry.example:8080"
    assert isinstance(runtime.api, kube_runtime.RestApi) and runtime.api.configs["dr"].token == "t0ken"


@pytest.mark.parametrize(
    ("configuration", "error", "says"),
    [
        ({"kube_contexts": {"prod": "a", "samecity": "b"}}, kube.KubeTargetError, "missing dr"),
        ({"kube_contexts": {"prod": "a", "samecity": "b", "dr": "c"}}, KubernetesRuntimeError, "entry_url"),
        (
            {"kube_contexts": {"prod": "a", "samecity": "b", "dr": "zz"}, "entry_url": "http://e:1"},
            KubernetesRuntimeError,
            "has no context zz; it has a, b, c",
        ),
    ],
)
def test_what_is_missing_to_find_the_clusters_is_named(
    configuration: dict[str, Any], error: type[Exception], says: str, tmp_path: Path
) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", {"a": "x", "b": "y", "c": "z"})
    with pytest.raises(error, match=says):
        targets.runtime("kubernetes", str(tmp_path), {**configuration, "kubeconfig": str(kubeconfig)})


def test_without_a_cluster_the_kubernetes_target_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WATERTIGHT_CLUSTER_DIR", str(tmp_path / "no-cluster"))
    with pytest.raises(KubernetesRuntimeError, match="watertight cluster up"):
        actions.kill_site("prod", target="kubernetes")


def test_an_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="local, kubernetes"):
        actions.kill_site("prod", target="docker")


# ---- one interface ---------------------------------------------------------------------------------


def _members_of(protocol: type) -> set[str]:
    return {name for name in vars(protocol) if not name.startswith("_")} | set(protocol.__annotations__)


def test_both_runtimes_offer_every_operation_of_the_target_interface() -> None:
    wanted = _members_of(Target)
    assert {"kill", "freeze", "kill_process", "members", "leader_site", "partition", "switchover"} <= wanted
    for runtime in (LocalRuntime, KubernetesRuntime):
        missing = sorted(
            name for name in wanted if not hasattr(runtime, name) and name not in ("topology", "run_dir")
        )
        assert missing == [], f"{runtime.__name__} lacks {missing}"


@pytest.mark.parametrize(
    "module", ["watertight/chaos/actions.py", "watertight/chaos/probes.py", "watertight/bench.py"]
)
def test_the_actions_probes_and_bench_reach_a_topology_only_through_the_target_interface(module: str) -> None:
    tree = ast.parse((REPO / module).read_text())
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    names = {
        alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names
    }
    assert not modules & {
        "watertight.runtime.kubernetes",
        "watertight.chaos.network",
        "watertight.cluster.api",
    }
    assert not names & {"LocalRuntime", "KubernetesRuntime", "network", "kubernetes"}
    code = ast.unparse(tree).split('"""', 2)[-1]  # after the module's docstring
    assert "KUBERNETES" not in code and "'kubernetes'" not in code
