"""The kubernetes target of the runbooks, without a cluster (none can run here): every
kubernetes.core task names only options its module has, every name the tasks address (pods,
containers, the Patroni config, the drain ConfigMap and its mount, the idle dr Deployments'
active size, labels) is one the Pulumi program creates, and a target lacking a context or the
collection is refused, naming what is missing, before anything runs."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.ansible_tasks import ansible_condition, ansible_template, kubernetes_task, top_level_tasks
from watertight import render
from watertight import topology as topology_module
from watertight.runbooks import kube, ops, runner
from watertight_infra import harness, settings

REPO = Path(__file__).resolve().parents[1]
TASK_FILES = sorted((REPO / "runbooks" / "kubernetes").glob("*.yml"))
CONTEXTS = "prod=ctx-prod,samecity=ctx-samecity,dr=ctx-dr"


def collection_root() -> Path:
    found = kube.collection_path()
    assert found is not None, (
        "kubernetes.core is not installed: make venv runs python -m watertight.runbooks.kube"
    )
    return found / "ansible_collections" / "kubernetes" / "core"


def module_options(module: str) -> set[str]:
    """The options a kubernetes.core module documents (and their aliases), its documentation
    fragments included."""
    root = collection_root()
    doc = yaml.safe_load(_doc_string(root / "plugins" / "modules" / f"{module}.py", "DOCUMENTATION"))
    documented = dict(doc.get("options") or {})
    for fragment in doc.get("extends_documentation_fragment") or []:
        path = root / "plugins" / "doc_fragments" / f"{fragment.removeprefix('kubernetes.core.')}.py"
        documented |= yaml.safe_load(_doc_string(path, "DOCUMENTATION"))["options"]
    return set(documented) | {alias for spec in documented.values() for alias in spec.get("aliases") or []}


def _doc_string(path: Path, name: str) -> str:
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            return str(ast.literal_eval(node.value))
    raise AssertionError(f"{path} has no {name}")


def flat(tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tasks, those inside blocks included (a block's ``when`` joins its tasks')."""
    found = []
    for task in tasks:
        if "block" in task:
            outer = task.get("when")
            for inner in flat(task["block"]):
                conditions = [c for c in (outer, inner.get("when")) if c is not None]
                joined = [x for c in conditions for x in (c if isinstance(c, list) else [c])]
                found.append({**inner, "when": joined} if joined else inner)
        else:
            found.append(task)
    return found


def kubernetes_tasks() -> list[tuple[str, dict[str, Any], str, dict[str, Any]]]:
    """(file, task, module, arguments) of every kubernetes.core task of runbooks/kubernetes/."""
    found = []
    for path in TASK_FILES:
        for task in flat(yaml.safe_load(path.read_text())):
            for key, value in task.items():
                if key.startswith("kubernetes.core."):
                    found.append((path.name, task, key.removeprefix("kubernetes.core."), value))
    return found


def test_there_is_a_kubernetes_task_file_for_every_runbook() -> None:
    assert sorted(p.stem for p in TASK_FILES) == runner.names()
    for name in runner.names():
        playbook = (REPO / "runbooks" / f"{name}.yml").read_text()
        assert f"kubernetes/{name}.yml" in playbook


def test_every_kubernetes_core_task_uses_only_options_its_module_has() -> None:
    tasks = kubernetes_tasks()
    assert {module for _, _, module, _ in tasks} >= {"k8s_exec", "k8s_info", "k8s", "k8s_scale"}
    for file, task, module, arguments in tasks:
        unknown = set(arguments) - module_options(module)
        assert not unknown, f"{file}: {task['name']!r}: {module} has no option {sorted(unknown)}"


def test_the_option_check_catches_a_misspelt_option() -> None:
    assert "label_selectors" in module_options("k8s_scale")
    assert "label_selector" not in module_options("k8s_scale")


