"""The kubernetes target without a cluster: which context, namespace and labels each fault
selects, what it asks of chaostoolkit-kubernetes (a fake module records the calls), and errors
that say plainly what is missing."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from typing import Any

import pytest

from watertight.chaos import actions, kubernetes, probes
from watertight.chaos.kubernetes import KubernetesTargetError, Selection

CONFIGURATION: dict[str, Any] = {
    "kube_contexts": {"prod": "ctx-prod", "samecity": "ctx-samecity", "dr": "ctx-dr"},
    "kube_namespace": "cards",
    "site_cidrs": {"prod": ["10.1.0.0/16"], "samecity": ["10.2.0.0/16"], "dr": "10.3.0.0/16"},
    "entry_url": "http://entry.example:8080",
}
PART = "app.kubernetes.io/part-of=watertight"


class Calls:
    def __init__(self) -> None:
        self.made: list[tuple[str, dict[str, Any]]] = []

    def recorder(self, name: str, answer: Any = None) -> Any:
        def record(**arguments: Any) -> Any:
            self.made.append((name, arguments))
            return answer(arguments) if callable(answer) else answer

        return record


@pytest.fixture
def chaosk8s(monkeypatch: pytest.MonkeyPatch) -> Iterator[Calls]:
    """A stand-in for chaostoolkit-kubernetes that records what it was asked."""
    calls = Calls()
    modules = {
        "chaosk8s": {},
        "chaosk8s.pod": {},
        "chaosk8s.pod.actions": {
            "terminate_pods": calls.recorder(
                "terminate_pods", lambda a: [f"pod-of-{a['secrets']['KUBERNETES_CONTEXT']}"]
            )
        },
        "chaosk8s.networking": {},
        "chaosk8s.networking.actions": {
            "create_network_policy": calls.recorder("create_network_policy"),
            "remove_network_policy": calls.recorder("remove_network_policy"),
        },
        "chaosk8s.chaosmesh": {},
        "chaosk8s.chaosmesh.network": {},
        "chaosk8s.chaosmesh.network.actions": {
            "add_latency": calls.recorder("add_latency"),
            "delete_network_fault": calls.recorder("delete_network_fault"),
        },
    }
    for name, members in modules.items():
        module = types.ModuleType(name)
        for key, value in members.items():
            setattr(module, key, value)
        monkeypatch.setitem(sys.modules, name, module)
    yield calls


def test_a_site_is_one_cluster_selected_by_its_context_and_site_label() -> None:
    (selection,) = kubernetes.select(CONFIGURATION, site="prod")
    assert selection == Selection("prod", "ctx-prod", "cards", f"{PART},watertight.io/site=prod")
    assert selection.secrets == {"KUBERNETES_CONTEXT": "ctx-prod"}


def test_a_cell_spans_every_site_that_holds_a_member() -> None:
    chosen = kubernetes.select(CONFIGURATION, cell=2, kind="patroni")
    assert [s.site for s in chosen] == ["prod", "samecity", "dr"]
    assert (
        chosen[0].label_selector
        == f"{PART},watertight.io/cell=2,watertight.io/kind=patroni,watertight.io/site=prod"
    )


@pytest.mark.parametrize(
    ("component", "site", "kind", "cell"),
    [
        ("etcd-samecity", "samecity", "etcd", None),
        ("etcd-dr-local", "dr", "etcd-dr", None),
        ("pg-cell12-dr", "dr", "patroni", 12),
        ("app-prod", "prod", "app", None),
        ("gateway-samecity", "samecity", "gateway", None),
    ],
)
def test_a_component_name_says_its_site_kind_and_cell(
    component: str, site: str, kind: str, cell: int | None
) -> None:
    assert kubernetes.parse_component(component) == (site, kind, cell)
    (selection,) = kubernetes.select(CONFIGURATION, component=component)
    assert selection.site == site and f"watertight.io/component={component}" in selection.label_selector


def test_the_labels_a_pod_carries_are_the_ones_selected() -> None:
    pod = kubernetes.labels("samecity", "patroni", cell=1, component="pg-cell1-samecity")
    (selection,) = kubernetes.select(CONFIGURATION, component="pg-cell1-samecity")
    wanted = dict(term.split("=") for term in selection.label_selector.split(","))
    assert wanted.items() <= pod.items()


@pytest.mark.parametrize(
    ("configuration", "call", "says"),
    [
        ({}, lambda c: kubernetes.select(c, site="prod"), "kube_contexts"),
        (
            {"kube_contexts": {"prod": "x"}},
            lambda c: kubernetes.select(c, site="dr"),
            "no context for site 'dr'",
        ),
        (CONFIGURATION, lambda c: kubernetes.select(c, site="moon"), "no site named 'moon'"),
        (CONFIGURATION, lambda c: kubernetes.select(c, component="entry"), "global load balancer"),
        (CONFIGURATION, lambda c: kubernetes.select(c, component="pg-cellx"), "no component named"),
        (CONFIGURATION, lambda c: kubernetes.select(c, component="app-moon"), "no site named 'moon'"),
        ({"kube_contexts": {"prod": "x"}}, lambda c: kubernetes.partition(c, "prod"), "site_cidrs"),
        ({}, kubernetes.entry_url, "entry_url"),
    ],
)
def test_what_is_missing_is_named(
    configuration: dict[str, Any], call: Any, says: str, chaosk8s: Calls
) -> None:
    with pytest.raises(KubernetesTargetError, match=says):
        call(configuration)


def test_without_chaostoolkit_kubernetes_the_error_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, "chaosk8s", None)
    with pytest.raises(KubernetesTargetError, match="pip install chaostoolkit-kubernetes"):
        actions.kill_site("prod", target="kubernetes", configuration=CONFIGURATION)


def test_kill_site_deletes_every_pod_of_the_sites_cluster_without_grace(chaosk8s: Calls) -> None:
    result = actions.kill_site("prod", target="kubernetes", configuration=CONFIGURATION)
    assert result == {"site": "prod", "killed": ["prod/pod-of-ctx-prod"]}
    ((name, arguments),) = chaosk8s.made
    assert name == "terminate_pods"
    assert arguments == {
        "label_selector": f"{PART},watertight.io/site=prod",
        "all": True,
        "grace_period": 0,
        "ns": "cards",
        "secrets": {"KUBERNETES_CONTEXT": "ctx-prod"},
    }


def test_kill_cell_kills_its_members_in_both_centers_and_spares_dr(chaosk8s: Calls) -> None:
    result = actions.kill_cell(1, target="kubernetes", configuration=CONFIGURATION)
    assert result["killed"] == ["prod/pod-of-ctx-prod", "samecity/pod-of-ctx-samecity"]
    selectors = [arguments["label_selector"] for _, arguments in chaosk8s.made]
    assert all("watertight.io/cell=1" in s and "watertight.io/kind=patroni" in s for s in selectors)
    actions.kill_cell(1, include_dr=True, target="kubernetes", configuration=CONFIGURATION)
    assert len(chaosk8s.made) == 5


def test_kill_component_and_etcd_member_select_one_component(chaosk8s: Calls) -> None:
    actions.kill_component("gateway-samecity", target="kubernetes", configuration=CONFIGURATION)
    actions.kill_etcd_member("dr", target="kubernetes", configuration=CONFIGURATION)
    selectors = [arguments["label_selector"] for _, arguments in chaosk8s.made]
    assert "watertight.io/component=gateway-samecity" in selectors[0] and "site=samecity" in selectors[0]
    assert "watertight.io/component=etcd-dr" in selectors[1] and chaosk8s.made[1][1]["ns"] == "cards"


def test_partition_cuts_the_other_sites_networks_with_a_network_policy(chaosk8s: Calls) -> None:
    result = actions.partition_site("prod", target="kubernetes", configuration=CONFIGURATION)
    assert result["context"] == "ctx-prod"
    ((name, arguments),) = chaosk8s.made
    assert name == "create_network_policy" and arguments["secrets"] == {"KUBERNETES_CONTEXT": "ctx-prod"}
    spec = arguments["spec"]["spec"]
    assert spec["ingress"][0]["from"][0]["ipBlock"]["except"] == ["10.2.0.0/16", "10.3.0.0/16"]
    assert spec["egress"][0]["to"][0]["ipBlock"]["except"] == ["10.2.0.0/16", "10.3.0.0/16"]
    healed = actions.heal_partition(target="kubernetes", configuration=CONFIGURATION)
    assert healed == {"healed": ["prod", "samecity", "dr"]}


def test_latency_is_a_chaos_mesh_delay_toward_the_other_chosen_sites(chaosk8s: Calls) -> None:
    actions.add_latency(20, ["prod", "samecity"], target="kubernetes", configuration=CONFIGURATION)
    assert [(n, a["secrets"]["KUBERNETES_CONTEXT"], a["external_targets"]) for n, a in chaosk8s.made] == [
        ("add_latency", "ctx-prod", ["10.2.0.0/16"]),
        ("add_latency", "ctx-samecity", ["10.1.0.0/16"]),
    ]
    assert chaosk8s.made[0][1]["latency"] == "20ms"
    actions.remove_latency(target="kubernetes", configuration=CONFIGURATION)
    assert [n for n, _ in chaosk8s.made[2:]] == ["delete_network_fault"] * 3


@pytest.mark.parametrize(
    "call",
    [
        lambda: actions.freeze_site("prod", target="kubernetes"),
        lambda: actions.kill_cell_primary(1, target="kubernetes"),
        lambda: probes.writable_primaries(1, target="kubernetes"),
        lambda: probes.every_cell_has_leader_and_sync_standby(target="kubernetes"),
    ],
)
def test_what_the_kubernetes_target_cannot_do_yet_is_said_plainly(call: Any) -> None:
    with pytest.raises(KubernetesTargetError, match="not available on target kubernetes: it needs"):
        call()


def test_an_unknown_target_names_the_known_ones() -> None:
    with pytest.raises(ValueError, match="local, kubernetes"):
        actions.kill_site("prod", target="docker")
