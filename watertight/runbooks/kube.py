"""The kubernetes target of the runbooks: what the playbooks' kubernetes.core tasks need to find
the topology in three clusters (one per site), as Ansible extra variables.

Owns: the extra variables that name what the runbooks address in the clusters (each cell
member's pod and Patroni name, the Patroni config path, the drain ConfigMap, the idle dr
Deployments' active-replicas annotation), built from the ``render`` functions and the names of
``watertight.kube_names`` the Pulumi program builds the objects from, so the two cannot drift
apart; the kube contexts (``prod=ctx-a,samecity=ctx-b,dr=ctx-c``);
installing the kubernetes.core collection where the runner finds it.
Never: guess a context; every missing piece is named in the error, before anything runs.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watertight import render
from watertight import topology as topology_module
from watertight.kube_names import (
    ANNOTATION_ACTIVE_REPLICAS,
    DATA_CLAIM,
    DRAIN_CONFIG_MAP,
    DRAIN_FILE,
    ETCD_CONTAINER,
    LABEL_COMPONENT,
    LABEL_KIND,
    LABEL_PART_OF,
    LABEL_SITE,
    MEMBER_GUARD,
    NAMESPACE_DEFAULT,
    PART_OF,
    PATRONI_CONFIG,
    PATRONI_CONFIG_DIR,
    PATRONI_CONTAINER,
    PATRONI_FILE,
    POSTGRES_DATA_DIR,
    WATCHDOG_PIPE,
)
from watertight.topology import SITE_NAMES, Topology

CONTEXTS_ENV = "WATERTIGHT_KUBE_CONTEXTS"
NAMESPACE_ENV = "WATERTIGHT_KUBE_NAMESPACE"
TOPOLOGY_ENV = "WATERTIGHT_TOPOLOGY"

# the names the runbooks address in the clusters (pods, containers, paths, the drain ConfigMap,
# the active-replicas annotation) are watertight.kube_names', which the Pulumi program imports too
__all__ = [
    "ANNOTATION_ACTIVE_REPLICAS",
    "DATA_CLAIM",
    "DRAIN_CONFIG_MAP",
    "DRAIN_FILE",
    "ETCD_CONTAINER",
    "MEMBER_GUARD",
    "PATRONI_CONFIG",
    "PATRONI_CONFIG_DIR",
    "PATRONI_CONTAINER",
    "PATRONI_FILE",
    "POSTGRES_DATA_DIR",
    "WATCHDOG_PIPE",
    "KubeTarget",
    "KubeTargetError",
    "collection_path",
    "install_collection",
    "parse_contexts",
]

# bounds of the kubernetes tasks' waits (a ConfigMap volume is refreshed by the kubelet's sync,
# up to a minute and its cache TTL after the change)
DRAIN_WAIT_S = 150
SWITCHOVER_WAIT_S = 90
PROMOTE_WAIT_S = 90
SCALE_WAIT_S = 180
RECLONE_WAIT_S = 300
CATCH_UP_WAIT_S = 60

# kubernetes.core comes with the `ansible` distribution on PyPI (galaxy may be out of reach): the
# version of that distribution whose kubernetes.core the runbooks are written against
COLLECTION = "kubernetes.core"
COLLECTION_VERSION = "6.2.0"
ANSIBLE_DISTRIBUTION = "ansible==12.3.0"
COLLECTIONS_DIR = Path(sys.prefix) / "share" / "watertight" / "collections"


class KubeTargetError(ValueError):
    """The kubernetes target lacks a context, a collection or a valid topology; nothing ran."""


def parse_contexts(text: str) -> dict[str, str]:
    """``prod=ctx-a,samecity=ctx-b,dr=ctx-c`` into a mapping; every site must have one."""
    contexts: dict[str, str] = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        site, sep, context = part.partition("=")
        if not sep or not context:
            raise KubeTargetError(f"kube context {part!r}: expected SITE=CONTEXT")
        if site not in SITE_NAMES:
            raise KubeTargetError(
                f"kube context {part!r}: no site named {site!r}; sites are {', '.join(SITE_NAMES)}"
            )
        contexts[site] = context
    missing = [site for site in SITE_NAMES if site not in contexts]
    if missing:
        raise KubeTargetError(
            f"target kubernetes needs a kube context for every site; missing {', '.join(missing)} "
            f"(pass --kube-contexts prod=CTX,samecity=CTX,dr=CTX or set ${CONTEXTS_ENV})"
        )
    return contexts


@dataclass(frozen=True)
class KubeTarget:
    contexts: dict[str, str]
    namespace: str
    topology: Topology

    @classmethod
    def from_settings(
        cls, contexts: str | None = None, namespace: str | None = None, topology_path: str | None = None
    ) -> KubeTarget:
        """From the arguments, else $WATERTIGHT_KUBE_CONTEXTS, $WATERTIGHT_KUBE_NAMESPACE and
        $WATERTIGHT_TOPOLOGY (the topology file the stack was deployed from; default topology.yaml)."""
        text = contexts or os.environ.get(CONTEXTS_ENV, "")
        path = Path(topology_path or os.environ.get(TOPOLOGY_ENV) or topology_module.DEFAULT_PATH)
        try:
            topology = topology_module.parse(path.read_text(), str(path))
        except OSError as error:
            raise KubeTargetError(f"topology file {path}: {error.strerror}") from None
        except ValueError as error:
            raise KubeTargetError(str(error)) from None
        return cls(
            parse_contexts(text), namespace or os.environ.get(NAMESPACE_ENV) or NAMESPACE_DEFAULT, topology
        )

    def runbook_vars(self) -> dict[str, Any]:
        """The extra variables, once the collection and the client the tasks drive are there."""
        if collection_path() is None:
            raise KubeTargetError(
                f"target kubernetes needs the {COLLECTION} collection: run `make venv` (or "
                f"`python -m watertight.runbooks.kube`, or ansible-galaxy collection install -r runbooks/collections/requirements.yml)"
            )
        if importlib.util.find_spec("kubernetes") is None:
            raise KubeTargetError(
                "target kubernetes needs the kubernetes Python client that kubernetes.core drives: "
                "pip install 'watertight[kubernetes]'"
            )
        return self.extravars()

    def extravars(self) -> dict[str, Any]:
        """What every kubernetes task file of runbooks/kubernetes/ reads."""
        cells = []
        for cell in self.topology.cell_numbers:
            members = {
                site: {
                    "name": render.pg_name(cell, site),
                    "pod": f"{render.pg_name(cell, site)}-0",
                    "pvc": f"{DATA_CLAIM}-{render.pg_name(cell, site)}-0",
                }
                for site in SITE_NAMES
            }
            cells.append(
                {
                    "cell": cell,
                    "scope": render.scope(cell),
                    "dr_scope": render.dr_scope(cell),
                    "leader_site": self.topology.leader_site(cell),
                    "postgres_port": self.topology.postgres_port(cell),
                    "members": members,
                }
            )
        return {
            "watertight_target": "kubernetes",
            "kube_contexts": dict(self.contexts),
            "kube_namespace": self.namespace,
            # each site's namespace, which every task file addresses (the same one in every
            # cluster here; the runtime of sites sharing one cluster gives each its own)
            "kube_namespaces": dict.fromkeys(SITE_NAMES, self.namespace),
            "kube_cells": cells,
            "kube": {
                "patroni_container": PATRONI_CONTAINER,
                "patroni_config": PATRONI_CONFIG,
                "drain_config_map": DRAIN_CONFIG_MAP,
                "drain_file": DRAIN_FILE,
                "active_replicas_annotation": ANNOTATION_ACTIVE_REPLICAS,
                "label_site": LABEL_SITE,
                "label_kind": LABEL_KIND,
                "label_component": LABEL_COMPONENT,
                "label_part_of": f"{LABEL_PART_OF}={PART_OF}",
                "postgres_socket_dir": POSTGRES_DATA_DIR,
                "superuser": render.SUPERUSER,
                "database": render.DATABASE,
                "patroni_namespace": render.PATRONI_NAMESPACE,
                # the etcd the centers' clusters use (any center's member) and dr's own
                "etcd": {
                    **{
                        site: {"name": render.etcd_name(site), "pod": f"{render.etcd_name(site)}-0"}
                        for site in SITE_NAMES
                    },
                    "client_port": self.topology.ports.etcd_client,
                    "container": ETCD_CONTAINER,
                },
                "etcd_dr": {
                    "name": render.ETCD_DR_NAME,
                    "pod": f"{render.ETCD_DR_NAME}-0",
                    "client_port": self.topology.ports.etcd_dr_client,
                },
                "gateway_port": self.topology.ports.gateway,
                "gateway_names": {site: render.gateway_name(site) for site in SITE_NAMES},
                "app_names": {site: render.app_name(site) for site in SITE_NAMES},
                "drain_wait_s": DRAIN_WAIT_S,
                "switchover_wait_s": SWITCHOVER_WAIT_S,
                "promote_wait_s": PROMOTE_WAIT_S,
                "scale_wait_s": SCALE_WAIT_S,
                "reclone_wait_s": RECLONE_WAIT_S,
                "catch_up_wait_s": CATCH_UP_WAIT_S,
            },
        }


def collection_path() -> Path | None:
    """Where kubernetes.core is installed for the runner, or None when it is not."""
    found = COLLECTIONS_DIR / "ansible_collections" / "kubernetes" / "core" / "MANIFEST.json"
    return COLLECTIONS_DIR if found.exists() else None


def install_collection(progress: Any = print, timeout_s: float = 300.0) -> Path:
    """Install kubernetes.core into COLLECTIONS_DIR from the `ansible` distribution on PyPI (pip
    downloads the pinned wheel; only the collection is extracted). Idempotent."""
    if collection_path() is not None:
        return COLLECTIONS_DIR
    with tempfile.TemporaryDirectory(prefix="watertight-collection-") as scratch:
        progress(f"downloading {ANSIBLE_DISTRIBUTION} for its {COLLECTION} collection")
        done = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", scratch, ANSIBLE_DISTRIBUTION],
            capture_output=True, text=True, timeout=timeout_s, check=False,
        )  # fmt: skip
        wheels = list(Path(scratch).glob("ansible-*.whl"))
        if done.returncode != 0 or not wheels:
            raise KubeTargetError(
                f"could not download {ANSIBLE_DISTRIBUTION} from the package index: {done.stderr.strip()[-300:]}; "
                f"or install {COLLECTION} yourself: ansible-galaxy collection install -r runbooks/collections/requirements.yml"
            )
        prefix = "ansible_collections/kubernetes/core/"
        staging = COLLECTIONS_DIR.with_name(COLLECTIONS_DIR.name + ".tmp")
        shutil.rmtree(staging, ignore_errors=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            members = [name for name in wheel.namelist() if name.startswith(prefix)]
            if not members:
                raise KubeTargetError(f"{wheels[0].name} holds no {COLLECTION}")
            wheel.extractall(staging, members)
        manifest = staging / prefix / "MANIFEST.json"
        version = json.loads(manifest.read_text())["collection_info"]["version"]
        if version != COLLECTION_VERSION:
            raise KubeTargetError(f"{wheels[0].name} holds {COLLECTION} {version}, not {COLLECTION_VERSION}")
        target = COLLECTIONS_DIR / prefix
        shutil.rmtree(target, ignore_errors=True)  # a half-installed one from an interrupted run
        target.parent.mkdir(parents=True, exist_ok=True)
        (staging / prefix).replace(target)
        shutil.rmtree(staging, ignore_errors=True)
    progress(f"{COLLECTION} {COLLECTION_VERSION} installed in {COLLECTIONS_DIR}")
    return COLLECTIONS_DIR


def main() -> int:
    """``python -m watertight.runbooks.kube``: install kubernetes.core (make venv runs it)."""
    try:
        install_collection()
    except (KubeTargetError, subprocess.TimeoutExpired, OSError) as error:
        print(f"watertight: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