def test_a_misspelt_kubernetes_core_module_fails_the_syntax_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(REPO / "runbooks", tmp_path / "runbooks")
    tasks = tmp_path / "runbooks" / "kubernetes" / "drain-cell.yml"
    tasks.write_text(tasks.read_text().replace("kubernetes.core.k8s_info", "kubernetes.core.k8s_infoo"))
    monkeypatch.setattr(runner, "RUNBOOKS_DIR", tmp_path / "runbooks")
    rc, output = runner.syntax_check("drain-cell")
    assert rc != 0 and "k8s_infoo" in output


def test_every_mutating_exec_is_kept_out_of_check_mode() -> None:
    """k8s_exec runs its command even in check mode: one that changes something (a switchover, a
    promotion, a key written to etcd) must be guarded; the reads say ``changed_when: false``."""
    execs = [(file, task) for file, task, module, _ in kubernetes_tasks() if module == "k8s_exec"]
    assert len(execs) > 10
    for file, task in execs:
        if task.get("changed_when") is False:
            continue
        when = task.get("when")
        conditions = when if isinstance(when, list) else [when]
        assert "not ansible_check_mode" in conditions, f"{file}: {task['name']!r} would run in check mode"


def test_the_check_mode_guard_check_sees_inside_blocks() -> None:
    tasks = flat([{"when": "x", "block": [{"name": "a", "when": "not ansible_check_mode"}, {"name": "b"}]}])
    assert tasks == [
        {"name": "a", "when": ["x", "not ansible_check_mode"]},
        {"name": "b", "when": ["x"]},
    ]


# ---- the names the tasks use are the ones the Pulumi program creates ------------------------------


@pytest.fixture(scope="module", params=harness.stack_names())
def stack(request: pytest.FixtureRequest) -> tuple[harness.Run, kube.KubeTarget]:
    config = harness.stack_config(request.param)
    stack_settings = settings.from_config(
        lambda key: (
            None
            if key not in config
            else (config[key] if isinstance(config[key], str) else json.dumps(config[key]))
        )
    )
    topology = settings.load_topology(stack_settings)
    contexts = kube.parse_contexts(CONTEXTS)
    return harness.run(request.param), kube.KubeTarget(contexts, stack_settings.namespace, topology)


def _in_site(run: harness.Run, kind: str, site: str) -> dict[str, dict[str, Any]]:
    return {r.metadata["name"]: r.inputs for r in run.of_kind(kind) if r.labels.get(kube.LABEL_SITE) == site}


def test_each_member_pod_runs_patroni_with_the_config_the_tasks_name(
    stack: tuple[harness.Run, kube.KubeTarget],
) -> None:
    run, target = stack
    variables = target.extravars()
    assert variables["kube_namespace"] == target.namespace
    assert [c["cell"] for c in variables["kube_cells"]] == list(target.topology.cell_numbers)
    config_dir, config_file = kube.PATRONI_CONFIG.rsplit("/", 1)
    for cell in variables["kube_cells"]:
        for site, member in cell["members"].items():
            sets = _in_site(run, "StatefulSet", site)
            name = member["pod"].removesuffix("-0")
            assert name in sets, f"no StatefulSet {name} in {site}"
            pod = sets[name]["spec"]["template"]
            assert pod["metadata"]["labels"][kube.LABEL_COMPONENT] == name
            container = next(c for c in pod["spec"]["containers"] if c["name"] == kube.PATRONI_CONTAINER)
            mount = next(m for m in container["volumeMounts"] if m["mountPath"] == config_dir)
            volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
            maps = _in_site(run, "ConfigMap", site)
            patroni = yaml.safe_load(maps[volume["configMap"]["name"]]["data"][config_file])
            assert patroni["name"] == member["name"]
            assert patroni["scope"] == (cell["dr_scope"] if site == "dr" else cell["scope"])


