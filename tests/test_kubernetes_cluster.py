"""A real Kubernetes cluster on this machine, with the Pulumi program's objects on it.

`watertight cluster up` builds (or reuses) the Kubernetes binaries and the images, starts etcd, the
control plane, containerd, the agent, the kubelet and kube-proxy, and applies every object the
program declares for the local stack; then the test looks at the cluster through its own eyes
(every object accepted, every pod Ready, each cell's Patroni cluster formed across the site
namespaces with its sync standby in the other center, the dr copies streaming) and drives the
CONTRACT API through the entry: a customer opened, a purchase authorized, the balance read.
`watertight cluster down` must leave the machine as the test found it.

Then the drill and a runbook on it: site-loss-prod through the Kubernetes API with Locust's
load through the entry, judged by the local verdicts; switchover-site's kubernetes tasks.

The slowest module of the suite (about 11 minutes with the binaries and images cached; the first
run on a machine builds Kubernetes, about 12-15 minutes more, which `make test` overlaps with the
rest of the suite).
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from cardcore.platform import auth

from tests import api_auth, cards, topologies
from watertight import render
from watertight.cluster import api as cluster_api
from watertight.cluster import hoststate, node, spec
from watertight.topology import CENTERS, SITE_NAMES, Topology

UP_TIMEOUT_S = 2400  # a fresh machine builds Kubernetes (12-15 min on 2 cores) and the images first
DOWN_TIMEOUT_S = 300
DRILL_TIMEOUT_S = 900
RUNBOOK_TIMEOUT_S = 600
WATERTIGHT = [sys.executable, "-m", "watertight.cli"]
E2E_ENV = "WATERTIGHT_KUBERNETES_E2E"
# the module's cluster is started in the first test's setup and stopped in the last's teardown;
# `make test` runs it after the rest of the suite (scripts/run-tests, which has a fresh machine
# build Kubernetes in the background meanwhile); WATERTIGHT_KUBERNETES_E2E=0 skips it
pytestmark = [
    pytest.mark.timeout(UP_TIMEOUT_S + DOWN_TIMEOUT_S + DRILL_TIMEOUT_S + 600),
    pytest.mark.skipif(
        os.environ.get(E2E_ENV) == "0",
        reason=f"{E2E_ENV}=0: the real cluster is left out",
    ),
]


def _cluster_command(
    action: str, directory: Path, log: Path, timeout_s: float, *extra: str
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, node.DIR_ENV: str(directory)}
    with open(log, "a") as progress:
        return subprocess.run(
            [*WATERTIGHT, "cluster", action, *extra], env=env, stdout=subprocess.PIPE, stderr=progress,
            text=True, timeout=timeout_s, check=False,
        )  # fmt: skip


def cluster_directory() -> Path:
    """The test cluster's directory: not under pytest's temporary directories, which every pytest
    run on this machine (other checkouts' too) prunes to the last three while this one may run."""
    return node.DIR_DEFAULT.parent / f"test-cluster-{topologies.test_net()}"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    directory = cluster_directory()
    log = tmp_path_factory.mktemp("cluster") / "progress.log"
    layout = node.Layout(directory.resolve())
    before = hoststate.record(layout.mount_prefixes(), spec.BRIDGE)
    try:  # `up` inside: an interrupted or failed up leaves what it started to the down below
        up = _cluster_command("up", directory, log, UP_TIMEOUT_S, "--json")
        assert up.returncode == 0, f"watertight cluster up failed:\n{log.read_text()[-4000:]}"
        status = json.loads(up.stdout)
        status["_directory"] = directory
        yield status
    finally:
        down = _cluster_command("down", directory, log, DOWN_TIMEOUT_S, "--purge")
        after = hoststate.record(layout.mount_prefixes(), spec.BRIDGE)
        assert down.returncode == 0, f"watertight cluster down failed:\n{log.read_text()[-3000:]}"
        assert hoststate.differences(before, after) == []


@pytest.fixture(scope="module")
def client(cluster: dict[str, Any]) -> cluster_api.Cluster:
    return cluster_api.Cluster.from_directory(cluster["_directory"])


def test_status_names_the_kubeconfig_a_context_per_site_the_entry_and_the_tokens(
    cluster: dict[str, Any],
) -> None:
    local = spec.load()
    assert cluster["up"] is True
    assert cluster["contexts"] == local.contexts and sorted(cluster["contexts"]) == sorted(SITE_NAMES)
    assert cluster["entry"] == local.entry_url
    kubeconfig = Path(cluster["kubeconfig"])
    assert stat.S_IMODE(kubeconfig.stat().st_mode) == 0o600
    contexts = yaml.safe_load(kubeconfig.read_text())["contexts"]
    assert {c["name"]: c["context"]["namespace"] for c in contexts} == {
        local.contexts[site]: local.namespaces[site] for site in SITE_NAMES
    }
    secrets = Path(cluster["secrets"])
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    tokens = json.loads(secrets.read_text())["api_tokens"]
    assert sorted(tokens) == ["acquirer", "channel", "operator"] and all(
        len(t) >= 32 for t in tokens.values()
    )
    for site in SITE_NAMES:
        assert cluster["pods"][site]["ready"] == cluster["pods"][site]["total"] > 0, cluster["pods"][site]


def resource(obj: dict[str, Any]) -> str:
    """kubectl's fully qualified resource of an object's kind at its API version (e.g.
    horizontalpodautoscalers.v2beta2.autoscaling), so the cluster answers in that version."""
    kind = obj["kind"].lower()
    plural = kind[:-1] + "ies" if kind.endswith("y") else kind + "s"
    group, _, version = obj["apiVersion"].rpartition("/")
    return f"{plural}.{version}.{group}" if group else plural


def test_every_object_the_program_declares_is_in_the_cluster(
    cluster: dict[str, Any], client: cluster_api.Cluster
) -> None:
    from watertight.cluster import deploy

    values = deploy.read_secrets(Path(cluster["secrets"]))
    declared = deploy.rendered_objects(values)
    assert sorted(declared) == sorted(client.contexts.values())
    checked = 0
    for context, objects in declared.items():
        site = next(s for s, c in client.contexts.items() if c == context)
        namespace = client.namespaces[site]
        wanted = {(resource(o), o["metadata"]["name"]) for o in objects if o["kind"] != "Namespace"}
        listing = json.loads(
            client.kubectl(
                site, "get", ",".join(sorted({r for r, _ in wanted})), "-n", namespace, "-o", "json"
            )
        )
        found = {(resource(o), o["metadata"]["name"]): o for o in listing["items"]}
        assert wanted <= set(found), sorted(wanted - set(found))
        for obj in objects:
            if obj["kind"] == "Namespace":
                assert json.loads(client.kubectl(site, "get", "namespace", namespace, "-o", "json"))
                continue
            there = found[(resource(obj), obj["metadata"]["name"])]
            assert there["apiVersion"] == obj["apiVersion"]
            if obj["kind"] == "Secret":
                # the credentials carry the clients' tokens, as the program carries its other secrets
                assert set(obj["stringData"]) <= set(there["data"]), obj["metadata"]["name"]
            checked += 1
    assert checked >= 90


def local_topology() -> Topology:
    from watertight_infra import harness
    from watertight_infra import settings as infra_settings

    return infra_settings.load_topology(infra_settings.parse(harness.stack_config(spec.STACK)))


def _patroni_cluster(client: cluster_api.Cluster, cell: int, site: str) -> dict[str, Any]:
    """Patroni's view of a cell's cluster, asked of its member in ``site`` at the pod's address
    (the node reaches every pod on the bridge)."""
    ((_, pod),) = client.pods_of(site=site, cell=cell, kind="patroni")
    url = f"http://{pod['status']['podIP']}:{local_topology().patroni_port(cell)}/cluster"
    return dict(httpx.get(url, timeout=5).json())


def test_each_cell_leads_from_its_center_with_the_sync_standby_in_the_other_and_dr_streams(
    cluster: dict[str, Any], client: cluster_api.Cluster
) -> None:
    topology = local_topology()
    for cell in topology.cell_numbers:
        leader_site, standby_site = topology.leader_site(cell), topology.standby_site(cell)
        deadline = time.monotonic() + 120
        while True:
            members = {m["name"]: m for m in _patroni_cluster(client, cell, leader_site)["members"]}
            roles = {name: m["role"] for name, m in members.items()}
            wanted = {
                render.pg_name(cell, leader_site): "leader",
                render.pg_name(cell, standby_site): "sync_standby",
            }
            if roles == wanted and all(m.get("state") in ("running", "streaming") for m in members.values()):
                break
            assert time.monotonic() < deadline, f"cell {cell}: {members}"
            time.sleep(2)
        dr = _patroni_cluster(client, cell, render.DR_SITE)
        (dr_member,) = dr["members"]
        assert dr_member["name"] == render.pg_name(cell, render.DR_SITE)
        assert dr_member["role"] == "standby_leader", dr
        assert dr_member["state"] in ("streaming", "running"), dr


def test_the_entry_opens_a_customer_authorizes_and_reads_the_balance(cluster: dict[str, Any]) -> None:
    tokens = auth.ClientTokens.from_secrets(json.loads(Path(cluster["secrets"]).read_text()))
    with httpx.Client(base_url=cluster["entry"], timeout=30, auth=api_auth.RouteTokenAuth(tokens)) as entry:
        assert entry.get("/readyz").status_code == 200
        # the entry checks the tokens the cluster generated, as the gateways in the pods do
        refused = httpx.post(
            f"{cluster['entry']}/v1/applications", json={}, auth=api_auth.ANONYMOUS, timeout=30
        )
        assert refused.status_code == 401, refused.text
        opened = cards.open_account(entry)
        answer = cards.authorize(entry, opened, 12_345)
        assert answer.status_code == 200, answer.text
        assert answer.json()["approved"] is True, answer.json()
        balance = entry.get(f"/v1/accounts/{opened['account_id']}/balance")
        assert balance.status_code == 200, balance.text
        assert balance.json()["held"] == 12_345
        # the customer's cell is led from a center whose gateway the entry reached
        routing = entry.get(f"/v1/routing/customers/{opened['customer_id']}").json()
        assert routing["leader_site"] in CENTERS


def _watertight(
    cluster: dict[str, Any], tmp_path: Path, timeout_s: float, *args: str
) -> subprocess.CompletedProcess[str]:
    """A watertight command against the test's cluster (its directory), with a run directory of
    the test's own."""
    env = {**os.environ, node.DIR_ENV: str(cluster["_directory"])}
    return subprocess.run(
        [*WATERTIGHT, *args, "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
        timeout=timeout_s, check=False,
    )  # fmt: skip


def _runtime(cluster: dict[str, Any], tmp_path: Path) -> Any:
    from watertight.runtime.kubernetes import KubernetesRuntime

    return KubernetesRuntime.local_cluster(tmp_path / "run", root=cluster["_directory"])


def test_losing_prod_is_drilled_on_the_cluster_within_the_rto_and_nothing_acknowledged_is_lost(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    """site-loss-prod through the Kubernetes API (every prod pod deleted without grace and held
    down for the experiment), Locust offering the drill's rates through the entry, judged by the
    same verdicts as locally, from what the clients saw."""
    topology = local_topology()
    reports = tmp_path / "reports"
    done = _watertight(
        cluster, tmp_path, DRILL_TIMEOUT_S, "drill", "--target", "kubernetes", "site-loss-prod", "--report-dir", str(reports)
    )  # fmt: skip
    report_file = reports / "site-loss-prod" / "report.json"
    assert report_file.exists(), f"no report ({done.returncode}):\n{done.stderr[-4000:]}"
    report = json.loads(report_file.read_text())
    assert done.returncode == 0 and report["passed"] is True, (report["reasons"], done.stderr[-3000:])
    prod_cells = [cell for cell in topology.cell_numbers if topology.leader_site(cell) == "prod"]
    assert prod_cells and sorted(report["affected_cells"]) == [f"cell-{c}" for c in prod_cells]
    for cell in prod_cells:
        assert report["rto_seconds"][f"cell-{cell}"] <= 60, report["rto_seconds"]
    assert report["rpo"]["missing"] == 0 and report["rpo"]["acknowledged"] >= 500, report["rpo"]
    assert report["stale_reads"] == 0 and report["indeterminate"]["partial"] == 0
    assert all(n <= 1 for n in report["writable_primaries_max"].values()), report["writable_primaries_max"]
    assert all(report["invariants"].values()), report["invariants"]
    # the fault was a loss, not a restart: every prod component deleted, and still down when the
    # experiment looked before its rollback
    journal = json.loads((reports / "site-loss-prod" / "journal.json").read_text())
    outputs = {a["activity"]["name"]: a.get("output") for a in journal["run"] + journal["rollbacks"]}
    assert set(outputs["kill-the-prod-site"]["killed"]) == {
        c.name for c in _runtime(cluster, tmp_path).select(site="prod")
    }
    assert outputs["what-is-not-steady"], "nothing was down before the rollback"
    assert sorted(outputs["restart-the-prod-site"]["started"]) == sorted(
        outputs["kill-the-prod-site"]["killed"]
    )
    # and the drill put every cell back where the topology leads it from
    runtime = _runtime(cluster, tmp_path)
    assert {c: runtime.cell_view(c)["leader_site"] for c in topology.cell_numbers} == {
        c: topology.leader_site(c) for c in topology.cell_numbers
    }


def test_switchover_site_runs_its_kubernetes_tasks_on_the_cluster(
    cluster: dict[str, Any], tmp_path: Path
) -> None:
    topology = local_topology()
    done = _watertight(
        cluster, tmp_path, RUNBOOK_TIMEOUT_S, "runbook", "switchover-site", "--target", "kubernetes",
        "--extra", "site=prod", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-4000:]
    summary = json.loads(done.stdout)
    assert summary["target"] == "kubernetes" and summary["rc"] == 0
    moved = [
        s for s in summary["steps"] if s["task"].startswith("Switch each cell led by prod") and s["changed"]
    ]
    assert moved, summary["steps"]
    runtime = _runtime(cluster, tmp_path)
    try:
        for cell in topology.cell_numbers:
            view = runtime.cell_view(cell)
            assert (view["leader_site"], view["sync_standby"]) == ("samecity", "prod"), (cell, view)
        # idempotent: a second run finds nothing prod leads and changes nothing
        again = _watertight(
            cluster, tmp_path, RUNBOOK_TIMEOUT_S, "runbook", "switchover-site", "--target", "kubernetes",
            "--extra", "site=prod", "--json",
        )  # fmt: skip
        assert again.returncode == 0 and json.loads(again.stdout)["changed"] == 0, again.stderr[-2000:]
    finally:
        for cell in topology.cell_numbers:
            if runtime.cell_view(cell)["leader_site"] != topology.leader_site(cell):
                runtime.switchover(cell, topology.leader_site(cell))
