"""Small builders of typed Kubernetes arguments every workload of the topology shares: metadata
with the topology's labels, the restricted security context, probes, requests = limits, topology
spread, PodDisruptionBudgets, Services and NetworkPolicy rules.

Owns: the conventions (labels from ``watertight.kube_names``, so the chaos target finds every
pod; non-root; read-only root filesystem). Never: declare a resource (callers do, with
their site's provider and their component as parent).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import pulumi
from pulumi_kubernetes.core import v1 as core
from pulumi_kubernetes.meta import v1 as meta
from pulumi_kubernetes.networking import v1 as networking
from pulumi_kubernetes.policy import v1 as policy
from pulumi_kubernetes.policy import v1beta1 as policy_v1beta1

from watertight.kube_names import (
    ANNOTATION_CONFIG_CHECKSUM,
    LABEL_CELL,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_MANAGED_BY,
    LABEL_PART_OF,
    LABEL_SITE,
    MANAGED_BY,
    PART_OF,
)
from watertight.kube_names import labels as topology_labels
from watertight_infra.settings import PDB_V1_SINCE, PodSize

__all__ = ["ANNOTATION_CONFIG_CHECKSUM"]
ZONE_KEY = "topology.kubernetes.io/zone"
HOST_KEY = "kubernetes.io/hostname"
TMP_VOLUME = "tmp"
TMP_SIZE_LIMIT = "256Mi"


def labels(site: str, kind: str, cell: int | None = None, component: str | None = None) -> dict[str, str]:
    """The chaos target's labels plus who manages the object."""
    return {**topology_labels(site, kind, cell, component), LABEL_MANAGED_BY: MANAGED_BY}


def selector_labels(site: str, component: str) -> dict[str, str]:
    """What a workload's selector, its Service and its PDB match: one component of one site."""
    return {LABEL_PART_OF: PART_OF, LABEL_SITE: site, LABEL_COMPONENT: component}


def kind_selector(kind: str, cell: int | None = None) -> meta.LabelSelectorArgs:
    match = {LABEL_PART_OF: PART_OF, LABEL_KIND: kind}
    if cell is not None:
        match[LABEL_CELL] = str(cell)
    return meta.LabelSelectorArgs(match_labels=match)


def metadata(
    name: str,
    namespace: pulumi.Input[str] | None,
    object_labels: Mapping[str, str],
    annotations: Mapping[str, str] | None = None,
) -> meta.ObjectMetaArgs:
    return meta.ObjectMetaArgs(
        name=name,
        namespace=namespace,
        labels=dict(object_labels),
        annotations=dict(annotations) if annotations else None,
    )


def checksum(*texts: str) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode())
    return digest.hexdigest()


def resources(size: PodSize) -> core.ResourceRequirementsArgs:
    amounts = {"cpu": f"{size.cpu_millis}m", "memory": f"{size.memory_mib}Mi"}
    return core.ResourceRequirementsArgs(requests=dict(amounts), limits=dict(amounts))


def pod_security(user_id: int) -> core.PodSecurityContextArgs:
    return core.PodSecurityContextArgs(
        run_as_non_root=True,
        run_as_user=user_id,
        run_as_group=user_id,
        fs_group=user_id,
        seccomp_profile=core.SeccompProfileArgs(type="RuntimeDefault"),
    )


def container_security() -> core.SecurityContextArgs:
    return core.SecurityContextArgs(
        run_as_non_root=True,
        read_only_root_filesystem=True,
        allow_privilege_escalation=False,
        capabilities=core.CapabilitiesArgs(drop=["ALL"]),
    )


def http_probe(
    path: str, port: str, period_s: int, failure_threshold: int, initial_delay_s: int = 0
) -> core.ProbeArgs:
    return core.ProbeArgs(
        http_get=core.HTTPGetActionArgs(path=path, port=port),
        period_seconds=period_s,
        timeout_seconds=min(period_s, 2),
        failure_threshold=failure_threshold,
        initial_delay_seconds=initial_delay_s,
    )


def tcp_probe(port: str, period_s: int, failure_threshold: int) -> core.ProbeArgs:
    return core.ProbeArgs(
        tcp_socket=core.TCPSocketActionArgs(port=port),
        period_seconds=period_s,
        timeout_seconds=min(period_s, 2),
        failure_threshold=failure_threshold,
    )