def test_failback_finds_the_volumes_the_sockets_and_the_etcd_the_program_declares(
    stack: tuple[harness.Run, kube.KubeTarget],
) -> None:
    run, target = stack
    variables = target.extravars()
    k = variables["kube"]
    for cell in variables["kube_cells"]:
        for site, member in cell["members"].items():
            spec = _in_site(run, "StatefulSet", site)[member["name"]]["spec"]
            claims = [c["metadata"]["name"] for c in spec["volumeClaimTemplates"]]
            assert member["pvc"] in [f"{claim}-{member['name']}-0" for claim in claims]
            patroni = yaml.safe_load(
                _in_site(run, "ConfigMap", site)[f"{member['name']}-patroni"]["data"]["patroni.yml"]
            )
            postgresql = patroni["postgresql"]
            assert postgresql["parameters"]["unix_socket_directories"] == k["postgres_socket_dir"]
            assert postgresql["authentication"]["superuser"]["username"] == k["superuser"]
            assert "local all all trust" in postgresql["pg_hba"]
            assert patroni["etcd3"] and patroni["namespace"] == k["patroni_namespace"]
            container = spec["template"]["spec"]["containers"][0]
            assert cell["postgres_port"] in [p["containerPort"] for p in container["ports"]]
            data = next(m for m in container["volumeMounts"] if m["name"] == "data")
            assert data["mountPath"] == k["postgres_socket_dir"]
            gate = spec["template"]["spec"].get("initContainers") or []
            for init in gate:  # the standby center's member waits for the leader lock, not a primary
                assert any(str(a).endswith("/leader") for a in init["command"]), init["command"]
    for site in topology_module.SITE_NAMES:
        etcd = _in_site(run, "StatefulSet", site)[k["etcd"][site]["name"]]["spec"]["template"]["spec"]
        container = next(c for c in etcd["containers"] if c["name"] == k["etcd"]["container"])
        assert k["etcd"]["client_port"] in [p["containerPort"] for p in container["ports"]]
    local = _in_site(run, "StatefulSet", "dr")[k["etcd_dr"]["name"]]["spec"]["template"]["spec"]
    container = next(c for c in local["containers"] if c["name"] == k["etcd"]["container"])
    assert k["etcd_dr"]["client_port"] in [p["containerPort"] for p in container["ports"]]
    for site in ("prod", "samecity"):
        for name in (k["app_names"][site], k["gateway_names"][site]):
            deployment = _in_site(run, "Deployment", site)[name]
            annotated = int(deployment["metadata"]["annotations"][k["active_replicas_annotation"]])
            assert annotated == deployment["spec"]["replicas"] > 0


def test_every_gateway_reads_the_drain_configmap_the_tasks_rewrite(
    stack: tuple[harness.Run, kube.KubeTarget],
) -> None:
    run, target = stack
    variables = target.extravars()["kube"]
    for site in topology_module.SITE_NAMES:
        maps = _in_site(run, "ConfigMap", site)
        drain = maps[variables["drain_config_map"]]
        assert json.loads(drain["data"][variables["drain_file"]]) == {"drained_cells": []}
        gateway = _in_site(run, "Deployment", site)[variables["gateway_names"][site]]
        pod = gateway["spec"]["template"]["spec"]
        volume = next(
            v for v in pod["volumes"] if v.get("configMap", {}).get("name") == variables["drain_config_map"]
        )
        container = pod["containers"][0]
        mount = next(m for m in container["volumeMounts"] if m["name"] == volume["name"])
        assert "subPath" not in mount  # a subPath mount never sees the ConfigMap change
        settings_dir = next(m["mountPath"] for m in container["volumeMounts"] if m["name"] == "settings")
        settings_volume = next(v for v in pod["volumes"] if v["name"] == "settings")
        gateway_settings = json.loads(maps[settings_volume["configMap"]["name"]]["data"]["gateway.json"])
        assert gateway_settings["drain_file"] == f"{mount['mountPath']}/{variables['drain_file']}"
        assert settings_dir in container["command"][-1] or any(
            settings_dir in a for a in container["command"]
        )
        assert container["ports"][0]["containerPort"] == variables["gateway_port"]
        assert gateway_settings["port"] == variables["gateway_port"]
        labels = gateway["spec"]["template"]["metadata"]["labels"]
        key, value = variables["label_part_of"].split("=")
        assert labels[key] == value and labels[variables["label_kind"]] == "gateway"


