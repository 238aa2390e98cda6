"""The Pulumi program's objects on the local cluster, and the entry in front of them.

Owns: running the program for the local stack under Pulumi's mocks (``watertight_infra.harness``,
the same run the tests and snapshots use) with the cluster's secrets in place of the mock ones,
applying every object it declares to its site's context (client-side ``kubectl apply``, which
1.20 handles for every object; namespaces first), the StorageClass the stack names, waiting until
every pod is Ready, and the entry: a gateway on the node's address in front of the centers'
gateway NodePorts, as ``render.entry_settings`` describes the local runtime's.
Never: change an object the program declared (a difference belongs in the stack's configuration),
or put a secret anywhere but the cluster's Secrets, its secrets file and the entry's settings.
"""

from __future__ import annotations

import json
import secrets as secrets_module
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from watertight import render
from watertight.cluster import api as cluster_api
from watertight.cluster import pki
from watertight.cluster.spec import STACK, STORAGE_PROVISIONER, ClusterSpec
from watertight.topology import SITE_NAMES

API_TOKEN_KINDS = ("acquirer", "channel", "operator")
APPLY_TIMEOUT_S = 300.0
PODS_READY_TIMEOUT_S = 900.0
PODS_PROGRESS_EVERY_S = 30.0
Progress = Callable[[str], None]


def generate_secrets() -> dict[str, Any]:
    """The stack's secrets for this cluster (what `pulumi config set --secret` would hold)."""
    return {
        "superuserPassword": secrets_module.token_urlsafe(24),
        "replicationPassword": secrets_module.token_urlsafe(24),
        "panKeyHex": secrets_module.token_hex(32),
        "apiTokens": {kind: secrets_module.token_urlsafe(32) for kind in API_TOKEN_KINDS},
    }


def write_secrets(path: Path, values: dict[str, Any]) -> None:
    """The cluster's secrets file (0600 before it is written): the stack's secrets, and the
    clients' tokens under ``api_tokens`` as CONTRACT names them."""
    pki.write_private(
        path, json.dumps({**values, "api_tokens": values["apiTokens"]}, indent=1, sort_keys=True)
    )


