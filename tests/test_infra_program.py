"""The Pulumi program of infra/, run under Pulumi's mocks for every stack file (no Pulumi CLI, no
cluster): three clusters, each object on its own site's cluster, the topology's members, the
rendered configuration, the network rules, the secrets and the plan."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from cardcore.gateway.settings import parse as parse_gateway
from cardcore.platform import auth
from cardcore.platform.settings import AppSettings

from watertight import render
from watertight.kube_names import LABEL_CELL, LABEL_COMPONENT, LABEL_KIND, LABEL_SITE, labels
from watertight.monitoring import rules as monitoring_rules
from watertight.topology import CENTERS, SITE_NAMES, Topology
from watertight_infra import components, harness, settings, sizing

STACKS = harness.stack_names()
MOCK_TOKENS: dict[str, str] = json.loads(harness.MOCK_SECRETS["apiTokens"])
# every value that must reach Kubernetes Secrets only: the secrets, each API token and its digest
SECRET_VALUES = (
    [value for key, value in harness.MOCK_SECRETS.items() if key != "apiTokens"]
    + list(MOCK_TOKENS.values())
    + [auth.digest(token) for token in MOCK_TOKENS.values()]
)


def test_there_is_a_dev_and_a_prod_stack() -> None:
    assert {"dev", "prod"} <= set(STACKS)


@functools.cache
def run_of(stack: str) -> harness.Run:
    return harness.run(stack)


@functools.cache
def settings_of(stack: str) -> settings.StackSettings:
    return settings.parse(harness.stack_config(stack))


def topology_of(stack: str) -> Topology:
    return settings.load_topology(settings_of(stack))


def one(items: list[harness.Declared], what: str) -> harness.Declared:
    assert len(items) == 1, f"{what}: expected one, found {[i.name for i in items]}"
    return items[0]


def site_of_provider(run: harness.Run) -> dict[str, str]:
    """provider URN -> the site whose context it adopts."""
    contexts = {site.context: name for name, site in settings_of(run.stack).sites.items()}
    return {provider.urn: contexts[provider.inputs["context"]] for provider in run.providers()}


def patroni_configs(run: harness.Run) -> dict[tuple[int, str], dict[str, Any]]:
    found = {}
    for config_map in run.of_kind("ConfigMap"):
        if components.PATRONI_FILE in (config_map.inputs.get("data") or {}):
            cell = int(config_map.labels[LABEL_CELL])
            found[(cell, config_map.labels[LABEL_SITE])] = yaml.safe_load(
                config_map.inputs["data"][components.PATRONI_FILE]
            )
    return found


def workload(run: harness.Run, kind: str, name: str, site: str) -> harness.Declared:
    return one(
        [r for r in run.of_kind(kind) if r.metadata.get("name") == name and r.labels.get(LABEL_SITE) == site],
        f"{kind} {name} at {site}",
    )


def pod_spec(declared: harness.Declared) -> dict[str, Any]:
    spec: dict[str, Any] = declared.inputs["spec"]["template"]["spec"]
    return spec


def selects(selector: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    return all(pod_labels.get(key) == value for key, value in match.items())


# ---- clusters and providers -----------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_each_site_is_its_own_cluster_adopted_by_its_configured_context(stack: str) -> None:
    run = run_of(stack)
    providers = run.providers()
    configured = settings_of(stack).sites
    assert len(providers) == 3
    assert sorted(p.inputs["context"] for p in providers) == sorted(configured[s].context for s in SITE_NAMES)
    assert sorted(site_of_provider(run).values()) == sorted(SITE_NAMES)


@pytest.mark.parametrize("stack", STACKS)
def test_every_kubernetes_object_is_declared_through_its_own_sites_provider(stack: str) -> None:
    run = run_of(stack)
    provider_site = site_of_provider(run)
    objects = run.kubernetes()
    assert len(objects) > 50
    for declared in objects:
        assert declared.provider in provider_site, f"{declared.name} has no explicit provider"
        site = provider_site[declared.provider]
        assert site == declared.labels[LABEL_SITE], declared.name
        if declared.kind != "Namespace":
            assert declared.metadata["namespace"] == settings_of(stack).namespace_of(site), declared.name


@pytest.mark.parametrize("stack", STACKS)
def test_every_object_is_a_child_of_a_topology_component(stack: str) -> None:
    run = run_of(stack)
    by_urn = run.by_urn()
    for declared in run.kubernetes() + run.providers():
        parent = by_urn.get(declared.parent)
        assert parent is not None and parent.type.startswith("watertight:infra:"), declared.name
    sites = [r for r in run.resources if r.type == "watertight:infra:Site"]
    cells = [r for r in run.resources if r.type == "watertight:infra:Cell"]
    assert sorted(s.name for s in sites) == sorted(SITE_NAMES)
    assert len(cells) == topology_of(stack).cells
    # a cell member is a child of its cell, whatever site it is in
    for member in (r for r in run.resources if r.type == "watertight:infra:CellMember"):
        cell = by_urn[member.parent]
        assert cell.type == "watertight:infra:Cell"
        assert member.name.startswith(f"pg-cell{cell.name.removeprefix('cell-')}-")


# ---- topology -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_an_etcd_member_is_ready_with_a_leader_and_alive_as_its_etcd_version_allows(stack: str) -> None:
    run = run_of(stack)
    for member in [r for r in run.of_kind("StatefulSet") if r.labels[LABEL_KIND] in ("etcd", "etcd-dr")]:
        container = pod_spec(member)["containers"][0]
        assert container["readinessProbe"]["httpGet"]["path"] == "/health?serializable=true"
        assert container["livenessProbe"]["httpGet"]["path"] == settings_of(stack).etcd_liveness_path
    # etcd 3.4 (the local stack's Debian image) needs a leader for /health: it is alive when it answers
    assert settings_of("local").etcd_liveness_path == "/version"
    assert settings_of("dev").etcd_liveness_path == "/health?serializable=true"


@pytest.mark.parametrize("stack", STACKS)
def test_one_etcd_member_per_site_and_the_dr_copies_own_etcd_at_dr(stack: str) -> None:
    run = run_of(stack)
    members = [r for r in run.of_kind("StatefulSet") if r.labels[LABEL_KIND] == "etcd"]
    assert sorted(m.labels[LABEL_SITE] for m in members) == sorted(SITE_NAMES)
    dr_local = one([r for r in run.of_kind("StatefulSet") if r.labels[LABEL_KIND] == "etcd-dr"], "etcd-dr")
    assert dr_local.labels[LABEL_SITE] == "dr"
    endpoints = run.outputs["chaos_configuration"]
    assert endpoints["kube_namespace"] == settings_of(stack).namespace
    assert endpoints["kube_namespaces"] == {s: settings_of(stack).namespace_of(s) for s in SITE_NAMES}
    for member in members:
        args = pod_spec(member)["containers"][0]["args"]
        initial = args[args.index("--initial-cluster") + 1].split(",")
        domains = {s: settings_of(stack).sites[s].service_domain for s in SITE_NAMES}
        assert sorted(initial) == sorted(
            f"{s}=http://etcd-{s}.{settings_of(stack).namespace_of(s)}.{domains[s]}:{topology_of(stack).ports.etcd_peer}"
            for s in SITE_NAMES
        )
        assert (
            args[args.index("--listen-client-urls") + 1]
            == f"http://0.0.0.0:{topology_of(stack).ports.etcd_client}"
        )


@pytest.mark.parametrize("stack", STACKS)
def test_each_cell_has_a_member_in_each_center_and_a_dr_copy(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    members: dict[int, list[str]] = {}
    for stateful_set in run.of_kind("StatefulSet"):
        if stateful_set.labels[LABEL_KIND] == "patroni":
            members.setdefault(int(stateful_set.labels[LABEL_CELL]), []).append(
                stateful_set.labels[LABEL_SITE]
            )
            assert stateful_set.inputs["spec"]["replicas"] == 1
    assert sorted(members) == topology.cell_numbers
    for cell, sites in members.items():
        assert sorted(sites) == sorted(SITE_NAMES), f"cell {cell}"


@pytest.mark.parametrize("stack", STACKS)
def test_center_members_are_synchronous_and_the_dr_copy_is_a_standby_cluster(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    ns, sites = settings_of(stack).namespace_of, settings_of(stack).sites
    configs = patroni_configs(run)
    assert len(configs) == 3 * topology.cells
    for (cell, site), config in configs.items():
        dcs = config["bootstrap"]["dcs"]
        if site in CENTERS:
            assert config["scope"] == f"watertight-cell{cell}"
            assert dcs["synchronous_mode"] is True
            assert dcs["synchronous_mode_strict"] is False
            assert dcs["synchronous_node_count"] == 1
            assert "standby_cluster" not in dcs
            assert sorted(config["etcd3"]["hosts"]) == sorted(
                f"etcd-{s}.{ns(s)}.{sites[s].service_domain}:{topology.ports.etcd_client}" for s in SITE_NAMES
            )
            assert config["etcd3"]["hosts"][0].startswith(f"etcd-{site}.")  # its own site's member first
        else:
            assert config["scope"] == f"watertight-cell{cell}-dr"
            assert dcs["synchronous_mode"] is False
            assert config["etcd3"]["hosts"] == [
                f"etcd-dr-local.{ns('dr')}.{sites['dr'].service_domain}:{topology.ports.etcd_dr_client}"
            ]
            assert dcs["standby_cluster"]["primary_slot_name"] == f"dr_cell{cell}"
        assert config["postgresql"]["listen"] == f"0.0.0.0:{topology.postgres_port(cell)}"
        assert config["postgresql"]["connect_address"] == (
            f"pg-cell{cell}-{site}.{ns(site)}.{sites[site].service_domain}:{topology.postgres_port(cell)}"
        )
        assert config["postgresql"]["bin_dir"] == settings_of(stack).postgres_bin_dir
        # replication and clients only from the sites' networks
        networks = {n for s in SITE_NAMES for n in sites[s].networks}
        hosts = [line.split()[3] for line in config["postgresql"]["pg_hba"] if line.startswith("host ")]
        assert set(hosts) == networks


@pytest.mark.parametrize("stack", STACKS)
def test_leaders_are_spread_over_the_centers_and_the_standby_center_waits_for_its_leader(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    leaders = {int(cell): value["leader_site"] for cell, value in run.outputs["cells"].items()}
    assert leaders == {cell: topology.leader_site(cell) for cell in topology.cell_numbers}
    if topology.cells >= 2:
        assert leaders[1] == "prod" and leaders[2] == "samecity"
    counts = [sum(1 for site in leaders.values() if site == center) for center in CENTERS]
    assert abs(counts[0] - counts[1]) <= 1
    ns, sites = settings_of(stack).namespace_of, settings_of(stack).sites
    configs = patroni_configs(run)
    for cell, leader in leaders.items():
        standby = topology.standby_site(cell)
        # the dr copy streams from the leader center's member first
        first = configs[(cell, "dr")]["bootstrap"]["dcs"]["standby_cluster"]["host"].split(",")[0]
        assert first == f"pg-cell{cell}-{leader}.{ns(leader)}.{sites[leader].service_domain}"
        assert not pod_spec(workload(run, "StatefulSet", f"pg-cell{cell}-{leader}", leader)).get(
            "initContainers"
        )
        (gate,) = pod_spec(workload(run, "StatefulSet", f"pg-cell{cell}-{standby}", standby))[
            "initContainers"
        ]
        assert gate["command"][-2] == (
            f"http://pg-cell{cell}-{leader}.{ns(leader)}.{sites[leader].service_domain}:{topology.patroni_port(cell)}/leader"
        )
        # the app servers try the leader's member first
        app = app_settings_of(run, "prod")
        assert app.cells[str(cell)].leader_site == leader


def test_a_topology_naming_leaders_moves_the_first_leadership(tmp_path: Path) -> None:
    text = render_topology_text(leaders={1: "samecity", 2: "prod"})
    (tmp_path / "topology.yaml").write_text(text, encoding="utf-8")
    run = harness.run("dev", overrides={"topology": str(tmp_path / "topology.yaml"), "cells": 2})
    assert run.outputs["cells"]["1"]["leader_site"] == "samecity"
    assert pod_spec(workload(run, "StatefulSet", "pg-cell1-prod", "prod"))["initContainers"]
    assert not pod_spec(workload(run, "StatefulSet", "pg-cell1-samecity", "samecity")).get("initContainers")


def render_topology_text(leaders: dict[int, str]) -> str:
    from watertight import topology as topology_module

    document = yaml.safe_load(topology_module.DEFAULT_PATH.read_text(encoding="utf-8"))
    document["leaders"] = leaders
    return yaml.safe_dump(document)


# ---- rendered component configuration -------------------------------------------------------------


def app_settings_of(run: harness.Run, site: str) -> AppSettings:
    secret = workload(run, "Secret", f"app-{site}-settings", site)
    assert "stringData" in secret.secret_paths or any(p.startswith("stringData") for p in secret.secret_paths)
    return msgspec.json.decode(secret.inputs["stringData"]["app.json"], type=AppSettings)


@pytest.mark.parametrize("stack", STACKS)
def test_app_and_gateway_settings_name_the_services_of_every_site(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    ns, sites = settings_of(stack).namespace_of, settings_of(stack).sites

    def host(site: str, component: str) -> str:
        return f"{component}.{ns(site)}.{sites[site].service_domain}"

    for site in CENTERS:
        other = next(s for s in CENTERS if s != site)
        app = app_settings_of(run, site)
        assert (app.host, app.port, app.site) == ("0.0.0.0", topology.ports.app, site)
        assert app.pan_key_hex == harness.MOCK_SECRETS["panKeyHex"]
        for cell in topology.cell_numbers:
            leader, standby = topology.leader_site(cell), topology.standby_site(cell)
            members = [
                f"{host(s, f'pg-cell{cell}-{s}')}:{topology.postgres_port(cell)}" for s in (leader, standby)
            ]
            assert app.cells[str(cell)].dsn == (
                f"postgresql://postgres@{','.join(members)}/cardcore?target_session_attrs=read-write"
            )
        config_map = workload(run, "ConfigMap", f"gateway-{site}-settings", site)
        gateway = parse_gateway(config_map.inputs["data"]["gateway.json"])
        assert (gateway.host, gateway.port) == ("0.0.0.0", topology.ports.gateway)
        for cell in topology.cell_numbers:
            assert gateway.upstreams[str(cell)] == [
                f"http://{host(site, f'app-{site}')}:{topology.ports.app}",
                f"http://{host(other, f'app-{other}')}:{topology.ports.app}",
            ]


@pytest.mark.parametrize("stack", STACKS)
def test_pods_run_what_the_local_runtime_runs(stack: str) -> None:
    """The same modules the local runtime starts, with the rendered files mounted."""
    run = run_of(stack)
    secrets: dict[str, Any] = {
        key: "x" * 64 if key == render.SECRET_PAN_KEY else "pw" for key in render.REQUIRED_SECRETS
    }
    secrets[render.SECRET_API_TOKENS] = {"acquirer": "a", "channel": "c", "operator": "o"}
    secrets[render.SECRET_KEY_RING] = {"current": 1, "keys": {"1": "x" * 64}}
    local = {
        c.kind: c.argv[1:]
        for c in render.render_local(topology_of(stack), Path("/tmp/wt-run"), "/venv/bin/python", secrets)
    }
    app = pod_spec(workload(run, "Deployment", "app-prod", "prod"))["containers"][0]["command"]
    gateway = pod_spec(workload(run, "Deployment", "gateway-prod", "prod"))["containers"][0]["command"]
    patroni = pod_spec(workload(run, "StatefulSet", "pg-cell1-prod", "prod"))["containers"][0]["command"]
    assert app[1:-1] == local["app"][:-1] and app[-1] == "/etc/cardcore/app.json"
    assert gateway[1:-1] == local["gateway"][:-1] and gateway[-1] == "/etc/cardcore/gateway.json"
    # Patroni under the member guard in both: the same module after the guard's "--"
    guard, patroni_argv = patroni[: patroni.index("--")], patroni[patroni.index("--") + 1 :]
    local_patroni = local["patroni"][local["patroni"].index("--") + 2 :]
    assert patroni_argv[1:-1] == local_patroni[:-1] and patroni_argv[-1] == "/etc/patroni/patroni.yml"
    assert guard[1] == "/opt/watertight/guard.py" and local["patroni"][:2] == [
        "-m",
        "watertight.runtime.guard",
    ]
    assert guard[2:] == [
        "--watchdog",
        "/tmp/watertight-watchdog",
        "--pid-file",
        "/var/lib/postgresql/data/pgdata/postmaster.pid",
    ]
    # Patroni's passwords arrive as the same variables, from the credentials Secret
    env = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in pod_spec(workload(run, "StatefulSet", "pg-cell1-prod", "prod"))["containers"][0]["env"]
    }
    assert set(env) == set(render.patroni_env(secrets))
    assert {ref["name"] for ref in env.values()} == {components.CREDENTIALS_SECRET}


@pytest.mark.parametrize("stack", STACKS)
def test_pods_carry_the_labels_the_chaos_target_selects_by(stack: str) -> None:
    run = run_of(stack)
    expected = {
        ("StatefulSet", "etcd-prod"): labels("prod", "etcd", component="etcd-prod"),
        ("StatefulSet", "etcd-dr-local"): labels("dr", "etcd-dr", component="etcd-dr-local"),
        ("StatefulSet", "pg-cell2-dr"): labels("dr", "patroni", 2, "pg-cell2-dr"),
        ("Deployment", "app-samecity"): labels("samecity", "app", component="app-samecity"),
        ("Deployment", "gateway-prod"): labels("prod", "gateway", component="gateway-prod"),
    }
    for (kind, name), wanted in expected.items():
        site = wanted[LABEL_SITE]
        pod_labels = workload(run, kind, name, site).inputs["spec"]["template"]["metadata"]["labels"]
        assert wanted.items() <= pod_labels.items(), name


# ---- secrets --------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_secrets_reach_only_kubernetes_secrets_and_stay_secret(stack: str) -> None:
    run = run_of(stack)
    for declared in run.resources:
        text = json.dumps(declared.inputs)
        leaked = [value for value in SECRET_VALUES if value in text]
        if declared.kind == "Secret":
            assert leaked, f"{declared.name}: a Secret without a secret value"
            assert declared.secret_paths == ["stringData"], declared.name
        else:
            assert not leaked, f"{declared.type} {declared.name} holds a secret value"
    assert SECRET_VALUES[0] not in json.dumps(run.outputs)
    for site in SITE_NAMES:
        credentials = workload(run, "Secret", components.CREDENTIALS_SECRET, site)
        assert credentials.inputs["stringData"] == {
            render.SECRET_SUPERUSER_PASSWORD: harness.MOCK_SECRETS["superuserPassword"],
            render.SECRET_REPLICATION_PASSWORD: harness.MOCK_SECRETS["replicationPassword"],
        }


@pytest.mark.parametrize("stack", STACKS)
def test_servers_get_the_digests_of_the_api_tokens_and_clients_the_tokens(stack: str) -> None:
    run = run_of(stack)
    digests = {kind: [auth.digest(token)] for kind, token in MOCK_TOKENS.items()}
    for site in SITE_NAMES:
        accepted = workload(run, "Secret", components.API_TOKENS_SECRET, site).inputs["stringData"]
        assert json.loads(accepted[render.API_TOKENS_FILE]) == digests
        assert not any(token in json.dumps(accepted) for token in MOCK_TOKENS.values())
        clients = workload(run, "Secret", components.API_CLIENTS_SECRET, site).inputs["stringData"]
        assert json.loads(clients[components.API_CLIENTS_FILE]) == {"api_tokens": MOCK_TOKENS}
        assert clients["operator"] == MOCK_TOKENS["operator"]
        for kind in ("app", "gateway"):
            spec = pod_spec(workload(run, "Deployment", f"{kind}-{site}", site))
            mount = next(m for m in spec["containers"][0]["volumeMounts"] if m["name"] == "api-tokens")
            volume = next(v for v in spec["volumes"] if v["name"] == "api-tokens")
            # a whole directory, not a subPath: the kubelet refreshes it and the servers reread it
            assert volume["secret"]["secretName"] == components.API_TOKENS_SECRET and "subPath" not in mount
            assert mount["mountPath"] == components.API_TOKENS_DIR
        app = app_settings_of(run, site)
        assert app.api_tokens_file == f"{components.API_TOKENS_DIR}/{render.API_TOKENS_FILE}"
    if settings_of(stack).locust.enabled:
        site = settings_of(stack).locust.site
        for name in ("locust-master", "locust-worker"):
            container = pod_spec(workload(run, "Deployment", name, site))["containers"][0]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert (
                env["WATERTIGHT_API_TOKENS"] == f"{components.API_CLIENTS_DIR}/{components.API_CLIENTS_FILE}"
            )


def test_a_rotation_lets_the_servers_accept_the_previous_tokens_too() -> None:
    previous = {"acquirer": "old-a", "channel": "old-c", "operator": "old-o"}
    run = harness.run("dev", secrets={**harness.MOCK_SECRETS, "apiTokensPrevious": json.dumps(previous)})
    accepted = workload(run, "Secret", components.API_TOKENS_SECRET, "prod").inputs["stringData"]
    assert json.loads(accepted[render.API_TOKENS_FILE]) == {
        kind: [auth.digest(MOCK_TOKENS[kind]), auth.digest(previous[kind])] for kind in MOCK_TOKENS
    }
    clients = workload(run, "Secret", components.API_CLIENTS_SECRET, "prod").inputs["stringData"]
    assert json.loads(clients[components.API_CLIENTS_FILE]) == {"api_tokens": MOCK_TOKENS}


def test_api_tokens_without_a_kind_stop_the_program() -> None:
    with pytest.raises(Exception, match="operator"):
        harness.run(
            "dev",
            secrets={**harness.MOCK_SECRETS, "apiTokens": json.dumps({"acquirer": "a", "channel": "c"})},
        )


def test_a_missing_secret_stops_the_program() -> None:
    with pytest.raises(Exception, match="panKeyHex"):
        harness.run("dev", secrets={k: v for k, v in harness.MOCK_SECRETS.items() if k != "panKeyHex"})


def test_a_pan_key_that_is_not_32_bytes_of_hex_stops_the_program() -> None:
    with pytest.raises(Exception, match="panKeyHex"):
        harness.run("dev", secrets={**harness.MOCK_SECRETS, "panKeyHex": "abc"})


# ---- network policies -----------------------------------------------------------------------------


def policies_of(run: harness.Run, site: str) -> dict[str, dict[str, Any]]:
    return {
        p.metadata["name"]: p.inputs["spec"]
        for p in run.of_kind("NetworkPolicy")
        if p.labels[LABEL_SITE] == site
    }


def rule_for(spec: dict[str, Any], port: int) -> list[dict[str, Any]]:
    rules = [r for r in spec.get("ingress", []) if any(p["port"] == port for p in r.get("ports", []))]
    assert len(rules) == 1, f"port {port}: {rules}"
    peers: list[dict[str, Any]] = rules[0].get("from") or []
    return peers


def cidrs(peers: list[dict[str, Any]]) -> set[str]:
    return {p["ipBlock"]["cidr"] for p in peers if "ipBlock" in p}


def pod_kinds(peers: list[dict[str, Any]]) -> list[dict[str, str]]:
    return [p["podSelector"]["matchLabels"] for p in peers if "podSelector" in p]


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_let_only_gateways_take_outside_traffic(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    for site in SITE_NAMES:
        policies = policies_of(run, site)
        deny = policies[components.DEFAULT_DENY_POLICY]
        assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and not deny.get("ingress")
        for name, spec in policies.items():
            for rule in spec.get("ingress") or []:
                if not rule.get("from"):
                    assert name == f"gateway-{site}", f"{name} admits anyone"
                    assert [p["port"] for p in rule["ports"]] == [topology.ports.gateway]
        if site in CENTERS:
            assert rule_for(policies[f"gateway-{site}"], topology.ports.gateway) == []


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_let_only_app_servers_and_the_cells_peers_reach_postgresql(stack: str) -> None:
    run = run_of(stack)
    topology = topology_of(stack)
    sites = settings_of(stack).sites
    monitoring = settings_of(stack).monitoring.crds_present
    for site in SITE_NAMES:
        others = {n for s in SITE_NAMES if s != site for n in sites[s].networks}
        policies = policies_of(run, site)
        for cell in topology.cell_numbers:
            spec = policies[f"pg-cell{cell}-{site}"]
            assert spec["podSelector"]["matchLabels"][LABEL_COMPONENT] == f"pg-cell{cell}-{site}"
            postgres = rule_for(spec, topology.postgres_port(cell))
            # in this cluster: app servers only (no other cell's member); elsewhere: by address
            assert [k[LABEL_KIND] for k in pod_kinds(postgres)] == ["app"]
            assert cidrs(postgres) == others
            patroni = rule_for(spec, topology.patroni_port(cell))
            assert pod_kinds(patroni) == []
            assert cidrs(patroni) == others
            assert any("namespaceSelector" in p for p in patroni) == monitoring
            # a port of another cell is not opened by this member's policy
            opened = {p["port"] for r in spec["ingress"] for p in r["ports"]}
            assert opened == {topology.postgres_port(cell), topology.patroni_port(cell)}
        if site in CENTERS:
            other_center = next(s for s in CENTERS if s != site)
            app = rule_for(policies[f"app-{site}"], topology.ports.app)
            assert [k[LABEL_KIND] for k in pod_kinds(app)] == ["gateway"]
            # the other center's gateways, not dr's networks
            assert cidrs(app) == set(sites[other_center].networks)


@pytest.mark.parametrize("stack", STACKS)
def test_network_policies_keep_etcd_among_its_members_and_patroni(stack: str) -> None:
    run = run_of(stack)
    ports = topology_of(stack).ports
    sites = settings_of(stack).sites
    for site in SITE_NAMES:
        others = {n for s in SITE_NAMES if s != site for n in sites[s].networks}
        spec = policies_of(run, site)[f"etcd-{site}"]
        client = rule_for(spec, ports.etcd_client)
        assert [k[LABEL_KIND] for k in pod_kinds(client)] == ["patroni"] and cidrs(client) == others
        peer = rule_for(spec, ports.etcd_peer)
        assert pod_kinds(peer) == [] and cidrs(peer) == others
    dr_local = policies_of(run, "dr")["etcd-dr-local"]
    assert [k[LABEL_KIND] for k in pod_kinds(rule_for(dr_local, ports.etcd_dr_client))] == ["patroni"]
    assert cidrs(rule_for(dr_local, ports.etcd_dr_client)) == set()
    assert all(p["port"] != ports.etcd_dr_peer for r in dr_local["ingress"] for p in r["ports"])


@pytest.mark.parametrize("stack", STACKS)
def test_every_pod_that_serves_a_port_has_a_policy_selecting_it(stack: str) -> None:
    run = run_of(stack)
    for declared in run.of_kind("Deployment") + run.of_kind("StatefulSet"):
        template = declared.inputs["spec"]["template"]
        if not any(c.get("ports") for c in template["spec"]["containers"]):
            continue
        site = declared.labels[LABEL_SITE]
        own = [
            name
            for name, spec in policies_of(run, site).items()
            if name != components.DEFAULT_DENY_POLICY
            and selects(spec["podSelector"], template["metadata"]["labels"])
        ]
        assert len(own) == 1, f"{declared.metadata['name']}: {own}"


# ---- services, probes, autoscaling -----------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_services_other_sites_reach_use_the_configured_type_and_gateways_face_outside(stack: str) -> None:
    run = run_of(stack)
    configured = settings_of(stack)
    for service in run.of_kind("Service"):
        name, kind = service.metadata["name"], service.labels[LABEL_KIND]
        if kind == "gateway":
            assert service.inputs["spec"]["type"] == configured.gateway_service_type
        elif kind.startswith("locust"):
            assert service.inputs["spec"]["type"] == "ClusterIP"
        else:
            assert service.inputs["spec"]["type"] == configured.cross_site_service_type, name
        if kind in ("etcd", "etcd-dr", "patroni"):
            assert service.inputs["spec"]["publishNotReadyAddresses"] is True
        if configured.cross_site_service_type == "LoadBalancer" and kind in ("etcd", "patroni", "app"):
            site = service.labels[LABEL_SITE]
            assert service.metadata["annotations"]["external-dns.alpha.kubernetes.io/hostname"] == (
                f"{name}.{configured.namespace_of(site)}.{configured.sites[site].service_domain}"
            )


@pytest.mark.parametrize("stack", STACKS)
def test_app_servers_and_gateways_probe_readyz_and_healthz(stack: str) -> None:
    run = run_of(stack)
    for declared in run.of_kind("Deployment"):
        if declared.labels[LABEL_KIND] not in ("app", "gateway"):
            continue
        (container,) = pod_spec(declared)["containers"]
        assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
        assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
        assert container["readinessProbe"]["httpGet"]["port"] == container["ports"][0]["name"]


# ---- sizing ---------------------------------------------------------------------------------------


def test_the_default_plan_states_the_cores_watertight_bench_predicts() -> None:
    # only the sites configured: every sizing key at its default
    configured = settings.parse({"sites": harness.stack_config("dev")["sites"]})
    plan = sizing.plan(configured, topology_of("dev"))
    assert configured.load.financial_tps == 10_000 and configured.load.nonfinancial_tps == 50_000
    assert plan.cores_total == pytest.approx(10_000 * 2776e-6 + 50_000 * 1084e-6, abs=0.01)
    app_cores = 10_000 * 2776e-6 * 648 / 2777 + 50_000 * 1084e-6 * 345 / 1085
    assert plan.app_replicas_per_center == math.ceil(app_cores / (1.0 * 0.7))
    assert plan.pods["total"] == sum(v for k, v in plan.pods.items() if k != "total")


def test_the_plan_follows_the_configured_cost_and_load() -> None:
    base = harness.stack_config("dev")
    topology = topology_of("dev")
    one_x = sizing.plan(
        settings.parse(
            {**base, "sizing": {"replicasMin": 1}, "load": {"financialTps": 10000, "nonfinancialTps": 0}}
        ),
        topology,
    )
    costlier = sizing.plan(
        settings.parse(
            {
                **base,
                "sizing": {"replicasMin": 1},
                "load": {"financialTps": 10000, "nonfinancialTps": 0},
                "cpuCost": {"financialUs": 5552},
            }
        ),
        topology,
    )
    half = sizing.plan(
        settings.parse(
            {
                **base,
                "sizing": {"replicasMin": 1, "eachCenterCarriesFullLoad": False},
                "load": {"financialTps": 10000, "nonfinancialTps": 0},
            }
        ),
        topology,
    )
    assert costlier.cores_total == pytest.approx(2 * one_x.cores_total, abs=0.02)
    assert costlier.app_replicas_per_center >= 2 * one_x.app_replicas_per_center - 1
    assert half.app_replicas_per_center == math.ceil(one_x.cores_by_kind["app"] / 2 / (0.5 * 0.7) - 1e-9)


@pytest.mark.parametrize("stack", STACKS)
def test_deployments_and_autoscalers_carry_the_plan(stack: str) -> None:
    run = run_of(stack)
    plan = run.outputs["plan"]
    expected = {"app": plan["app_replicas_per_center"], "gateway": plan["gateway_replicas_per_center"]}
    maximum = {"app": plan["app_replicas_max_per_center"], "gateway": plan["gateway_replicas_max_per_center"]}
    for site in CENTERS:
        for kind in ("app", "gateway"):
            deployment = workload(run, "Deployment", f"{kind}-{site}", site)
            assert deployment.inputs["spec"]["replicas"] == expected[kind]
            hpa = workload(run, "HorizontalPodAutoscaler", f"{kind}-{site}", site)
            assert hpa.inputs["spec"]["minReplicas"] == expected[kind]
            assert hpa.inputs["spec"]["maxReplicas"] == maximum[kind] > expected[kind]
            assert hpa.inputs["spec"]["scaleTargetRef"]["name"] == f"{kind}-{site}"
    # dr's app servers and gateway wait for the activate-dr runbook, as in the local runtime
    for kind in ("app", "gateway"):
        assert workload(run, "Deployment", f"{kind}-dr", "dr").inputs["spec"]["replicas"] == 0
    assert not [h for h in run.of_kind("HorizontalPodAutoscaler") if h.labels[LABEL_SITE] == "dr"]
    dr_gateway = parse_gateway(
        workload(run, "ConfigMap", "gateway-dr-settings", "dr").inputs["data"]["gateway.json"]
    )
    assert {url for urls in dr_gateway.upstreams.values() for url in urls} == {run.outputs["dr_app_url"]}
    pods = sum(r.inputs["spec"]["replicas"] for r in run.of_kind("Deployment") + run.of_kind("StatefulSet"))
    assert pods == plan["pods"]["total"]
    configured = settings_of(stack)
    if configured.locust.enabled:
        total_tps = configured.load.financial_tps + configured.load.nonfinancial_tps
        workers = workload(run, "Deployment", "locust-worker", configured.locust.site)
        assert workers.inputs["spec"]["replicas"] == max(
            1, math.ceil(total_tps / configured.locust.requests_per_second_per_worker)
        )
    else:
        assert not [r for r in run.kubernetes() if r.labels[LABEL_KIND].startswith("locust")]


def test_the_chaos_target_configuration_is_a_stack_output() -> None:
    run = run_of("prod")
    configured = settings_of("prod")
    chaos = run.outputs["chaos_configuration"]
    assert chaos["kube_contexts"] == {s: configured.sites[s].context for s in SITE_NAMES}
    assert chaos["site_cidrs"] == {s: configured.sites[s].networks for s in SITE_NAMES}
    assert chaos["entry_url"] == configured.entry_url


# ---- monitoring -----------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_monitoring_objects_exist_only_when_the_crds_are_present(stack: str) -> None:
    run = run_of(stack)
    present = settings_of(stack).monitoring.crds_present
    monitors = run.of_kind("ServiceMonitor")
    rules = run.of_kind("PrometheusRule")
    dashboards = [c for c in run.of_kind("ConfigMap") if "watertight.json" in (c.inputs.get("data") or {})]
    assert len(monitors) == len(rules) == len(dashboards) == (3 if present else 0)
    for rule in rules:
        # the very rules the local Prometheus loads (watertight.monitoring.rules)
        assert rule.inputs["spec"] == {"groups": monitoring_rules.rule_groups(topology_of(stack))}
        assert settings_of(stack).monitoring.rule_labels.items() <= rule.labels.items()
    for dashboard in dashboards:
        assert json.loads(dashboard.inputs["data"]["watertight.json"])["panels"]


# ---- settings -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stack", STACKS)
def test_stack_files_use_only_keys_the_program_reads(stack: str) -> None:
    assert set(harness.stack_config(stack)) <= set(settings.key_names())


def test_a_wrong_key_fails_naming_it() -> None:
    base = harness.stack_config("dev")
    with pytest.raises(settings.SettingsError, match="sizing"):
        settings.parse({**base, "sizing": {"targetCpuUtilisation": 0.5}})
    with pytest.raises(settings.SettingsError, match=r"sites\.dr\.networks"):
        settings.parse({**base, "sites": {**base["sites"], "dr": {**base["sites"]["dr"], "networks": []}}})
    with pytest.raises(settings.SettingsError, match="sites"):
        settings.parse({**base, "sites": {k: v for k, v in base["sites"].items() if k != "dr"}})
    with pytest.raises(settings.SettingsError, match="namespace"):
        settings.parse({**base, "namespace": "Not_A_Label"})