def test_dr_app_servers_and_gateway_are_idle_with_their_active_size_annotated(
    stack: tuple[harness.Run, kube.KubeTarget],
) -> None:
    run, target = stack
    variables = target.extravars()["kube"]
    deployments = _in_site(run, "Deployment", "dr")
    for name in (variables["app_names"]["dr"], variables["gateway_names"]["dr"]):
        spec = deployments[name]
        assert spec["spec"]["replicas"] == 0
        active = int(spec["metadata"]["annotations"][variables["active_replicas_annotation"]])
        center = _in_site(run, "Deployment", "prod")[name.replace("-dr", "-prod")]
        assert active == center["spec"]["replicas"] > 0
    etcd = [r for r in run.of_kind("StatefulSet") if r.labels.get(kube.LABEL_COMPONENT) == "etcd-dr-local"]
    assert len(etcd) == 1


# ---- refused before anything runs -------------------------------------------------------------------


def test_contexts_must_name_every_site_and_only_sites() -> None:
    assert kube.parse_contexts(CONTEXTS) == {"prod": "ctx-prod", "samecity": "ctx-samecity", "dr": "ctx-dr"}
    with pytest.raises(kube.KubeTargetError, match="missing dr"):
        kube.parse_contexts("prod=a,samecity=b")
    with pytest.raises(kube.KubeTargetError, match="no site named 'mars'"):
        kube.parse_contexts("prod=a,samecity=b,dr=c,mars=d")
    with pytest.raises(kube.KubeTargetError, match="expected SITE=CONTEXT"):
        kube.parse_contexts("prod")


def test_the_cli_refuses_a_kubernetes_target_without_contexts_or_a_local_cluster(tmp_path: Path) -> None:
    # without contexts the local cluster of `watertight cluster` is the target: none runs here
    env = {
        "PATH": str(Path(sys.executable).parent),
        "HOME": str(tmp_path),
        "WATERTIGHT_CLUSTER_DIR": str(tmp_path / "no-cluster"),
    }
    result = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "runbook", "switchover-site", "--target", "kubernetes",
         "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, check=False, env=env, cwd=REPO,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert "watertight cluster up" in result.stderr and "--kube-contexts" in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()
    half = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "runbook", "switchover-site", "--target", "kubernetes",
         "--kube-contexts", "prod=a,samecity=b", "--run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, check=False, env=env, cwd=REPO,
    )  # fmt: skip
    assert half.returncode == 2 and "missing dr" in half.stderr, half.stderr
    assert not (tmp_path / "run").exists()


def test_a_kubernetes_run_without_the_client_is_refused_naming_the_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = kube.KubeTarget.from_settings(CONTEXTS)
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "kubernetes" else real(name, *a)
    )
    with pytest.raises(runner.RunbookError, match=r"pip install 'watertight\[kubernetes\]'"):
        runner.run("drain-cell", {"cell": "1"}, tmp_path / "run", target=target)
    monkeypatch.setattr(kube, "COLLECTIONS_DIR", tmp_path / "none")
    with pytest.raises(runner.RunbookError, match=r"kubernetes\.core collection"):
        runner.run("drain-cell", {"cell": "1"}, tmp_path / "run", target=target)
    assert not (tmp_path / "run").exists()


def test_the_extra_variables_name_each_member_as_render_does() -> None:
    target = kube.KubeTarget.from_settings(CONTEXTS, "ns")
    variables = target.extravars()
    assert variables["watertight_target"] == "kubernetes" and variables["kube_namespace"] == "ns"
    first = variables["kube_cells"][0]
    name = render.pg_name(1, "samecity")
    assert first["members"]["samecity"] == {"name": name, "pod": f"{name}-0", "pvc": f"data-{name}-0"}
    assert first["leader_site"] == target.topology.leader_site(1)


def test_the_chaos_action_takes_the_clusters_from_the_experiments_configuration(tmp_path: Path) -> None:
    from watertight.chaos import actions

    with pytest.raises(kube.KubeTargetError, match="missing dr"):
        actions.run_runbook(
            "activate-dr",
            target="kubernetes",
            run_dir=str(tmp_path / "run"),
            configuration={"kube_contexts": {"prod": "a", "samecity": "b"}},
        )
    assert not (tmp_path / "run").exists()


