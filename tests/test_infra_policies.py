"""The CrossGuard policies of infra/policy/, called directly: what the program declares for every
stack passes them, and each policy reports the object it exists to stop."""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Any

import pytest

from watertight_infra import harness, policies

STACKS = harness.stack_names()


@dataclass
class FakeProvider:
    urn: str


@dataclass
class FakeResource:
    """What a policy reads of ResourceValidationArgs / PolicyResource."""

    resource_type: str
    props: dict[str, Any]
    urn: str
    name: str
    provider: FakeProvider | None = None


@dataclass
class FakeStack:
    resources: list[FakeResource] = field(default_factory=list)


@functools.cache
def resources_of(stack: str) -> tuple[FakeResource, ...]:
    return tuple(
        FakeResource(
            d.type, d.inputs, d.urn, d.name, FakeProvider(d.provider) if d.provider is not None else None
        )
        for d in harness.run(stack).kubernetes()
    )


RESOURCE_POLICIES = {
    "requests_and_limits": policies.requests_and_limits,
    "probes": policies.probes,
    "run_as_non_root": policies.run_as_non_root,
    "read_only_root_filesystem": policies.read_only_root_filesystem,
}


def violations_of(check: Any, resource: FakeResource) -> list[str]:
    found: list[str] = []
    check(resource, lambda message, urn=None: found.append(message))
    return found


def stack_violations(resources: list[FakeResource]) -> list[str]:
    found: list[str] = []
    policies.disruption_budgets(FakeStack(resources), lambda message, urn=None: found.append(message))
    return found


def first(stack: str, kind: str, component: str) -> FakeResource:
    return next(
        r for r in resources_of(stack) if r.props["kind"] == kind and r.props["metadata"]["name"] == component
    )


def with_change(resource: FakeResource, change: Any) -> FakeResource:
    props = copy.deepcopy(resource.props)
    change(props)
    return FakeResource(resource.resource_type, props, resource.urn, resource.name, resource.provider)


def container(props: dict[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = props["spec"]["template"]["spec"]["containers"][0]
    return found


def test_the_pack_holds_every_policy() -> None:
    names = {policy.name for policy in policies.POLICIES}
    assert names == {
        "watertight-requests-and-limits",
        "watertight-probes",
        "watertight-pod-disruption-budgets",
        "watertight-run-as-non-root",
        "watertight-read-only-root-filesystem",
    }


@pytest.mark.parametrize("stack", STACKS)
@pytest.mark.parametrize("policy", sorted(RESOURCE_POLICIES))
def test_what_the_program_declares_passes_every_resource_policy(stack: str, policy: str) -> None:
    workloads = [r for r in resources_of(stack) if r.resource_type in policies.WORKLOAD_TYPES]
    assert len(workloads) >= 10
    for resource in workloads:
        assert violations_of(RESOURCE_POLICIES[policy], resource) == [], resource.name


@pytest.mark.parametrize("stack", STACKS)
def test_every_workload_of_the_program_has_a_disruption_budget(stack: str) -> None:
    assert stack_violations(list(resources_of(stack))) == []


def test_a_container_without_limits_is_reported() -> None:
    app = first("dev", "Deployment", "app-prod")
    bad = with_change(app, lambda p: container(p)["resources"].pop("limits"))
    assert violations_of(policies.requests_and_limits, bad) == [
        "app-prod: container app has no limits for cpu, memory"
    ]
    no_memory = with_change(app, lambda p: container(p)["resources"]["requests"].pop("memory"))
    assert len(violations_of(policies.requests_and_limits, no_memory)) == 1


def test_a_serving_container_without_a_readiness_probe_is_reported() -> None:
    member = first("dev", "StatefulSet", "pg-cell1-prod")
    bad = with_change(member, lambda p: container(p).pop("readinessProbe"))
    assert violations_of(policies.probes, bad) == ["pg-cell1-prod: container patroni has no readinessProbe"]
    no_liveness = with_change(member, lambda p: container(p).pop("livenessProbe"))
    assert violations_of(policies.probes, no_liveness) == [
        "pg-cell1-prod: container patroni has no livenessProbe"
    ]


def test_a_container_that_may_run_as_root_is_reported() -> None:
    etcd = first("dev", "StatefulSet", "etcd-prod")

    def root(props: dict[str, Any]) -> None:
        props["spec"]["template"]["spec"]["securityContext"].pop("runAsNonRoot")
        container(props)["securityContext"].pop("runAsNonRoot")

    assert violations_of(policies.run_as_non_root, with_change(etcd, root)) == [
        "etcd-prod: container etcd may run as root"
    ]
    uid_zero = with_change(etcd, lambda p: container(p)["securityContext"].update(runAsUser=0))
    assert violations_of(policies.run_as_non_root, uid_zero) == ["etcd-prod: container etcd runs as user 0"]


def test_a_writable_root_filesystem_is_reported_for_init_containers_too() -> None:
    standby = first("dev", "StatefulSet", "pg-cell1-samecity")  # cell 1 leads from prod
    bad = with_change(
        standby,
        lambda p: p["spec"]["template"]["spec"]["initContainers"][0]["securityContext"].update(
            readOnlyRootFilesystem=False
        ),
    )
    assert violations_of(policies.read_only_root_filesystem, bad) == [
        "pg-cell1-samecity: container wait-for-leader has a writable root filesystem"
    ]


def test_a_workload_without_its_disruption_budget_is_reported() -> None:
    resources = list(resources_of("dev"))
    without = [
        r
        for r in resources
        if not (
            r.props["kind"] == "PodDisruptionBudget" and r.props["metadata"]["name"] == "gateway-samecity"
        )
    ]
    assert len(without) == len(resources) - 1
    assert stack_violations(without) == [
        "gateway-samecity (kubernetes:apps/v1:Deployment): no PodDisruptionBudget selects its pods"
    ]


def test_a_budget_in_another_cluster_does_not_count() -> None:
    resources = list(resources_of("dev"))
    moved = []
    for r in resources:
        if r.props["kind"] == "PodDisruptionBudget" and r.props["metadata"]["name"] == "etcd-dr":
            r = FakeResource(r.resource_type, r.props, r.urn, r.name, FakeProvider("urn:another-cluster"))
        moved.append(r)
    assert stack_violations(moved) == [
        "etcd-dr (kubernetes:apps/v1:StatefulSet): no PodDisruptionBudget selects its pods"
    ]
