"""The local cluster's node: etcd, the control plane, containerd, the agent, the kubelet and
kube-proxy as processes on this machine, started in order and stopped by PID.

Owns: the cluster directory (``$WATERTIGHT_CLUSTER_DIR``, default /var/lib/watertight/cluster:
state with every PID and its start time, the pki, configs, etcd's data, the kubelet's and
containerd's state, volumes, one log per process under logs/), the bridge the pods hang off, the
record of the machine taken before anything starts (hoststate) and putting it back on stop, and a
machine-wide claim (/run/watertight-cluster.json) so two clusters never share one machine's
iptables, bridge and cgroups. Containerd's image store lives outside it
(/var/lib/watertight/containerd), so images are imported once per machine.
Never: signal a process it did not start (PIDs are checked against their start time), leave a
wait unbounded, or leave the machine changed after stop without saying what is left.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from watertight import pg
from watertight.cluster import binaries, hoststate, pki
from watertight.cluster.spec import (
    API_PORT,
    BRIDGE,
    CONTROLLER_MANAGER_PORT,
    DNS_PORT,
    ETCD_CLIENT_PORT,
    ETCD_PEER_PORT,
    KUBELET_HEALTHZ_PORT,
    KUBELET_PORT,
    NODE_NAME,
    NODE_PORT_RANGE,
    PROXY_HEALTHZ_PORT,
    PROXY_METRICS_PORT,
    SCHEDULER_PORT,
    SERVICE_NETWORK,
    STORAGE_PROVISIONER,
    ClusterSpec,
)
from watertight.runtime import processes
from watertight.runtime.processes import ProcessRecord

DIR_ENV = "WATERTIGHT_CLUSTER_DIR"
DIR_DEFAULT = Path("/var/lib/watertight/cluster")
CONTAINERD_ROOT_ENV = "WATERTIGHT_CONTAINERD_ROOT"
CONTAINERD_ROOT_DEFAULT = Path("/var/lib/watertight/containerd")
CLAIM_FILE = Path("/run/watertight-cluster.json")
CNI_BIN_DIR = Path("/usr/lib/cni")
PODMAN_STORAGE = Path("/var/lib/containers/storage")
START_TIMEOUT_S = 120.0
NODE_READY_TIMEOUT_S = 180.0
STOP_TIMEOUT_S = 20.0
PODS_GONE_TIMEOUT_S = 90.0
HTTP_TIMEOUT_S = 3.0
Progress = Callable[[str], None]

# start order; stop is the reverse (entry first: it is started last, by the deploy step)
ETCD, APISERVER, CONTROLLER_MANAGER, SCHEDULER = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
)
CONTAINERD, AGENT, KUBELET, PROXY, ENTRY = "containerd", "agent", "kubelet", "kube-proxy", "entry"
ORDER = (ETCD, APISERVER, CONTROLLER_MANAGER, SCHEDULER, CONTAINERD, AGENT, KUBELET, PROXY, ENTRY)
# token identities (the API server's token file): what each process is to RBAC
IDENTITIES = {
    "admin": pki.Identity("watertight-admin", ("system:masters",)),
    "agent": pki.Identity("watertight-cluster-agent", ("system:masters",)),
    "kubelet": pki.Identity(f"system:node:{NODE_NAME}", ("system:nodes",)),
    "controller-manager": pki.Identity("system:kube-controller-manager", ()),
    "scheduler": pki.Identity("system:kube-scheduler", ()),
    "kube-proxy": pki.Identity("system:kube-proxy", ()),
}


class ClusterError(RuntimeError):
    """A step of the cluster failed; the message says what and what to do next."""


def cluster_dir() -> Path:
    return Path(os.environ.get(DIR_ENV) or DIR_DEFAULT)


def containerd_root() -> Path:
    return Path(os.environ.get(CONTAINERD_ROOT_ENV) or CONTAINERD_ROOT_DEFAULT)


@dataclass(frozen=True)
class Layout:
    """Where everything of one cluster lives."""

    root: Path

    @property
    def state_file(self) -> Path:
        return self.root / "state.json"

    @property
    def host_before(self) -> Path:
        return self.root / "host-before.json"

    @property
    def pki(self) -> Path:
        return self.root / "pki"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def config(self) -> Path:
        return self.root / "config"

    @property
    def kubeconfig(self) -> Path:
        return self.root / "kubeconfig"

    @property
    def secrets(self) -> Path:
        return self.root / "secrets.json"

    @property
    def etcd_data(self) -> Path:
        return self.root / "etcd"

    @property
    def kubelet_root(self) -> Path:
        return self.root / "kubelet"

    @property
    def containerd_state(self) -> Path:
        return self.root / "containerd"

    @property
    def containerd_socket(self) -> Path:
        return self.containerd_state / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni" / "net.d"

    @property
    def cni_ipam_dir(self) -> Path:
        return self.root / "cni" / "ipam"

    @property
    def volumes(self) -> Path:
        return self.root / "volumes"

    @property
    def entry_dir(self) -> Path:
        return self.root / "entry"

    def mount_prefixes(self) -> list[Path]:
        """Where the node and the image builds mount: the cluster directory, containerd's image
        store, and podman's storage (which bind-mounts its overlay directory on first use)."""
        return [self.root, containerd_root(), PODMAN_STORAGE]

    def data_dirs(self) -> list[Path]:
        """What a fresh start wipes (logs and the host record are kept until then)."""
        return [
            self.pki, self.config, self.etcd_data, self.kubelet_root, self.containerd_state,
            self.root / "cni", self.volumes, self.entry_dir, self.kubeconfig, self.secrets,
        ]  # fmt: skip


