"""The kubernetes target of the chaos activities: one cluster per site, pods chosen by labels,
faults done through chaostoolkit-kubernetes (pods, NetworkPolicy, Chaos Mesh).

Owns: the label convention the Pulumi programs put on every pod, the choice of (kube context,
namespace, label selector) for a site / cell / component, and the calls into ``chaosk8s``.
Never: guess a context or a network it was not given; every missing piece is named in the error.

Configuration (Chaos Toolkit ``configuration`` of the experiment):

- ``kube_contexts``: ``{"prod": "ctx-a", "samecity": "ctx-b", "dr": "ctx-c"}``, one context per
  site (each site is its own cluster);
- ``kube_namespace``: the namespace of the topology in every cluster (default ``watertight``);
- ``kube_namespaces``: ``{"prod": "ns-a", ...}``, a site's own namespace where sites share a
  cluster (the local cluster of ``watertight cluster``); a site not named uses ``kube_namespace``;
- ``site_cidrs``: ``{"prod": ["10.1.0.0/16"], ...}``, the pod and node networks of each site, for
  partitions (NetworkPolicy) and latency (Chaos Mesh ``externalTargets``);
- ``entry_url``: the URL clients use (the global load balancer), for ``entry_answers``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from watertight.kube_names import (
    LABEL_CELL,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_PART_OF,
    LABEL_SITE,
    NAMESPACE_DEFAULT,
    PART_OF,
    labels,  # noqa: F401 - re-exported: the label convention's function, for callers of this target
)
from watertight.topology import SITE_NAMES

PARTITION_POLICY = "watertight-partition"
LATENCY_FAULT = "watertight-latency"
INSTALL_HINT = "pip install chaostoolkit-kubernetes (the kubernetes target's client)"

_COMPONENT = re.compile(
    r"^(?:(?P<etcd>etcd)-(?P<etcd_site>[a-z]+)|pg-cell(?P<cell>\d+)-(?P<pg_site>[a-z]+)"
    r"|(?P<kind>app|gateway)-(?P<site>[a-z]+))$"
)


class KubernetesTargetError(RuntimeError):
    """The kubernetes target lacks a setting, a client or a capability; the message names it."""


@dataclass(frozen=True)
class Selection:
    """Pods of one cluster: which context, namespace and label selector."""

    site: str
    context: str
    namespace: str
    label_selector: str

    @property
    def secrets(self) -> dict[str, str]:
        """What chaosk8s reads to pick the cluster (its ``create_k8s_api_client``)."""
        return {"KUBERNETES_CONTEXT": self.context}


def parse_component(component: str) -> tuple[str, str, int | None]:
    """(site, kind, cell) of a component name: etcd-<site>, etcd-dr-local, pg-cell<N>-<site>,
    app-<site>, gateway-<site>."""
    if component == "etcd-dr-local":
        return "dr", "etcd-dr", None
    if component == "entry":
        raise KubernetesTargetError(
            "the entry stands for the bank's global load balancer; on kubernetes it is not a pod of the topology"
        )
    match = _COMPONENT.match(component)
    if match is None:
        raise KubernetesTargetError(
            f"no component named {component!r}; names are etcd-<site>, etcd-dr-local, pg-cell<N>-<site>, app-<site>, gateway-<site>"
        )
    if match["etcd"]:
        site, kind, cell = match["etcd_site"], "etcd", None
    elif match["cell"]:
        site, kind, cell = match["pg_site"], "patroni", int(match["cell"])
    else:
        site, kind, cell = match["site"], match["kind"], None
    if site not in SITE_NAMES:
        raise KubernetesTargetError(
            f"component {component!r}: no site named {site!r}; sites are {', '.join(SITE_NAMES)}"
        )
    return site, kind, cell


def _contexts(configuration: Mapping[str, Any] | None) -> dict[str, str]:
    contexts = (configuration or {}).get("kube_contexts")
    if not isinstance(contexts, Mapping) or not contexts:
        raise KubernetesTargetError(
            'target kubernetes needs the configuration key kube_contexts: {"prod": "<context>", "samecity": "<context>", "dr": "<context>"}'
        )
    return {str(k): str(v) for k, v in contexts.items()}


def select(
    configuration: Mapping[str, Any] | None,
    site: str | None = None,
    cell: int | None = None,
    component: str | None = None,
    kind: str | None = None,
) -> list[Selection]:
    """The pods a selection names, one Selection per cluster involved."""
    if site is not None and site not in SITE_NAMES:
        raise KubernetesTargetError(f"no site named {site!r}; sites are {', '.join(SITE_NAMES)}")
    contexts = _contexts(configuration)
    namespace = str((configuration or {}).get("kube_namespace") or NAMESPACE_DEFAULT)
    namespaces = (configuration or {}).get("kube_namespaces") or {}
    terms = {LABEL_PART_OF: PART_OF}
    sites = [site] if site is not None else list(SITE_NAMES)
    if component is not None:
        component_site, component_kind, _ = parse_component(component)
        if site is not None and site != component_site:
            raise KubernetesTargetError(f"component {component} is not in site {site}")
        sites = [component_site]
        terms[LABEL_COMPONENT] = component
        kind = kind or component_kind
    if cell is not None:
        terms[LABEL_CELL] = str(cell)
    if kind is not None:
        terms[LABEL_KIND] = kind
    chosen = []
    for name in sites:
        if name not in contexts:
            raise KubernetesTargetError(f"configuration kube_contexts has no context for site {name!r}")
        selector = ",".join(f"{key}={value}" for key, value in {**terms, LABEL_SITE: name}.items())
        chosen.append(Selection(name, contexts[name], str(namespaces.get(name) or namespace), selector))
    return chosen


def _chaosk8s(module: str) -> ModuleType:
    try:
        return importlib.import_module(f"chaosk8s.{module}")
    except ImportError:
        raise KubernetesTargetError(
            f"target kubernetes needs chaostoolkit-kubernetes: {INSTALL_HINT}"
        ) from None


def terminate(selections: list[Selection], grace_period_s: int = 0) -> list[str]:
    """Delete the selected pods (grace 0: the machine is gone; their controllers recreate them).
    Returns ``<site>/<pod>`` for each pod deleted."""
    pods = _chaosk8s("pod.actions")
    deleted: list[str] = []
    for selection in selections:
        names = pods.terminate_pods(
            label_selector=selection.label_selector,
            all=True,
            grace_period=grace_period_s,
            ns=selection.namespace,
            secrets=selection.secrets,
        )
        deleted.extend(f"{selection.site}/{name}" for name in names or [])
    return deleted


def unsupported(what: str, needs: str) -> KubernetesTargetError:
    return KubernetesTargetError(f"{what} is not available on target kubernetes: it needs {needs}")


def _cidrs(configuration: Mapping[str, Any] | None, sites: list[str]) -> list[str]:
    configured = (configuration or {}).get("site_cidrs")
    if not isinstance(configured, Mapping):
        raise KubernetesTargetError(
            'target kubernetes needs the configuration key site_cidrs: {"prod": ["10.1.0.0/16"], ...} for network faults'
        )
    found: list[str] = []
    for site in sites:
        if site not in configured:
            raise KubernetesTargetError(f"configuration site_cidrs has no networks for site {site!r}")
        value = configured[site]
        found.extend([value] if isinstance(value, str) else [str(v) for v in value])
    return found


def partition_policy(others_cidrs: list[str]) -> dict[str, Any]:
    """A NetworkPolicy for every pod of the topology in one cluster: traffic inside the cluster and
    to anything but the other sites' networks stays allowed; the other sites are cut both ways."""
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


