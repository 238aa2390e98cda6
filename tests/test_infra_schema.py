"""Every Kubernetes object the program declares, for every stack, against the OpenAPI schema of a
pinned Kubernetes version with kubernetes-validate in strict mode (an unknown field fails). The
Prometheus operator's objects have no schema there: they are checked against the fields of their
CRDs this program uses."""

from __future__ import annotations

import copy
import functools
import json
from typing import Any

import jsonschema
import kubernetes_validate
import pytest

from watertight_infra import harness, monitoring

# the oldest Kubernetes the program supports: every API it uses is GA there (policy/v1,
# autoscaling/v2, networking/v1); newer schemas only add fields
KUBERNETES_VERSION = "1.31.0"
STACKS = harness.stack_names()
CUSTOM_KINDS = ("ServiceMonitor", "PrometheusRule")

# the fields of monitoring.coreos.com/v1 this program writes, closed like the strict schemas
_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object",
    "required": ["name", "namespace"],
    "additionalProperties": False,
    "properties": {"name": {"type": "string"}, "namespace": {"type": "string"}, "labels": _LABELS},
}
CRD_SCHEMAS: dict[str, dict[str, Any]] = {
    "ServiceMonitor": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": monitoring.MONITORING_API},
            "kind": {"const": "ServiceMonitor"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "required": ["selector", "endpoints"],
                "additionalProperties": False,
                "properties": {
                    "namespaceSelector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {"matchNames": {"type": "array", "items": {"type": "string"}}},
                    },
                    "selector": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "matchLabels": _LABELS,
                            "matchExpressions": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "required": ["key", "operator"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "key": {"type": "string"},
                                        "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                                        "values": {"type": "array", "items": {"type": "string"}},
                                    },
                                },
                            },
                        },
                    },
                    "endpoints": {
                        "type": "array",
                        "minItems": 1,
                        "items": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "port": {"type": "string"},
                                "path": {"type": "string"},
                                "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                "honorLabels": {"type": "boolean"},
                                "relabelings": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "sourceLabels": {"type": "array", "items": {"type": "string"}},
                                            "targetLabel": {"type": "string"},
                                            "action": {"enum": ["replace", "keep", "drop", "labelmap"]},
                                            "regex": {"type": "string"},
                                            "replacement": {"type": "string"},
                                        },
                                    },
                                },
                                # monitoring.coreos.com/v1 SafeAuthorization
                                "authorization": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "properties": {
                                        "type": {"type": "string"},
                                        "credentials": {
                                            "type": "object",
                                            "required": ["key"],
                                            "additionalProperties": False,
                                            "properties": {
                                                "name": {"type": "string"},
                                                "key": {"type": "string"},
                                                "optional": {"type": "boolean"},
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
            },
        },
    },
    "PrometheusRule": {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": monitoring.MONITORING_API},
            "kind": {"const": "PrometheusRule"},
            "metadata": _METADATA,
            "spec": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "groups": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["name", "rules"],
                            "additionalProperties": False,
                            "properties": {
                                "name": {"type": "string"},
                                "rules": {
                                    "type": "array",
                                    "items": {
                                        "type": "object",
                                        "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                        "required": ["expr"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "alert": {"type": "string"},
                                            "record": {"type": "string"},
                                            "expr": {"type": "string"},
                                            "for": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                                            "labels": _LABELS,
                                            "annotations": _LABELS,
                                        },
                                    },
                                },
                            },
                        },
                    }
                },
            },
        },
    },
}


@functools.cache
def objects_of(stack: str) -> list[dict[str, Any]]:
    """The stack's objects as a cluster of the pinned version gets them: a stack for an older
    cluster (kubernetesVersion, e.g. the local 1.20 one) differs only in the API versions of its
    PodDisruptionBudgets and autoscalers (test below), and there are no schemas before 1.25 here;
    the local cluster's API server validates those (tests/test_kubernetes_cluster.py)."""
    pinned = {"kubernetesVersion": ".".join(KUBERNETES_VERSION.split(".")[:2])}
    return [declared.inputs for declared in harness.run(stack, overrides=pinned).kubernetes()]


OLDER_API_VERSIONS = {
    "PodDisruptionBudget": "policy/v1beta1",
    "HorizontalPodAutoscaler": "autoscaling/v2beta2",
}


def test_an_older_cluster_gets_the_older_api_versions_of_the_same_objects() -> None:
    older = {"kubernetesVersion": "1.20"}

    def identity(obj: dict[str, Any]) -> str:
        return json.dumps({**obj, "apiVersion": None}, sort_keys=True)

    # the program's choice, not the stack's: two stacks show it (prod's 400 objects add only time)
    for stack in ("dev", "local"):
        pinned = sorted(objects_of(stack), key=identity)
        at_older = sorted((d.inputs for d in harness.run(stack, overrides=older).kubernetes()), key=identity)
        assert len(pinned) == len(at_older)
        for new, old in zip(pinned, at_older, strict=True):
            expected = OLDER_API_VERSIONS.get(new["kind"], new["apiVersion"])
            assert old["apiVersion"] == expected, f"{stack}: {name_of(old)}"
            assert {**old, "apiVersion": new["apiVersion"]} == new, f"{stack}: {name_of(old)}"


def name_of(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind')} {obj.get('metadata', {}).get('name')}"


@pytest.mark.parametrize("stack", STACKS)
def test_every_object_is_valid_for_the_pinned_kubernetes_version_in_strict_mode(stack: str) -> None:
    checked = 0
    for obj in objects_of(stack):
        if obj["kind"] in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            pytest.fail(f"{stack}: {name_of(obj)}: {error.message} at {list(error.path)}")
        checked += 1
    kinds = {obj["kind"] for obj in objects_of(stack)}
    assert {
        "Namespace",
        "Secret",
        "ConfigMap",
        "StatefulSet",
        "Deployment",
        "Service",
        "PodDisruptionBudget",
        "HorizontalPodAutoscaler",
        "NetworkPolicy",
    } <= kinds
    assert checked >= 50


@pytest.mark.parametrize("stack", STACKS)
def test_prometheus_operator_objects_match_the_crd_fields_they_use(stack: str) -> None:
    custom = [obj for obj in objects_of(stack) if obj["kind"] in CUSTOM_KINDS]
    for obj in custom:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])


def any_stack_with_monitoring() -> str:
    return next(s for s in STACKS if any(o["kind"] == "ServiceMonitor" for o in objects_of(s)))


def test_strict_validation_catches_a_misspelt_field_and_a_wrong_type() -> None:
    # one with a port (the Locust workers have none); which Deployment the mocks declare first varies
    deployment = next(
        o
        for o in objects_of(STACKS[0])
        if o["kind"] == "Deployment" and o["spec"]["template"]["spec"]["containers"][0].get("ports")
    )
    misspelt = copy.deepcopy(deployment)
    misspelt["spec"]["replica"] = misspelt["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(misspelt, KUBERNETES_VERSION, strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["containers"][0]["ports"][0]["containerPort"] = "http"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, KUBERNETES_VERSION, strict=True)
    kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


def test_the_crd_check_catches_a_misspelt_field() -> None:
    monitor = copy.deepcopy(
        next(o for o in objects_of(any_stack_with_monitoring()) if o["kind"] == "ServiceMonitor")
    )
    monitor["spec"]["endpoints"][0]["intervall"] = monitor["spec"]["endpoints"][0].pop("interval")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(monitor, CRD_SCHEMAS["ServiceMonitor"])