def ctr_command(layout: Layout) -> list[str]:
    return ["ctr", "--address", str(layout.containerd_socket)]


# ---- the machine-wide claim ------------------------------------------------------------------------


def _read_claim() -> dict[str, Any] | None:
    try:
        return json.loads(CLAIM_FILE.read_text())
    except (OSError, ValueError):
        return None


def _claim_alive(claim: dict[str, Any]) -> bool:
    state_file = Path(claim.get("state_file", ""))
    try:
        state = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return False
    return any(
        processes.alive(ProcessRecord(p["pid"], p["start_ticks"]))
        for p in state.get("processes", {}).values()
    )


def claim_machine(layout: Layout) -> None:
    """Refuse when another cluster directory's processes run here; else claim the machine."""
    claim = _read_claim()
    if claim and Path(claim.get("root", "")) != layout.root and _claim_alive(claim):
        raise ClusterError(
            f"another local cluster runs on this machine (directory {claim['root']}): one node per machine "
            f"shares the iptables, the bridge {BRIDGE} and the cgroups; stop it first: "
            f"WATERTIGHT_CLUSTER_DIR={claim['root']} watertight cluster down"
        )
    CLAIM_FILE.write_text(json.dumps({"root": str(layout.root), "state_file": str(layout.state_file)}))


def release_machine(layout: Layout) -> None:
    claim = _read_claim()
    if claim and Path(claim.get("root", "")) == layout.root:
        CLAIM_FILE.unlink(missing_ok=True)


# ---- state -----------------------------------------------------------------------------------------


