"""`watertight cluster up|status|down`: the steps in order, each saying what it does.

Owns: the order (binaries, images, the machine recorded and claimed, the node, the images
imported, the program's objects applied, every pod Ready, the entry), the status document
CONTRACT names (``kubeconfig``, ``contexts``, ``entry``, ``secrets``) and stop.
Never: leave a failed start silently half up (the error says what failed and to run
``watertight cluster down``), or report up what does not answer.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watertight.cluster import api as cluster_api
from watertight.cluster import deploy, images, node, spec
from watertight.cluster.node import ClusterError, Layout, Node

Progress = Callable[[str], None]
# what `up` needs on the machine besides Python (scripts/install-system-packages installs them)
TOOLS = ("containerd", "ctr", "runc", "podman", "debootstrap", "etcd", "iptables", "ip")
ENTRY_FILE = "entry.json"


def _quiet(_: str) -> None:
    pass


def _stack_images() -> list[images.Image]:
    from watertight_infra import harness
    from watertight_infra import settings as infra_settings

    configured = infra_settings.parse(harness.stack_config(spec.STACK)).images
    return images.images_of(configured.core, configured.patroni, configured.locust, configured.etcd)


def _check_tools() -> None:
    missing = [tool for tool in TOOLS if shutil.which(tool) is None]
    if not (node.CNI_BIN_DIR / "bridge").exists() or not (node.CNI_BIN_DIR / "host-local").exists():
        missing.append("the CNI plugins (bridge, host-local)")
    if missing:
        raise ClusterError(
            f"missing on this machine: {', '.join(missing)}; run scripts/install-system-packages (make venv does)"
        )


def up(progress: Progress = print, root: Path | None = None) -> dict[str, Any]:
    """Start the cluster and deploy the program's objects; a second call with a healthy cluster
    changes nothing and returns its status."""
    cluster_spec = spec.load()
    current = Node(cluster_spec, root, progress)
    if current.running():
        found = status(root)
        if found["up"]:
            progress(f"the cluster in {current.layout.root} is up already: nothing to do")
            return found
        raise ClusterError(
            f"the cluster in {current.layout.root} is partly running ({', '.join(n for n, r in found['processes'].items() if not r['running'])} stopped): "
            "run watertight cluster down, then up again"
        )
    _check_tools()
    layout = current.layout
    layout.root.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(layout.logs, ignore_errors=True)
    layout.logs.mkdir(parents=True)
    version, bin_dir = node.binaries_or_build(progress)
    # the machine is recorded before the image builds too: podman mounts its storage on first use
    current.begin()
    try:
        image_log = layout.logs / "images.log"
        progress(f"images (podman on a debootstrap base; log {image_log})")
        built = images.build(_stack_images(), progress, image_log)
        pause_reference, pause_id = images.build_pause(version, bin_dir / "pause", progress, image_log)
        built[pause_reference] = pause_id
        current.prepare(bin_dir, version)
        current.set_pause_image(pause_reference)
        values = deploy.generate_secrets()
        deploy.write_secrets(layout.secrets, values)
        current.make_bridge()
        current.start_control_plane()
        current.start_containerd()
        images.import_into(
            built,
            node.ctr_command(layout),
            node.containerd_root() / "watertight-images.json",
            progress,
            image_log,
        )
        current.start_node(sys.executable)
        client = cluster_api.Cluster.from_directory(layout.root)
        counts = deploy.apply(client, values, progress)
        progress(f"applied: {', '.join(f'{n} {kind}' for kind, n in counts.items())}")
        ready = deploy.wait_pods_ready(client, progress)
        progress(f"all {ready} pods Ready")
        entry_file = layout.entry_dir / ENTRY_FILE
        deploy.write_entry(entry_file, deploy.entry_settings(client), values)
        progress(
            f"starting the entry on {cluster_spec.entry_url} (in front of the centers' gateway NodePorts)"
        )
        current.start_entry(sys.executable, entry_file)
    except (
        ClusterError,
        cluster_api.ClusterApiError,
        images.ImageError,
        TimeoutError,
        ValueError,
        OSError,
        subprocess.SubprocessError,
    ) as error:
        raise ClusterError(
            f"{error}\nthe cluster is left as it is for a look (logs in {layout.logs}); stop it and put the "
            "machine back with: watertight cluster down"
        ) from error
    found = status(root)
    progress(f"the cluster is up: entry {found['entry']}, kubeconfig {found['kubeconfig']}")
    return found


def status(root: Path | None = None) -> dict[str, Any]:
    """The cluster's status: CONTRACT's fields and what runs."""
    cluster_spec = spec.load()
    current = Node(cluster_spec, root, _quiet)
    layout: Layout = current.layout
    running = current.state.running()
    document: dict[str, Any] = {
        "directory": str(layout.root),
        "kubeconfig": str(layout.kubeconfig),
        "contexts": dict(cluster_spec.contexts),
        "namespaces": dict(cluster_spec.namespaces),
        "entry": cluster_spec.entry_url,
        "secrets": str(layout.secrets),
        "kubernetes": current.state.data.get("version"),
        "processes": {
            name: {"pid": record.pid, "running": running.get(name, False)}
            for name, record in current.state.records().items()
        },
        "pods": {},
        "up": False,
    }
    if not running or not all(running.values()) or node.ENTRY not in running:
        return document
    try:
        client = cluster_api.Cluster.from_directory(layout.root)
        document["chaos_configuration"] = client.chaos_configuration()
        all_ready = True
        for site in cluster_spec.contexts:
            pods = client.pods(site)
            ready = [p for p in pods if cluster_api.pod_ready(p)]
            document["pods"][site] = {
                "ready": len(ready),
                "total": len(pods),
                "not_ready": [cluster_api.pod_summary(p) for p in pods if not cluster_api.pod_ready(p)],
            }
            all_ready = all_ready and len(ready) == len(pods)
        entry_status, _ = node._get(f"{cluster_spec.entry_url}/readyz")
        document["entry_ready"] = entry_status == 200
        document["up"] = all_ready and entry_status == 200
    except cluster_api.ClusterApiError as error:
        document["error"] = str(error)
    return document


def down(progress: Progress = print, root: Path | None = None, purge: bool = False) -> list[str]:
    """Stop everything and put the machine back; returns what differs from before (empty: as
    found). ``purge`` also deletes the cluster directory (the caches of binaries and images stay)."""
    current = Node(spec.load(), root, progress)
    remaining = current.stop()
    if purge and not remaining:
        shutil.rmtree(current.layout.root, ignore_errors=True)
        progress(f"deleted {current.layout.root}")
    return remaining


def print_status(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(document, indent=1))
        return
    state = (
        "up"
        if document["up"]
        else ("partly running" if any(p["running"] for p in document["processes"].values()) else "down")
    )
    print(f"cluster: {state} ({document['directory']}, Kubernetes {document.get('kubernetes') or '?'})")
    print(f"kubeconfig: {document['kubeconfig']}")
    print(
        "contexts: "
        + ", ".join(
            f"{site}={ctx} (namespace {document['namespaces'][site]})"
            for site, ctx in document["contexts"].items()
        )
    )
    print(f"entry: {document['entry']}  secrets: {document['secrets']}")
    for name, process in document["processes"].items():
        print(f"  {name:<24} pid {process['pid']:<8} {'running' if process['running'] else 'STOPPED'}")
    for site, pods in document.get("pods", {}).items():
        print(
            f"  pods of {site}: {pods['ready']}/{pods['total']} Ready"
            + (f"; not ready: {', '.join(pods['not_ready'])}" if pods["not_ready"] else "")
        )