# ---- the RPO of activate-dr on kubernetes: what the controller computes from psql's listing -----


def write_ack_log(path: Path, entries: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(entry) + "\n" for entry in entries))
    return path


def acked(key: str, cell: int, time: str | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"idempotency_key": key, "cell": cell, "transaction_id": f"TX{key}"}
    if time is not None:
        entry["time"] = time
    return entry


def test_the_ack_log_window_names_its_cells_and_starts_a_margin_before_the_first_acknowledgement(
    tmp_path: Path,
) -> None:
    path = write_ack_log(
        tmp_path / "ack.jsonl",
        [acked("b", 2, "2026-11-25T10:00:05.5Z"), acked("a", 1, "2026-11-25T10:00:00Z")],
    )
    window = ops.ack_log_window(str(tmp_path), str(path))
    assert window["changed"] is False and window["acknowledged"] == 2 and window["cells"] == [1, 2]
    since = datetime.fromisoformat(window["since"])
    first = datetime(2026, 11, 25, 10, 0, 0, tzinfo=UTC)
    assert since == first - timedelta(seconds=ops.ACK_CLOCK_MARGIN_S) and since.utcoffset() == timedelta(0)

    # an entry without its time: every key of the cells must be listed
    untimed = write_ack_log(
        tmp_path / "untimed.jsonl", [acked("a", 1, "2026-11-25T10:00:00Z"), acked("c", 1, None)]
    )
    assert ops.ack_log_window(str(tmp_path), str(untimed))["since"] == "-infinity"
    empty = write_ack_log(tmp_path / "empty.jsonl", [])
    assert ops.ack_log_window(str(tmp_path), str(empty))["since"] is None


@pytest.mark.parametrize(
    ("content", "says"),
    [
        (None, "does not exist"),
        ('{"idempotency_key": "a", "cell": 1, "time": "x"}\nnot json\n{}\n', "not a JSON line"),
        ('{"idempotency_key": "a", "cell": 1, "time": "yesterday"}\n', "not an ISO 8601 time"),
        ('{"idempotency_key": "a", "cell": 1, "time": "2026-11-25T10:00:00"}\n', "no time zone"),
    ],
    ids=["missing", "corrupt-line", "bad-time", "no-zone"],
)
def test_a_bad_ack_log_is_refused_naming_the_file(tmp_path: Path, content: str | None, says: str) -> None:
    path = tmp_path / "ack.jsonl"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ops.StepError, match=says) as raised:
        ops.ack_log_window(str(tmp_path), str(path))
    assert str(path) in str(raised.value)


def test_the_rpo_from_listed_keys_counts_each_acknowledged_key_the_ledgers_lack(tmp_path: Path) -> None:
    path = write_ack_log(
        tmp_path / "ack.jsonl",
        [acked(key, 1 + n % 2, f"2026-11-25T10:00:0{n}Z") for n, key in enumerate("abcd")],
    )
    # tmp_path is no topology: with found_keys the step must not need one
    all_there = ops.rpo_of_ack_log(str(tmp_path), str(path), found_keys=["a", "b", "c", "d", "z"])
    assert all_there["rpo"]["missing"] == 0 and all_there["rpo"]["acknowledged"] == 4
    one_lost = ops.rpo_of_ack_log(str(tmp_path), str(path), found_keys=["a", "b", "d"])
    assert one_lost["rpo"]["missing"] == 1 and "c" in json.dumps(one_lost["rpo"])
    assert one_lost["msg"] == "1 of 4 acknowledged transactions are missing"
    none_listed = ops.rpo_of_ack_log(str(tmp_path), str(path), found_keys=[])
    assert none_listed["rpo"]["missing"] == 4