class State:
    """The cluster's state file: processes by name, the binaries, the images, the deploy."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.data: dict[str, Any] = {}
        if layout.state_file.exists():
            with contextlib.suppress(ValueError):
                self.data = json.loads(layout.state_file.read_text())

    def save(self) -> None:
        # it holds the cluster's tokens: 0600 from its creation on
        self.layout.root.mkdir(parents=True, exist_ok=True)
        temporary = self.layout.state_file.with_suffix(".tmp")
        pki.write_private(temporary, json.dumps(self.data, indent=1, sort_keys=True))
        temporary.replace(self.layout.state_file)

    def records(self) -> dict[str, ProcessRecord]:
        return {
            name: ProcessRecord(p["pid"], p["start_ticks"])
            for name, p in self.data.get("processes", {}).items()
        }

    def set_process(self, name: str, record: ProcessRecord | None) -> None:
        table = self.data.setdefault("processes", {})
        if record is None:
            table.pop(name, None)
        else:
            table[name] = {"pid": record.pid, "start_ticks": record.start_ticks}
        self.save()

    def running(self) -> dict[str, bool]:
        return {name: processes.alive(record) for name, record in self.records().items()}


# ---- HTTP checks -------------------------------------------------------------------------------------


def _get(
    url: str,
    *,
    token: str | None = None,
    ca_file: Path | None = None,
    cert: tuple[Path, Path] | None = None,
    timeout_s: float = HTTP_TIMEOUT_S,
) -> tuple[int, bytes]:
    context = None
    if url.startswith("https"):
        context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        if cert:
            context.load_cert_chain(str(cert[0]), str(cert[1]))
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout_s, context=context) as answer:
            return answer.status, answer.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except (OSError, ValueError):
        return 0, b""


def _wait(
    what: str, check: Callable[[], bool], timeout_s: float, log: Path | None, record: ProcessRecord | None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        if record is not None and not processes.alive(record):
            raise ClusterError(f"{what}: the process exited; see {log}\n{pg.log_tail(log, 15)}")
        time.sleep(0.5)
    raise ClusterError(f"{what}: not ready after {timeout_s:.0f} s; see {log}\n{pg.log_tail(log, 15)}")


# ---- configuration -------------------------------------------------------------------------------


class Node:
    """One cluster directory: start, status and stop of its processes."""

    def __init__(self, spec: ClusterSpec, root: Path | None = None, progress: Progress = print) -> None:
        self.spec = spec
        self.layout = Layout((root or cluster_dir()).resolve())
        self.state = State(self.layout)
        self.progress = progress

    # -- helpers --
    def log_path(self, name: str) -> Path:
        return self.layout.logs / f"{name}.log"

    def token(self, name: str) -> str:
        return str(self.state.data["tokens"][name])

    @property
    def bin_dir(self) -> Path:
        return Path(self.state.data["bin_dir"])

    def running(self) -> bool:
        return any(self.state.running().values())

    def _spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> ProcessRecord:
        self.layout.logs.mkdir(parents=True, exist_ok=True)
        record = processes.spawn(
            argv, self.layout.root, self.log_path(name), env or {}, as_service_user=False
        )
        self.state.set_process(name, record)
        return record

    # -- preparation --
    def prepare(self, bin_dir: Path, version: str) -> None:
        """A fresh cluster directory: old data wiped, pki, tokens, kubeconfigs and configs."""
        layout = self.layout
        left = hoststate.mounts([layout.root])
        if left:
            # deleting the old data would reach into them (a pod's volumes, secrets, rootfs)
            raise ClusterError(
                f"{len(left)} mounts are left under {layout.root} from an earlier cluster (e.g. {left[0]}): "
                "run watertight cluster down first"
            )
        for path in layout.data_dirs():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)
        for directory in (
            layout.pki,
            layout.config,
            layout.logs,
            layout.volumes,
            layout.cni_conf_dir,
            layout.cni_ipam_dir,
            layout.kubelet_root,
            layout.containerd_state,
            layout.entry_dir,
        ):
            directory.mkdir(parents=True, exist_ok=True)  # fmt: skip
        os.chmod(layout.root, 0o711)  # pods' hostPath volumes live below it
        os.chmod(layout.pki, 0o700)
        spec = self.spec
        self.progress(f"cluster directory {layout.root}: keys, certificates and tokens")
        ca = pki.Authority(layout.pki)
        ca.issue("etcd-server", "etcd", addresses=("127.0.0.1",), server=True)
        ca.issue("etcd-client", "kube-apiserver-etcd-client", client=True)
        ca.issue(
            "apiserver", "kube-apiserver",
            dns_names=("kubernetes", "kubernetes.default", "kubernetes.default.svc",
                       f"kubernetes.default.svc.{spec.cluster_domain}", "localhost"),
            addresses=(spec.node_ip, "127.0.0.1", spec.service_ip), server=True,
        )  # fmt: skip
        ca.issue(
            "apiserver-kubelet-client", "kube-apiserver-kubelet-client", ("system:masters",), client=True
        )
        ca.issue("kubelet", NODE_NAME, dns_names=(NODE_NAME,), addresses=(spec.node_ip,), server=True)
        pki.service_account_keys(layout.pki)
        tokens = pki.token_file(layout.pki, IDENTITIES)
        for name in IDENTITIES:
            pki.write_private(layout.pki / f"{name}.token", tokens[name])
        contexts: dict[str, str | None] = {
            spec.contexts[site]: spec.namespaces[site] for site in spec.contexts
        }
        current = next(iter(contexts))
        pki.kubeconfig(
            layout.kubeconfig, spec.api_url, ca.cert_file, pki.ADMIN_USER, tokens["admin"], contexts, current
        )
        for name in ("kubelet", "controller-manager", "scheduler", "kube-proxy"):
            pki.kubeconfig(layout.config / f"{name}.kubeconfig", spec.api_url, ca.cert_file, name, tokens[name],
                           {name: None}, name)  # fmt: skip
        self.state.data = {"bin_dir": str(bin_dir), "version": version, "tokens": tokens, "processes": {},
                           "spec": spec.__dict__}  # fmt: skip
        self.state.save()
        self._write_configs()

    def _write_configs(self) -> None:
        layout, spec = self.layout, self.spec
        cni = {
            "cniVersion": "0.4.0",
            "name": "watertight",
            "plugins": [
                {
                    "type": "bridge",
                    "bridge": BRIDGE,
                    "isGateway": True,
                    # the pods' default route: Service addresses are outside the pod network
                    "isDefaultGateway": True,
                    # pods talk to pods and to the node only: nothing is masqueraded to the world
                    "ipMasq": False,
                    "hairpinMode": True,
                    "ipam": {
                        "type": "host-local",
                        "ranges": [[{"subnet": spec.pod_network, "gateway": spec.node_ip}]],
                        "dataDir": str(layout.cni_ipam_dir),
                    },
                }
            ],
        }
        (layout.cni_conf_dir / "10-watertight.conflist").write_text(json.dumps(cni, indent=1))
        state = layout.containerd_state
        (layout.config / "containerd.toml").write_text(
            f"""# written by watertight cluster up