def spread(site: str, component: str) -> list[core.TopologySpreadConstraintArgs]:
    """Pods of one component spread over zones and hosts of the site's cluster; best effort, so a
    small cluster still schedules them."""
    selector = meta.LabelSelectorArgs(match_labels=selector_labels(site, component))
    return [
        core.TopologySpreadConstraintArgs(
            max_skew=1, topology_key=key, when_unsatisfiable="ScheduleAnyway", label_selector=selector
        )
        for key in (ZONE_KEY, HOST_KEY)
    ]


def tmp_volume() -> core.VolumeArgs:
    return core.VolumeArgs(
        name=TMP_VOLUME, empty_dir=core.EmptyDirVolumeSourceArgs(size_limit=TMP_SIZE_LIMIT)
    )


def tmp_mount() -> core.VolumeMountArgs:
    return core.VolumeMountArgs(name=TMP_VOLUME, mount_path="/tmp")


def port(name: str, number: int) -> core.ContainerPortArgs:
    return core.ContainerPortArgs(name=name, container_port=number, protocol="TCP")


def service_spec(
    site: str,
    component: str,
    ports: Mapping[str, int],
    service_type: str,
    publish_not_ready: bool,
) -> core.ServiceSpecArgs:
    return core.ServiceSpecArgs(
        type=service_type,
        selector=selector_labels(site, component),
        ports=[
            core.ServicePortArgs(name=name, port=number, target_port=name, protocol="TCP")
            for name, number in ports.items()
        ],
        # members must reach each other before any is ready (etcd's quorum, a Patroni replica's
        # base backup); clients of a Service that is not ready find out by themselves
        publish_not_ready_addresses=publish_not_ready or None,
    )


def disruption_budget(
    resource_name: str,
    metadata: meta.ObjectMetaArgs,
    site: str,
    component: str,
    min_available: int | None,
    max_unavailable: int | None,
    kubernetes_minor: int,
    opts: pulumi.ResourceOptions,
) -> pulumi.CustomResource:
    """A PodDisruptionBudget selecting one component's pods: policy/v1, or on a cluster older
    than 1.21 (``kubernetesVersion``) policy/v1beta1, whose spec has the same fields."""
    module = policy if kubernetes_minor >= PDB_V1_SINCE else policy_v1beta1
    return module.PodDisruptionBudget(
        resource_name,
        metadata=metadata,
        spec=module.PodDisruptionBudgetSpecArgs(
            selector=meta.LabelSelectorArgs(match_labels=selector_labels(site, component)),
            min_available=min_available,
            max_unavailable=max_unavailable,
        ),
        opts=opts,
    )


# ---- NetworkPolicy rules --------------------------------------------------------------------------


def ports_of(*numbers: int) -> list[networking.NetworkPolicyPortArgs]:
    return [networking.NetworkPolicyPortArgs(port=number, protocol="TCP") for number in numbers]


def from_kind(kind: str, cell: int | None = None) -> networking.NetworkPolicyPeerArgs:
    """Pods of one kind in this namespace (of this site's cluster)."""
    return networking.NetworkPolicyPeerArgs(pod_selector=kind_selector(kind, cell))


def from_networks(cidrs: Sequence[str]) -> list[networking.NetworkPolicyPeerArgs]:
    """Pods of the other sites: another cluster's pods are seen by their addresses only."""
    return [networking.NetworkPolicyPeerArgs(ip_block=networking.IPBlockArgs(cidr=cidr)) for cidr in cidrs]


def from_namespace(namespace: str) -> networking.NetworkPolicyPeerArgs:
    return networking.NetworkPolicyPeerArgs(
        namespace_selector=meta.LabelSelectorArgs(match_labels={"kubernetes.io/metadata.name": namespace})
    )


def ingress(
    peers: Sequence[networking.NetworkPolicyPeerArgs] | None, *numbers: int
) -> networking.NetworkPolicyIngressRuleArgs:
    """Allow ``numbers`` from ``peers``; ``None`` means from anywhere (only gateways use it)."""
    if peers is not None and not peers:
        raise ValueError("an ingress rule with an empty peer list would admit everyone")
    return networking.NetworkPolicyIngressRuleArgs(
        from_=list(peers) if peers is not None else None, ports=ports_of(*numbers)
    )


def ingress_policy_spec(
    site: str, component: str, rules: Sequence[networking.NetworkPolicyIngressRuleArgs]
) -> networking.NetworkPolicySpecArgs:
    return networking.NetworkPolicySpecArgs(
        pod_selector=meta.LabelSelectorArgs(match_labels=selector_labels(site, component)),
        policy_types=["Ingress"],
        ingress=list(rules),
    )