def read_secrets(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def rendered_objects(values: dict[str, Any], stack: str = STACK) -> dict[str, list[dict[str, Any]]]:
    """Every Kubernetes object the program declares for ``stack``, by kube context of its site's
    provider, secrets filled in (the harness shows them as Pulumi would, then unwraps them)."""
    from watertight_infra import harness  # imported late: pulumi is heavy and only this needs it

    engine_secrets = {
        "superuserPassword": values["superuserPassword"],
        "replicationPassword": values["replicationPassword"],
        "panKeyHex": values["panKeyHex"],
        "apiTokens": json.dumps(values["apiTokens"]),
    }
    run = harness.run(stack, secrets=engine_secrets)
    context_of = {p.urn: str(p.inputs.get("context") or "") for p in run.providers()}
    by_context: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for declared in run.kubernetes():
        if declared.provider not in context_of:
            raise ValueError(f"{declared.kind} {declared.name}: declared without its site's provider")
        by_context[context_of[declared.provider]].append(declared.inputs)
    return dict(by_context)


def storage_class(spec: ClusterSpec) -> dict[str, Any]:
    return {
        "apiVersion": "storage.k8s.io/v1",
        "kind": "StorageClass",
        "metadata": {"name": spec.storage_class},
        "provisioner": STORAGE_PROVISIONER,
        "reclaimPolicy": "Delete",
        "volumeBindingMode": "Immediate",
    }


def apply(client: cluster_api.Cluster, values: dict[str, Any], progress: Progress) -> dict[str, int]:
    """Apply the program's objects, each through its site's context; returns objects per kind."""
    client.apply_objects(None, [storage_class(client.spec)])
    objects = rendered_objects(values)
    unknown = sorted(set(objects) - set(client.spec.contexts.values()))
    if unknown:
        raise ValueError(
            f"the program declares objects for contexts {', '.join(unknown)}, which this cluster has not"
        )
    counts: dict[str, int] = defaultdict(int)
    for site in SITE_NAMES:
        context = client.spec.contexts[site]
        chosen = objects.get(context, [])
        # namespaces first: everything else of the site lives in its namespace
        ordered = sorted(chosen, key=lambda o: o["kind"] != "Namespace")
        progress(
            f"applying {len(ordered)} objects of site {site} (context {context}, namespace {client.spec.namespaces[site]})"
        )
        client.apply_objects(site, ordered)
        for obj in ordered:
            counts[obj["kind"]] += 1
    return dict(sorted(counts.items()))


def wait_pods_ready(
    client: cluster_api.Cluster, progress: Progress, timeout_s: float = PODS_READY_TIMEOUT_S
) -> int:
    """Until every pod the program's workloads want exists and is Ready; returns how many."""
    deadline = time.monotonic() + timeout_s
    said = 0.0
    while True:
        wanted = client.replicas_wanted()
        pods = [p for site in SITE_NAMES for p in client.pods(site)]
        ready = [p for p in pods if cluster_api.pod_ready(p)]
        missing = wanted - len(pods)
        if missing <= 0 and len(ready) == len(pods) == wanted:
            return len(ready)
        now = time.monotonic()
        if now >= deadline:
            raise TimeoutError(
                f"pods not Ready after {timeout_s:.0f} s: {', '.join(cluster_api.pod_summary(p) for p in pods if not cluster_api.pod_ready(p))}"
            )
        if now - said >= PODS_PROGRESS_EVERY_S:
            waiting = [cluster_api.pod_summary(p) for p in pods if not cluster_api.pod_ready(p)]
            progress(
                f"{len(ready)} of {wanted} pods Ready; waiting for {', '.join(waiting[:6]) or 'pods to be created'}{' ...' if len(waiting) > 6 else ''}"
            )
            said = now
        time.sleep(2)


def entry_settings(client: cluster_api.Cluster) -> dict[str, Any]:
    """The entry's gateway settings: render's (every cell's leader center first, then the other
    center, then dr), each site gateway reached at its Service's NodePort on the node's address."""
    from watertight_infra import harness, program
    from watertight_infra import settings as infra_settings

    stack_settings = infra_settings.parse(harness.stack_config(STACK))
    topology = infra_settings.load_topology(stack_settings)
    endpoints = program.endpoints_of(stack_settings, topology)
    settings = render.entry_settings(topology, endpoints)
    reachable: dict[str, str] = {}
    for site in SITE_NAMES:
        name = render.gateway_name(site)
        service = client.get(f"/api/v1/namespaces/{client.spec.namespaces[site]}/services/{name}")
        node_port = next(p["nodePort"] for p in service["spec"]["ports"] if p.get("nodePort"))
        reachable[endpoints.gateway_url(site)] = f"http://{client.spec.node_ip}:{node_port}"
    settings["upstreams"] = {
        cell: [reachable[url] for url in urls] for cell, urls in settings["upstreams"].items()
    }
    parts = urlsplit(client.spec.entry_url)
    settings["host"], settings["port"] = parts.hostname, parts.port
    return settings


def write_entry(settings_file: Path, settings: dict[str, Any], values: dict[str, Any]) -> None:
    """The entry's settings and, where they name it, the digests of the tokens it accepts (as
    the program gives every gateway; the entry checks them like the local runtime's)."""
    tokens_file = settings_file.parent / str(settings.get("api_tokens_file") or render.API_TOKENS_FILE)
    pki.write_private(
        tokens_file, render.api_tokens_document({render.SECRET_API_TOKENS: values["apiTokens"]})
    )
    write_json(settings_file, settings)


def write_json(path: Path, document: dict[str, Any]) -> None:
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False) as handle:
        json.dump(document, handle, indent=1)
    Path(handle.name).replace(path)
