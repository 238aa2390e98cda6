"""The toolkit's Python API for the local cluster: what a Kubernetes target needs from it.

Owns: the cluster's kubeconfig, kube contexts and namespaces by site; reading the API (REST with
the admin token and the cluster's CA); the pods of a site, of a component, kind or cell (by the
labels of ``watertight.kube_names``); exec in a pod, applying objects and waiting for Ready
(through the kubectl built with the cluster, so client and server are one version).
Never: start or stop the cluster (``watertight.cluster.node`` does), or guess a site's context or
namespace: both come from the cluster's state, which the local stack describes.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watertight.cluster import node as node_module
from watertight.cluster.spec import ClusterSpec
from watertight.kube_names import (
    LABEL_CELL,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_PART_OF,
    LABEL_SITE,
    PART_OF,
)
from watertight.kube_names import (
    selector as selector_text,
)
from watertight.topology import SITE_NAMES

HTTP_TIMEOUT_S = 10.0
KUBECTL_TIMEOUT_S = 300.0
EXEC_TIMEOUT_S = 60.0
READY_TIMEOUT_S = 300.0
WORKLOAD_KINDS = ("deployments", "statefulsets")


class ClusterApiError(RuntimeError):
    """A call to the cluster failed; the message names the call and the answer."""


def pod_ready(pod: Mapping[str, Any]) -> bool:
    conditions = (pod.get("status") or {}).get("conditions") or []
    return (pod.get("metadata") or {}).get("deletionTimestamp") is None and any(
        c.get("type") == "Ready" and c.get("status") == "True" for c in conditions
    )


def pod_summary(pod: Mapping[str, Any]) -> str:
    """``<namespace>/<name> <phase> (<the first container's waiting reason>)``."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    reason = ""
    for container in [*(status.get("initContainerStatuses") or []), *(status.get("containerStatuses") or [])]:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason"):
            reason = f" ({container.get('name')}: {waiting['reason']})"
            break
    return f"{meta.get('namespace')}/{meta.get('name')} {status.get('phase', '?')}{reason}"


@dataclass(frozen=True)
class Cluster:
    """A running local cluster, as its directory describes it."""

    spec: ClusterSpec
    kubeconfig: Path
    kubectl_path: Path
    ca_file: Path
    token: str

    @classmethod
    def from_directory(cls, root: Path | None = None) -> Cluster:
        layout = node_module.Layout((root or node_module.cluster_dir()).resolve())
        try:
            state = json.loads(layout.state_file.read_text())
        except (OSError, ValueError):
            raise ClusterApiError(
                f"no local cluster in {layout.root} (no state.json): start one with watertight cluster up"
            ) from None
        return cls(
            spec=ClusterSpec(**state["spec"]),
            kubeconfig=layout.kubeconfig,
            kubectl_path=Path(state["bin_dir"]) / "kubectl",
            ca_file=layout.pki / "ca.crt",
            token=str(state["tokens"]["admin"]),
        )

    # -- names --
    @property
    def contexts(self) -> dict[str, str]:
        """site -> kube context."""
        return dict(self.spec.contexts)

    @property
    def namespaces(self) -> dict[str, str]:
        """site -> namespace."""
        return dict(self.spec.namespaces)

    def chaos_configuration(self) -> dict[str, Any]:
        """The configuration the chaos kubernetes target reads (watertight.runtime.kubernetes)."""
        return {
            "kube_contexts": self.contexts,
            "kube_namespace": self.namespaces[SITE_NAMES[0]],
            "kube_namespaces": self.namespaces,
            "site_cidrs": {site: [self.spec.pod_network] for site in SITE_NAMES},
            "entry_url": self.spec.entry_url,
            # the CNI bridge plugin enforces no NetworkPolicy: the target refuses a partition
            "network_policy_enforced": False,
        }

    # -- REST --
    def _request(self, method: str, path: str, body: Any = None) -> Any:
        context = ssl.create_default_context(cafile=str(self.ca_file))
        request = urllib.request.Request(
            self.spec.api_url + path,
            method=method,
            data=json.dumps(body).encode() if body is not None else None,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context) as answer:
                return json.loads(answer.read() or b"null")
        except urllib.error.HTTPError as error:
            raise ClusterApiError(f"{method} {path}: {error.code} {error.read()[:300]!r}") from None
        except OSError as error:
            raise ClusterApiError(f"{method} {path}: {error}") from None

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def delete(self, path: str, grace_period_s: int | None = None) -> Any:
        body = {"gracePeriodSeconds": grace_period_s} if grace_period_s is not None else None
        return self._request("DELETE", path, body)

    # -- pods --
    def pods(self, site: str, selector: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """The pods of ``site``'s namespace (optionally matching ``selector``)."""
        query = f"?labelSelector={urllib.parse.quote(selector_text(dict(selector)))}" if selector else ""
        return list(self.get(f"/api/v1/namespaces/{self.namespaces[site]}/pods{query}")["items"])

    def pods_of(
        self,
        site: str | None = None,
        cell: int | None = None,
        component: str | None = None,
        kind: str | None = None,
    ) -> list[tuple[str, dict[str, Any]]]:
        """(site, pod) for the pods a topology selection names, by the topology's labels."""
        terms = {LABEL_PART_OF: PART_OF}
        if cell is not None:
            terms[LABEL_CELL] = str(cell)
        if component is not None:
            terms[LABEL_COMPONENT] = component
        if kind is not None:
            terms[LABEL_KIND] = kind
        found: list[tuple[str, dict[str, Any]]] = []
        for name in [site] if site else list(SITE_NAMES):
            found.extend((name, pod) for pod in self.pods(name, {**terms, LABEL_SITE: name}))
        return found

    def replicas_wanted(self) -> int:
        """Pods the workloads in the sites' namespaces want (their spec.replicas summed)."""
        total = 0
        for site in SITE_NAMES:
            for kind in WORKLOAD_KINDS:
                for workload in self.get(f"/apis/apps/v1/namespaces/{self.namespaces[site]}/{kind}")["items"]:
                    total += int((workload.get("spec") or {}).get("replicas") or 0)
        return total

    def wait_ready(
        self, site: str | None = None, component: str | None = None, timeout_s: float = READY_TIMEOUT_S
    ) -> list[str]:
        """Until the selection has at least one pod and all are Ready; returns their names."""
        deadline = time.monotonic() + timeout_s
        while True:
            pods = [pod for _, pod in self.pods_of(site=site, component=component)]
            if pods and all(pod_ready(p) for p in pods):
                return [p["metadata"]["name"] for p in pods]
            if time.monotonic() >= deadline:
                raise ClusterApiError(
                    f"not Ready after {timeout_s:.0f} s: {', '.join(pod_summary(p) for p in pods) or 'no pods'}"
                )
            time.sleep(1)

    # -- kubectl --
    def kubectl_base(self, site: str | None) -> list[str]:
        context = self.contexts[site] if site else self.contexts[SITE_NAMES[0]]
        return [str(self.kubectl_path), "--kubeconfig", str(self.kubeconfig), "--context", context]

    def kubectl(
        self, site: str | None, *args: str, stdin: str | None = None, timeout_s: float = KUBECTL_TIMEOUT_S
    ) -> str:
        done = subprocess.run(
            [*self.kubectl_base(site), *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise ClusterApiError(f"kubectl {' '.join(args[:3])}: {done.stderr.strip()[-1500:]}")
        return done.stdout

    def apply_objects(self, site: str | None, objects: Sequence[Mapping[str, Any]]) -> str:
        """Client-side ``kubectl apply`` of ``objects`` through ``site``'s context (None: the
        cluster-scoped ones); the server validates every field."""
        if not objects:
            return ""
        document = {"apiVersion": "v1", "kind": "List", "items": list(objects)}
        return self.kubectl(site, "apply", "--validate=true", "-f", "-", stdin=json.dumps(document))

    def exec(
        self, site: str, pod: str, container: str, argv: Sequence[str], timeout_s: float = EXEC_TIMEOUT_S
    ) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in a container of a pod of ``site`` (its exit code is the result's)."""
        return subprocess.run(
            [*self.kubectl_base(site), "exec", pod, "-c", container, "--", *argv],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