def partition(configuration: Mapping[str, Any] | None, site: str) -> dict[str, Any]:
    """Cut ``site``'s cluster off from the other sites with a NetworkPolicy (needs a CNI that
    enforces NetworkPolicy with ipBlock)."""
    (selection,) = select(configuration, site=site)
    others = [s for s in SITE_NAMES if s != site]
    policy = partition_policy(_cidrs(configuration, others))
    _chaosk8s("networking.actions").create_network_policy(
        spec=policy, ns=selection.namespace, secrets=selection.secrets
    )
    return {"site": site, "policy": PARTITION_POLICY, "context": selection.context}


def heal_partition(configuration: Mapping[str, Any] | None) -> list[str]:
    healed = []
    actions = _chaosk8s("networking.actions")
    for selection in select(configuration):
        try:
            actions.remove_network_policy(
                name=PARTITION_POLICY, ns=selection.namespace, secrets=selection.secrets
            )
            healed.append(selection.site)
        except Exception as error:  # not found is healed already; anything else is said
            if "not found" not in str(error).lower() and "404" not in str(error):
                raise
    return healed


def add_latency(configuration: Mapping[str, Any] | None, delay_ms: int, sites: list[str]) -> list[str]:
    """Chaos Mesh NetworkChaos (delay) in each chosen site's cluster, toward the other chosen
    sites' networks (needs Chaos Mesh installed in the clusters)."""
    actions = _chaosk8s("chaosmesh.network.actions")
    done = []
    for selection in [s for site in sites for s in select(configuration, site=site)]:
        others = [s for s in sites if s != selection.site]
        actions.add_latency(
            name=LATENCY_FAULT,
            ns=selection.namespace,
            label_selectors=f"{LABEL_PART_OF}={PART_OF}",
            mode="all",
            direction="to",
            latency=f"{delay_ms}ms",
            external_targets=_cidrs(configuration, others),
            secrets=selection.secrets,
        )
        done.append(selection.site)
    return done


def remove_latency(configuration: Mapping[str, Any] | None) -> list[str]:
    actions = _chaosk8s("chaosmesh.network.actions")
    removed = []
    for selection in select(configuration):
        try:
            actions.delete_network_fault(
                name=LATENCY_FAULT, ns=selection.namespace, secrets=selection.secrets
            )
            removed.append(selection.site)
        except Exception as error:
            if "not found" not in str(error).lower() and "404" not in str(error):
                raise
    return removed


def entry_url(configuration: Mapping[str, Any] | None) -> str:
    url = (configuration or {}).get("entry_url")
    if not url:
        raise KubernetesTargetError(
            "target kubernetes needs the configuration key entry_url (the URL clients use)"
        )
    return str(url)
