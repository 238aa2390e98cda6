"""CrossGuard policies for what the program puts on the clusters (the pack is infra/policy/):
requests and limits, probes, a PodDisruptionBudget per workload, non-root, read-only root
filesystem.

Owns: the validate functions (plain functions over a resource's type and properties, so tests
call them directly) and the pack's policy list. Never: change a resource (no remediation): a
violation is for the author to fix in the program.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)

PACK_NAME = "watertight"
WORKLOAD_TYPES = (
    "kubernetes:apps/v1:Deployment",
    "kubernetes:apps/v1:StatefulSet",
    "kubernetes:apps/v1:DaemonSet",
)
# policy/v1beta1 on clusters older than 1.21 (kubernetesVersion)
PDB_TYPES = ("kubernetes:policy/v1:PodDisruptionBudget", "kubernetes:policy/v1beta1:PodDisruptionBudget")
RESOURCE_NAMES = ("cpu", "memory")


def _pod_spec(props: Mapping[str, Any]) -> Mapping[str, Any]:
    return ((props.get("spec") or {}).get("template") or {}).get("spec") or {}


def _pod_labels(props: Mapping[str, Any]) -> Mapping[str, str]:
    return (((props.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def _containers(props: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    spec = _pod_spec(props)
    yield from spec.get("initContainers") or []
    yield from spec.get("containers") or []


def _name(props: Mapping[str, Any]) -> str:
    return str((props.get("metadata") or {}).get("name") or "?")


def requests_and_limits(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every container states CPU and memory requests and limits: the sizing counts on them and
    a pod without limits can starve a cell's database on the same node."""
    if args.resource_type not in WORKLOAD_TYPES:
        return
    for container in _containers(args.props):
        resources = container.get("resources") or {}
        for section in ("requests", "limits"):
            missing = [name for name in RESOURCE_NAMES if not (resources.get(section) or {}).get(name)]
            if missing:
                report_violation(
                    f"{_name(args.props)}: container {container.get('name')} has no {section} for {', '.join(missing)}",
                    None,
                )


def probes(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every container that serves a port has a readiness and a liveness probe: Services and
    gateways route by readiness, the kubelet restarts by liveness."""
    if args.resource_type not in WORKLOAD_TYPES:
        return
    for container in _spec_containers(args.props):
        if not container.get("ports"):
            continue
        for probe in ("readinessProbe", "livenessProbe"):
            if not container.get(probe):
                report_violation(
                    f"{_name(args.props)}: container {container.get('name')} has no {probe}", None
                )


def _spec_containers(props: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return list(_pod_spec(props).get("containers") or [])


def run_as_non_root(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """No container runs as root: runAsNonRoot on the pod or the container, and no runAsUser 0."""
    if args.resource_type not in WORKLOAD_TYPES:
        return
    pod_security = _pod_spec(args.props).get("securityContext") or {}
    for container in _containers(args.props):
        security = container.get("securityContext") or {}
        non_root = security.get("runAsNonRoot", pod_security.get("runAsNonRoot"))
        user = security.get("runAsUser", pod_security.get("runAsUser"))
        if non_root is not True:
            report_violation(f"{_name(args.props)}: container {container.get('name')} may run as root", None)
        elif user == 0:
            report_violation(f"{_name(args.props)}: container {container.get('name')} runs as user 0", None)


def read_only_root_filesystem(args: ResourceValidationArgs, report_violation: ReportViolation) -> None:
    """Every container's root filesystem is read-only; what it writes goes to a named volume."""
    if args.resource_type not in WORKLOAD_TYPES:
        return
    for container in _containers(args.props):
        if (container.get("securityContext") or {}).get("readOnlyRootFilesystem") is not True:
            report_violation(
                f"{_name(args.props)}: container {container.get('name')} has a writable root filesystem", None
            )


def _selects(selector: Mapping[str, Any], labels: Mapping[str, str]) -> bool:
    match = selector.get("matchLabels") or {}
    if not match and not selector.get("matchExpressions"):
        return False  # an empty selector in a PDB selects nothing useful; call it no budget
    if any(labels.get(key) != value for key, value in match.items()):
        return False
    for expression in selector.get("matchExpressions") or []:
        key, operator, values = (
            expression.get("key"),
            expression.get("operator"),
            expression.get("values") or [],
        )
        if operator == "In" and labels.get(key) not in values:
            return False
        if operator == "NotIn" and labels.get(key) in values:
            return False
        if operator == "Exists" and key not in labels:
            return False
        if operator == "DoesNotExist" and key in labels:
            return False
    return True


def _provider_urn(resource: Any) -> str | None:
    provider = getattr(resource, "provider", None)
    return getattr(provider, "urn", None) if provider is not None else None


def disruption_budgets(args: StackValidationArgs, report_violation: ReportViolation) -> None:
    """Every Deployment and StatefulSet has a PodDisruptionBudget in its cluster and namespace
    that selects its pods: a node drain must not take a cell's members or every app server."""
    budgets = [r for r in args.resources if r.resource_type in PDB_TYPES]
    for workload in args.resources:
        if workload.resource_type not in WORKLOAD_TYPES:
            continue
        props = workload.props
        namespace = (props.get("metadata") or {}).get("namespace")
        labels = _pod_labels(props)
        covered = any(
            (budget.props.get("metadata") or {}).get("namespace") == namespace
            and _provider_urn(budget) == _provider_urn(workload)
            and _selects((budget.props.get("spec") or {}).get("selector") or {}, labels)
            for budget in budgets
        )
        if not covered:
            report_violation(
                f"{_name(props)} ({workload.resource_type}): no PodDisruptionBudget selects its pods", None
            )


POLICIES: list[ResourceValidationPolicy | StackValidationPolicy] = [
    ResourceValidationPolicy(
        name="watertight-requests-and-limits",
        description="Every container states CPU and memory requests and limits.",
        validate=requests_and_limits,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="watertight-probes",
        description="Every container that serves a port has readiness and liveness probes.",
        validate=probes,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    StackValidationPolicy(
        name="watertight-pod-disruption-budgets",
        description="Every Deployment and StatefulSet has a PodDisruptionBudget selecting its pods.",
        validate=disruption_budgets,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="watertight-run-as-non-root",
        description="No container runs as root.",
        validate=run_as_non_root,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="watertight-read-only-root-filesystem",
        description="Every container's root filesystem is read-only.",
        validate=read_only_root_filesystem,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