def test_activate_dr_on_kubernetes_reads_the_ack_log_before_it_fences_and_lists_keys_read_only() -> None:
    tasks = top_level_tasks("activate-dr")
    names = [task["name"] for task in tasks]
    window = next(
        i for i, task in enumerate(tasks) if task.get("watertight_step", {}).get("step") == "ack_log_window"
    )
    fence = next(i for i, name in enumerate(names) if name.startswith("Fence both centers"))
    assert window < fence
    listing = next(task for task in tasks if task["name"].startswith("List the idempotency keys"))
    assert listing["changed_when"] is False and "rc != 0" in listing["failed_when"]
    assert "SELECT key FROM idempotency" in listing["kubernetes.core.k8s_exec"]["command"]


def test_the_step_module_takes_the_listed_keys_as_ansible_hands_them(tmp_path: Path) -> None:
    """The module itself, run as Ansible runs a module (its arguments in a JSON file)."""
    path = write_ack_log(tmp_path / "ack.jsonl", [acked("a", 1, "2026-11-25T10:00:00Z"), acked("b", 2, None)])
    arguments = {
        "step": "rpo_of_ack_log",
        "run_dir": str(tmp_path),
        "ack_log": str(path),
        "found_keys": ["b"],
    }
    args_file = tmp_path / "args.json"
    args_file.write_text(json.dumps({"ANSIBLE_MODULE_ARGS": {**arguments, "_ansible_check_mode": True}}))
    done = subprocess.run(
        [sys.executable, str(REPO / "runbooks" / "library" / "watertight_step.py"), str(args_file)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    answer = json.loads(done.stdout)
    assert done.returncode == 0 and answer["changed"] is False, done.stdout + done.stderr
    assert answer["rpo"]["acknowledged"] == 2 and answer["rpo"]["missing"] == 1


def test_failback_starts_again_every_center_deployment_the_fence_stopped(
    stack: tuple[harness.Run, kube.KubeTarget],
) -> None:
    """activate-dr scales every Deployment of the centers to zero; failback's last tasks, evaluated
    by Ansible's templating over the Deployments the Pulumi program declares (as k8s_info would
    return them once fenced), bring each back at the size the program gives it."""
    run, target = stack
    variables = target.extravars()
    declared: dict[str, dict[str, int]] = {}
    results = []
    for site in ("prod", "samecity"):
        deployments = _in_site(run, "Deployment", site)
        declared[site] = {name: spec["spec"]["replicas"] for name, spec in deployments.items()}
        fenced = [
            {"metadata": spec["metadata"], "spec": {**spec["spec"], "replicas": 0}}
            for spec in deployments.values()
        ]
        results.append({"item": site, "resources": fenced})
    assert all(declared.values()) and all(size > 0 for sizes in declared.values() for size in sizes.values())
    read = kubernetes_task("failback", "Read the centers' other Deployments")
    start = kubernetes_task("failback", "Start them again at their annotated size")
    assert (
        read["kubernetes.core.k8s_info"]["kind"] == start["kubernetes.core.k8s_scale"]["kind"] == "Deployment"
    )
    scope = {
        **variables,
        "dr_serves": [{"cell": 1}],
        "center_deployments": {"results": [*results, {"skipped": True}]},
    }
    assert ansible_condition(read["when"], scope)
    assert not ansible_condition(read["when"], {**scope, "dr_serves": []})  # nothing was fenced by dr
    started: dict[str, dict[str, int]] = {"prod": {}, "samecity": {}}
    for item in ansible_template(start["loop"], scope):
        if ansible_condition(start["when"], {**scope, "item": item}):
            arguments = ansible_template(start["kubernetes.core.k8s_scale"], {**scope, "item": item})
            assert arguments["context"] == variables["kube_contexts"][item[0]["item"]]
            started[item[0]["item"]][arguments["name"]] = int(arguments["replicas"])
    assert started == declared
    # a Deployment already running is left alone (the run is idempotent)
    running = {"item": "prod", "resources": [{**r, "spec": {"replicas": 2}} for r in results[0]["resources"]]}
    again = {**scope, "center_deployments": {"results": [running]}}
    assert not any(
        ansible_condition(start["when"], {**again, "item": item})
        for item in ansible_template(start["loop"], again)
    )