version = 2
root = "{containerd_root()}"
state = "{state / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
                    "io.containerd.snapshotter.v1.zfs", "io.containerd.snapshotter.v1.devmapper"]
[grpc]
  address = "{layout.containerd_socket}"
[ttrpc]
  address = "{state / "containerd.sock.ttrpc"}"
[plugins."io.containerd.internal.v1.opt"]
  path = "{state / "opt"}"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "{self.state.data.get("pause_image", "")}"
  # root here cannot lower oom_score_adj: keep containers at or above containerd's own
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "{CNI_BIN_DIR}"
    conf_dir = "{layout.cni_conf_dir}"
    max_conf_num = 1
"""
        )
        kubelet = {
            "apiVersion": "kubelet.config.k8s.io/v1beta1",
            "kind": "KubeletConfiguration",
            "address": spec.node_ip,
            "port": KUBELET_PORT,
            "readOnlyPort": 0,
            "healthzBindAddress": "127.0.0.1",
            "healthzPort": KUBELET_HEALTHZ_PORT,
            "authentication": {
                "anonymous": {"enabled": False},
                "webhook": {"enabled": True},
                "x509": {"clientCAFile": str(layout.pki / "ca.crt")},
            },
            "authorization": {"mode": "Webhook"},
            "tlsCertFile": str(layout.pki / "kubelet.crt"),
            "tlsPrivateKeyFile": str(layout.pki / "kubelet.key"),
            "cgroupDriver": "cgroupfs",
            "clusterDNS": [spec.node_ip],
            "clusterDomain": spec.cluster_domain,
            "resolvConf": "/etc/resolv.conf",
            # two shared cores: requests schedule and weigh, limits are not enforced as CFS quota
            "cpuCFSQuota": False,
            "failSwapOn": False,
            "maxPods": 60,
            "serializeImagePulls": False,
            # the images are imported, never pulled: never garbage-collect them
            "imageGCHighThresholdPercent": 100,
            "imageGCLowThresholdPercent": 99,
            "evictionHard": {
                "memory.available": "200Mi",
                "nodefs.available": "3%",
                "imagefs.available": "3%",
            },
            "containerLogMaxSize": "10Mi",
            "containerLogMaxFiles": 2,
            "makeIPTablesUtilChains": True,
            "rotateCertificates": False,
            "staticPodPath": "",
        }
        (layout.config / "kubelet.yaml").write_text(yaml.safe_dump(kubelet, sort_keys=False))
        agent = {
            "server": spec.api_url,
            "ca_file": str(layout.pki / "ca.crt"),
            "token_file": str(layout.pki / "agent.token"),
            "dns_address": spec.node_ip,
            "dns_port": DNS_PORT,
            "cluster_domain": spec.cluster_domain,
            "storage_class": spec.storage_class,
            "provisioner": STORAGE_PROVISIONER,
            "volumes_dir": str(layout.volumes),
        }
        (layout.config / "agent.json").write_text(json.dumps(agent, indent=1))

    def set_pause_image(self, reference: str) -> None:
        self.state.data["pause_image"] = reference
        self.state.save()
        self._write_configs()

    # -- the bridge --
    def make_bridge(self) -> None:
        """The pods' bridge with the node's address, before the API server binds to it."""
        exists = Path("/sys/class/net", BRIDGE).exists()
        if not exists:
            subprocess.run(["ip", "link", "add", BRIDGE, "type", "bridge"], check=True, timeout=30)
        addresses = subprocess.run(["ip", "-o", "-4", "addr", "show", "dev", BRIDGE], capture_output=True,
                                   text=True, check=True, timeout=30).stdout  # fmt: skip
        if f" {self.spec.bridge_cidr} " not in addresses:
            subprocess.run(
                ["ip", "addr", "add", self.spec.bridge_cidr, "dev", BRIDGE], check=True, timeout=30
            )
        subprocess.run(["ip", "link", "set", BRIDGE, "up"], check=True, timeout=30)

    # -- processes --
    def start_control_plane(self) -> None:
        layout, spec, binary = self.layout, self.spec, self.bin_dir
        p = layout.pki
        etcd_url = f"https://127.0.0.1:{ETCD_CLIENT_PORT}"
        self.progress("starting etcd (the cluster's store) on 127.0.0.1")
        record = self._spawn(ETCD, [
            shutil.which("etcd") or "/usr/bin/etcd", "--name", NODE_NAME, "--data-dir", str(layout.etcd_data),
            "--listen-client-urls", etcd_url, "--advertise-client-urls", etcd_url,
            "--listen-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-advertise-peer-urls", f"http://127.0.0.1:{ETCD_PEER_PORT}",
            "--initial-cluster", f"{NODE_NAME}=http://127.0.0.1:{ETCD_PEER_PORT}",
            "--cert-file", str(p / "etcd-server.crt"), "--key-file", str(p / "etcd-server.key"),
            "--client-cert-auth", "--trusted-ca-file", str(p / "ca.crt"),
            "--logger", "zap", "--log-outputs", "stderr", "--snapshot-count", "10000",
            "--auto-compaction-mode", "periodic", "--auto-compaction-retention", "1h",
        ])  # fmt: skip
        _wait("etcd", lambda: _get(f"{etcd_url}/health", ca_file=p / "ca.crt",
                                   cert=(p / "etcd-client.crt", p / "etcd-client.key"))[0] == 200,
              START_TIMEOUT_S, self.log_path(ETCD), record)  # fmt: skip
        self.progress(f"starting kube-apiserver on {spec.api_url}")
        record = self._spawn(APISERVER, [
            str(binary / "kube-apiserver"),
            "--etcd-servers", etcd_url, "--etcd-cafile", str(p / "ca.crt"),
            "--etcd-certfile", str(p / "etcd-client.crt"), "--etcd-keyfile", str(p / "etcd-client.key"),
            "--bind-address", spec.node_ip, "--advertise-address", spec.node_ip,
            "--secure-port", str(API_PORT), "--insecure-port", "0",
            "--tls-cert-file", str(p / "apiserver.crt"), "--tls-private-key-file", str(p / "apiserver.key"),
            "--client-ca-file", str(p / "ca.crt"), "--token-auth-file", str(p / "tokens.csv"),
            "--authorization-mode", "Node,RBAC", "--enable-admission-plugins", "NodeRestriction",
            "--service-cluster-ip-range", SERVICE_NETWORK, "--service-node-port-range", NODE_PORT_RANGE,
            "--service-account-key-file", str(p / "sa.pub"),
            "--service-account-signing-key-file", str(p / "sa.key"),
            "--service-account-issuer", f"https://kubernetes.default.svc.{spec.cluster_domain}",
            "--kubelet-client-certificate", str(p / "apiserver-kubelet-client.crt"),
            "--kubelet-client-key", str(p / "apiserver-kubelet-client.key"),
            "--kubelet-certificate-authority", str(p / "ca.crt"),
            "--kubelet-preferred-address-types", "InternalIP",
            "--profiling=false", "--event-ttl", "1h", "--v", "1",
        ])  # fmt: skip
        admin = self.token("admin")
        _wait("kube-apiserver", lambda: _get(f"{spec.api_url}/readyz", token=admin, ca_file=p / "ca.crt")[0] == 200,
              START_TIMEOUT_S, self.log_path(APISERVER), record)  # fmt: skip
        self.progress("starting kube-controller-manager and kube-scheduler")
        self._spawn(CONTROLLER_MANAGER, [
            str(binary / "kube-controller-manager"),
            "--kubeconfig", str(layout.config / "controller-manager.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(CONTROLLER_MANAGER_PORT), "--port", "0",
            "--leader-elect=false", "--use-service-account-credentials=true",
            "--service-account-private-key-file", str(p / "sa.key"), "--root-ca-file", str(p / "ca.crt"),
            "--service-cluster-ip-range", SERVICE_NETWORK, "--allocate-node-cidrs=false",
            "--authentication-skip-lookup=true", "--profiling=false", "--v", "1",
        ])  # fmt: skip
        self._spawn(SCHEDULER, [
            str(binary / "kube-scheduler"),
            "--kubeconfig", str(layout.config / "scheduler.kubeconfig"),
            "--bind-address", "127.0.0.1", "--secure-port", str(SCHEDULER_PORT), "--port", "0",
            "--leader-elect=false", "--authentication-skip-lookup=true", "--profiling=false", "--v", "1",
        ])  # fmt: skip

    def start_containerd(self) -> None:
        self.progress(
            f"starting containerd (its own socket {self.layout.containerd_socket}, images in {containerd_root()})"
        )
        record = self._spawn(CONTAINERD, [shutil.which("containerd") or "/usr/bin/containerd",
                                          "--config", str(self.layout.config / "containerd.toml")])  # fmt: skip
        ctr = ctr_command(self.layout)
        _wait("containerd", lambda: subprocess.run([*ctr, "version"], capture_output=True, timeout=10).returncode == 0,
              START_TIMEOUT_S, self.log_path(CONTAINERD), record)  # fmt: skip

    def start_node(self, python: str) -> None:
        layout, spec, binary = self.layout, self.spec, self.bin_dir
        self.progress(f"starting the agent (cluster DNS on {spec.node_ip}:{DNS_PORT}, hostPath volumes)")
        record = self._spawn(
            AGENT, [python, "-m", "watertight.cluster.agent", "--config", str(layout.config / "agent.json")]
        )
        _wait("the agent's DNS", lambda: "DNS for" in self.log_path(AGENT).read_text(errors="replace"),
              START_TIMEOUT_S, self.log_path(AGENT), record)  # fmt: skip
        self.progress(f"starting the kubelet (node {NODE_NAME} at {spec.node_ip})")
        record = self._spawn(KUBELET, [
            str(binary / "kubelet"), "--config", str(layout.config / "kubelet.yaml"),
            "--kubeconfig", str(layout.config / "kubelet.kubeconfig"),
            "--container-runtime", "remote",
            "--container-runtime-endpoint", f"unix://{layout.containerd_socket}",
            "--node-ip", spec.node_ip, "--hostname-override", NODE_NAME,
            "--root-dir", str(layout.kubelet_root), "--cert-dir", str(layout.kubelet_root / "pki"),
            "--pod-infra-container-image", str(self.state.data.get("pause_image", "")),
            "--oom-score-adj", "0", "--v", "1",
        ])  # fmt: skip
        admin, ca = self.token("admin"), layout.pki / "ca.crt"

        def node_ready() -> bool:
            status, body = _get(f"{spec.api_url}/api/v1/nodes/{NODE_NAME}", token=admin, ca_file=ca)
            if status != 200:
                return False
            conditions = json.loads(body).get("status", {}).get("conditions", [])
            return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)

        _wait(f"node {NODE_NAME} Ready", node_ready, NODE_READY_TIMEOUT_S, self.log_path(KUBELET), record)
        self.progress(
            "starting kube-proxy (iptables mode: Service addresses and NodePorts on the node's address)"
        )
        record = self._spawn(PROXY, [
            str(binary / "kube-proxy"), "--kubeconfig", str(layout.config / "kube-proxy.kubeconfig"),
            "--hostname-override", NODE_NAME, "--bind-address", spec.node_ip,
            "--cluster-cidr", spec.pod_network, "--proxy-mode", "iptables",
            "--nodeport-addresses", f"{spec.node_ip}/32",
            # leave the machine's conntrack settings alone
            "--conntrack-max-per-core", "0", "--conntrack-tcp-timeout-established", "0",
            "--conntrack-tcp-timeout-close-wait", "0",
            "--healthz-bind-address", f"127.0.0.1:{PROXY_HEALTHZ_PORT}",
            "--metrics-bind-address", f"127.0.0.1:{PROXY_METRICS_PORT}",
            "--oom-score-adj", "0", "--v", "1",
        ])  # fmt: skip
        _wait("kube-proxy", lambda: _get(f"http://127.0.0.1:{PROXY_HEALTHZ_PORT}/healthz")[0] == 200,
              START_TIMEOUT_S, self.log_path(PROXY), record)  # fmt: skip

    def start_entry(self, python: str, config_file: Path) -> ProcessRecord:
        record = self._spawn(ENTRY, [python, "-m", "cardcore.gateway", "--config", str(config_file)])
        _wait("the entry", lambda: _get(f"{self.spec.entry_url}/readyz")[0] == 200, START_TIMEOUT_S,
              self.log_path(ENTRY), record)  # fmt: skip
        return record

    # -- stop --
    def _stop(self, name: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
        record = self.state.records().get(name)
        if record is None:
            return
        if processes.alive(record):
            processes.stop_tree(record, [], timeout_s)
        self.state.set_process(name, None)

    def _delete_pods(self) -> None:
        """Every pod deleted at once and the kubelet given time to stop its sandboxes (CNI DEL
        removes the veths, the addresses and the network namespaces)."""
        admin, ca, api = self.token("admin"), self.layout.pki / "ca.crt", self.spec.api_url
        status, body = _get(f"{api}/api/v1/pods", token=admin, ca_file=ca)
        if status != 200:
            return
        pods = json.loads(body).get("items", [])
        if not pods:
            return
        self.progress(f"deleting {len(pods)} pods and waiting for the kubelet to stop them")
        context = ssl.create_default_context(cafile=str(ca))
        for pod in pods:
            meta = pod["metadata"]
            request = urllib.request.Request(
                f"{api}/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                method="DELETE",
                data=json.dumps({"gracePeriodSeconds": 0}).encode(),
                headers={"Authorization": f"Bearer {admin}", "Content-Type": "application/json"},
            )
            with contextlib.suppress(OSError):
                urllib.request.urlopen(request, timeout=HTTP_TIMEOUT_S, context=context).close()
        ctr = ctr_command(self.layout)
        deadline = time.monotonic() + PODS_GONE_TIMEOUT_S
        while time.monotonic() < deadline:
            tasks = subprocess.run([*ctr, "-n", "k8s.io", "tasks", "list", "-q"], capture_output=True, text=True,
                                   timeout=30, check=False).stdout.split()  # fmt: skip
            netns = [e for e in hoststate.netns_entries() if Path(e).name.startswith("cni-")]
            if not tasks and not netns:
                return
            time.sleep(1)
        self.progress("some pods were still running after the wait; their processes are killed below")

    def _kill_containers(self) -> None:
        """What containerd still runs (the shims outlive containerd): killed by the PIDs its state
        directory records."""
        task_dir = self.layout.containerd_state / "state" / "io.containerd.runtime.v2.task"
        pids = []
        for pid_file in [*task_dir.glob("*/*/init.pid"), *task_dir.glob("*/*/shim.pid")]:
            with contextlib.suppress(OSError, ValueError):
                pids.append(int(pid_file.read_text().strip()))
        if pids:
            tree = processes.children_map()
            every = sorted({pid for p in pids for pid in [p, *processes.descendants(p, tree)]})
            self.progress(f"killing {len(every)} processes of containers and shims containerd left")
            processes.signal_pids(every, signal.SIGKILL)
            processes.wait_gone(every, STOP_TIMEOUT_S)

    def stop(self) -> list[str]:
        """Stop everything by PID in reverse order and put the machine back as recorded; returns
        the differences that remain (empty: as found)."""
        running = self.state.running()
        self._stop(ENTRY)
        self._stop(CONTROLLER_MANAGER)
        self._stop(SCHEDULER)
        if running.get(APISERVER) and running.get(KUBELET) and "tokens" in self.state.data:
            self._delete_pods()
        for name in (PROXY, KUBELET, AGENT, APISERVER, ETCD):
            if name in self.state.records():
                self.progress(f"stopping {name}")
            self._stop(name)
        self._kill_containers()
        if CONTAINERD in self.state.records():
            self.progress("stopping containerd")
        self._stop(CONTAINERD)
        self._kill_containers()
        remaining: list[str] = []
        if self.layout.host_before.exists():
            before = hoststate.HostState.from_json(self.layout.host_before.read_text())
            self.progress("putting the machine back as it was before the cluster")
            remaining = hoststate.restore(before, self.layout.mount_prefixes(), BRIDGE, self.progress)
            if not remaining:
                self.layout.host_before.unlink()
        release_machine(self.layout)
        return remaining

    # -- claim and record --
    def begin(self) -> None:
        """Claim the machine and record it, unless a record of an unfinished stop is there."""
        claim_machine(self.layout)
        if self.layout.host_before.exists():
            self.progress(
                f"keeping the machine's record of {self.layout.host_before} (an earlier start did not stop cleanly)"
            )
            return
        self.layout.root.mkdir(parents=True, exist_ok=True)
        before = hoststate.record(self.layout.mount_prefixes(), BRIDGE)
        self.layout.host_before.write_text(before.to_json())


def binaries_or_build(progress: Progress) -> tuple[str, Path]:
    found = binaries.cached()
    if found:
        progress(f"Kubernetes binaries {found[0]} cached in {found[1]}")
        return found
    progress("no Kubernetes binaries cached: building them from Debian's source package (once per machine)")
    return binaries.ensure()
