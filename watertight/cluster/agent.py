"""The local cluster's agent: what a cluster gets from add-ons that Debian does not package.

Owns two loops fed from the API server (a list every second; the cluster is small):
- cluster DNS: answers ``<service>.<namespace>.svc.<domain>`` with the Service's ClusterIP (a
  headless Service: its ready endpoints' addresses) over UDP and TCP on the node's address, which
  the kubelet gives every pod as its nameserver. Names outside the cluster domain get NXDOMAIN:
  pods here resolve cluster names only (nothing they run needs another).
- a hostPath provisioner for the cluster's StorageClass: a claim of that class, once a pod uses
  it, gets a PersistentVolume on a fresh directory under the cluster's volumes directory, owned by
  the pod's fsGroup (as the kubelet does for volumes it manages); a released volume's directory
  is deleted with it (reclaim policy Delete).
Never: delete a directory outside the volumes directory, answer for a name it was not given by
the API, or hold a request longer than its bound.

``python -m watertight.cluster.agent --config FILE`` (``watertight cluster up`` starts it).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import socketserver
import ssl
import struct
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# a Service's name answers within this long of its creation; claims are provisioned as soon
POLL_INTERVAL_S = 1.0
# released volumes are rare (a runbook deleting a claim): looked for every this many polls
RELEASED_EVERY_POLLS = 10
REQUEST_TIMEOUT_S = 10.0
TTL_S = 5
DNS_MESSAGE_BYTES_MAX = 4096
TYPE_A, TYPE_AAAA, TYPE_ANY = 1, 28, 255
CLASS_IN = 1
RCODE_NOERROR, RCODE_FORMERR, RCODE_NXDOMAIN, RCODE_NOTIMP = 0, 1, 3, 4


@dataclass(frozen=True)
class AgentConfig:
    server: str  # https://<node ip>:6443
    ca_file: str
    token_file: str
    dns_address: str  # the node's address: every pod's nameserver
    dns_port: int
    cluster_domain: str  # cluster.local
    storage_class: str
    provisioner: str
    volumes_dir: str

    @classmethod
    def load(cls, path: str) -> AgentConfig:
        return cls(**json.loads(Path(path).read_text()))


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


class Api:
    """The few REST calls the agent makes, with its token and the cluster's CA, on one kept-alive
    connection (a TLS handshake per call cost more than the call); lists are read from the API
    server's watch cache (resourceVersion=0)."""

    def __init__(self, config: AgentConfig) -> None:
        parts = urllib.parse.urlsplit(config.server)
        self.host, self.port = parts.hostname or "", parts.port or 443
        self.token = Path(config.token_file).read_text().strip()
        self.context = ssl.create_default_context(cafile=config.ca_file)
        self.connection: http.client.HTTPSConnection | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        if method == "GET":
            path += ("&" if "?" in path else "?") + "resourceVersion=0"
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        data = json.dumps(body).encode() if body is not None else None
        for attempt in (1, 2):  # a kept-alive connection the server closed is opened again once
            if self.connection is None:
                self.connection = http.client.HTTPSConnection(
                    self.host, self.port, timeout=REQUEST_TIMEOUT_S, context=self.context
                )
            try:
                self.connection.request(method, path, body=data, headers=headers)
                answer = self.connection.getresponse()
                payload = answer.read()
            except (OSError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt == 2:
                    raise
                continue
            if answer.status >= 400:
                raise ApiError(answer.status, f"{method} {path}: {answer.status} {payload[:200]!r}")
            return json.loads(payload or b"null")
        raise AssertionError("unreachable")


class ApiError(OSError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# ---- DNS -----------------------------------------------------------------------------------------


class Records:
    """Name (lower case, no trailing dot) -> IPv4 addresses, replaced whole on each refresh."""

    def __init__(self, domain: str) -> None:
        self.domain = domain.strip(".").lower()
        self._lock = threading.Lock()
        self._names: dict[str, list[str]] = {}

    def replace(self, names: dict[str, list[str]]) -> bool:
        with self._lock:
            changed = names != self._names
            self._names = names
            return changed

    def lookup(self, name: str) -> list[str] | None:
        with self._lock:
            return self._names.get(name)

    def refresh(self, api: Api) -> bool:
        services = api.call("GET", "/api/v1/services")["items"]
        endpoints = {
            (e["metadata"]["namespace"], e["metadata"]["name"]): e
            for e in api.call("GET", "/api/v1/endpoints")["items"]
        }
        names: dict[str, list[str]] = {}
        for service in services:
            meta, spec = service["metadata"], service.get("spec") or {}
            name = f"{meta['name']}.{meta['namespace']}.svc.{self.domain}"
            cluster_ip = spec.get("clusterIP")
            if cluster_ip and cluster_ip != "None":
                names[name] = [cluster_ip]
                continue
            subsets = (endpoints.get((meta["namespace"], meta["name"])) or {}).get("subsets") or []
            names[name] = sorted({a["ip"] for s in subsets for a in s.get("addresses") or []})
        return self.replace(names)


def _read_name(message: bytes, offset: int) -> tuple[str, int]:
    labels: list[str] = []
    while True:
        if offset >= len(message):
            raise ValueError("name runs past the message")
        length = message[offset]
        if length == 0:
            return ".".join(labels), offset + 1
        if length & 0xC0:
            raise ValueError("compressed names are not expected in a question")
        labels.append(message[offset + 1 : offset + 1 + length].decode("ascii", errors="replace"))
        offset += 1 + length


def answer(query: bytes, records: Records) -> bytes | None:
    """The response to one DNS query message (None: not worth an answer)."""
    if len(query) < 12:
        return None
    ident, flags, questions = struct.unpack("!HHH", query[:6])
    if flags & 0x8000:
        return None  # a response, not a query
    opcode = (flags >> 11) & 0xF
    recursion_desired = flags & 0x0100

    def reply(
        rcode: int, question: bytes = b"", answers: list[bytes] | None = None, authoritative: bool = True
    ) -> bytes:
        header_flags = 0x8000 | (opcode << 11) | (0x0400 if authoritative else 0) | recursion_desired | rcode
        count = 1 if question else 0
        return (
            struct.pack("!HHHHHH", ident, header_flags, count, len(answers or []), 0, 0)
            + question
            + b"".join(answers or [])
        )

    if opcode != 0:
        return reply(RCODE_NOTIMP, authoritative=False)
    if questions != 1:
        return reply(RCODE_FORMERR, authoritative=False)
    try:
        name, end = _read_name(query, 12)
        qtype, qclass = struct.unpack("!HH", query[end : end + 4])
    except (ValueError, struct.error):
        return reply(RCODE_FORMERR, authoritative=False)
    question = query[12 : end + 4]
    wanted = name.lower().rstrip(".")
    addresses = records.lookup(wanted)
    if addresses is None:
        # the question goes back too: resolvers drop an answer whose question is not theirs
        return reply(RCODE_NXDOMAIN, question)
    answers = []
    if qclass == CLASS_IN and qtype in (TYPE_A, TYPE_ANY):
        for address in addresses:
            answers.append(
                struct.pack("!HHHIH", 0xC00C, TYPE_A, CLASS_IN, TTL_S, 4) + socket.inet_aton(address)
            )
    return reply(RCODE_NOERROR, question, answers)


class _Udp(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = True
    records: Records


class _Tcp(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    records: Records


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        response = answer(data[:DNS_MESSAGE_BYTES_MAX], self.server.records)  # type: ignore[attr-defined]
        if response:
            sock.sendto(response, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(REQUEST_TIMEOUT_S)
        try:
            header = self.request.recv(2)
            if len(header) < 2:
                return
            (length,) = struct.unpack("!H", header)
            data = b""
            while len(data) < min(length, DNS_MESSAGE_BYTES_MAX):
                chunk = self.request.recv(length - len(data))
                if not chunk:
                    return
                data += chunk
            response = answer(data, self.server.records)  # type: ignore[attr-defined]
            if response:
                self.request.sendall(struct.pack("!H", len(response)) + response)
        except OSError:
            return


def serve_dns(config: AgentConfig, records: Records) -> list[socketserver.BaseServer]:
    address = (config.dns_address, config.dns_port)
    udp = _Udp(address, _UdpHandler)
    udp.records = records
    tcp = _Tcp(address, _TcpHandler)
    tcp.records = records
    servers: list[socketserver.BaseServer] = [udp, tcp]
    for server in servers:
        threading.Thread(target=server.serve_forever, daemon=True).start()
    return servers


# ---- hostPath provisioner ------------------------------------------------------------------------


class Provisioner:
    def __init__(self, config: AgentConfig, api: Api) -> None:
        self.config = config
        self.api = api
        self.volumes_dir = Path(config.volumes_dir).resolve()

    def _consumer_fs_group(
        self, namespace: str, claim: str, pods: list[dict[str, Any]]
    ) -> tuple[bool, int | None]:
        for pod in pods:
            if pod["metadata"]["namespace"] != namespace:
                continue
            spec = pod.get("spec") or {}
            for volume in spec.get("volumes") or []:
                if (volume.get("persistentVolumeClaim") or {}).get("claimName") == claim:
                    return True, (spec.get("securityContext") or {}).get("fsGroup")
        return False, None

    def provision(self, look_for_released: bool = True) -> None:
        claims = self.api.call("GET", "/api/v1/persistentvolumeclaims")["items"]
        pending = [
            c for c in claims
            if (c.get("status") or {}).get("phase") == "Pending"
            and (c.get("spec") or {}).get("storageClassName") == self.config.storage_class
            and not (c.get("spec") or {}).get("volumeName")
        ]  # fmt: skip
        if pending:
            pods = self.api.call("GET", "/api/v1/pods")["items"]
            for claim in pending:
                self._provision_one(claim, pods)
        if not look_for_released:
            return
        volumes = self.api.call("GET", "/api/v1/persistentvolumes")["items"]
        for volume in volumes:
            spec = volume.get("spec") or {}
            if (
                spec.get("storageClassName") == self.config.storage_class
                and (volume.get("status") or {}).get("phase") == "Released"
                and spec.get("persistentVolumeReclaimPolicy") == "Delete"
            ):
                self._delete_one(volume)

    def _provision_one(self, claim: dict[str, Any], pods: list[dict[str, Any]]) -> None:
        meta, spec = claim["metadata"], claim["spec"]
        used, fs_group = self._consumer_fs_group(meta["namespace"], meta["name"], pods)
        if not used:
            return  # like WaitForFirstConsumer: the owner is known once a pod names the claim
        name = f"pvc-{meta['uid']}"
        path = self.volumes_dir / f"{meta['namespace']}-{meta['name']}-{meta['uid'][:8]}"
        path.mkdir(parents=True, exist_ok=True)
        if fs_group is not None:
            os.chown(path, 0, int(fs_group))
            os.chmod(path, 0o2770)
        else:
            os.chmod(path, 0o777)
        volume = {
            "apiVersion": "v1",
            "kind": "PersistentVolume",
            "metadata": {
                "name": name,
                "annotations": {"pv.kubernetes.io/provisioned-by": self.config.provisioner},
            },
            "spec": {
                "capacity": {"storage": spec["resources"]["requests"]["storage"]},
                "accessModes": spec.get("accessModes") or ["ReadWriteOnce"],
                "persistentVolumeReclaimPolicy": "Delete",
                "storageClassName": self.config.storage_class,
                "hostPath": {"path": str(path), "type": "Directory"},
                "claimRef": {
                    "apiVersion": "v1",
                    "kind": "PersistentVolumeClaim",
                    "namespace": meta["namespace"],
                    "name": meta["name"],
                    "uid": meta["uid"],
                },
            },
        }
        try:
            self.api.call("POST", "/api/v1/persistentvolumes", volume)
        except ApiError as error:
            if error.status != 409:  # made on an earlier turn
                raise
            return
        owner = f"fsGroup {fs_group}" if fs_group is not None else "no fsGroup: mode 0777"
        say(
            f"provisioned {name} ({spec['resources']['requests']['storage']}) at {path} for claim {meta['namespace']}/{meta['name']} ({owner})"
        )

    def _delete_one(self, volume: dict[str, Any]) -> None:
        path = Path(((volume.get("spec") or {}).get("hostPath") or {}).get("path", "")).resolve()
        if self.volumes_dir not in path.parents:
            say(f"not deleting {volume['metadata']['name']}: {path} is outside {self.volumes_dir}")
            return
        shutil.rmtree(path, ignore_errors=True)
        try:
            self.api.call("DELETE", f"/api/v1/persistentvolumes/{volume['metadata']['name']}")
        except ApiError as error:
            if error.status != 404:
                raise
        say(f"deleted the released volume {volume['metadata']['name']} and {path}")


def run(config: AgentConfig) -> None:
    api = Api(config)
    records = Records(config.cluster_domain)
    serve_dns(config, records)
    say(f"DNS for *.{records.domain} on {config.dns_address}:{config.dns_port} (udp, tcp)")
    provisioner = Provisioner(config, api)
    failing_since: float | None = None
    polls = 0
    while True:
        started = time.monotonic()
        try:
            if records.refresh(api):
                say(f"DNS: {len(records._names)} service names")
            polls += 1
            provisioner.provision(look_for_released=polls % RELEASED_EVERY_POLLS == 0)
            if failing_since is not None:
                say("the API server answers again")
            failing_since = None
        except (OSError, ValueError, KeyError, http.client.HTTPException) as error:
            if failing_since is None:
                failing_since = time.monotonic()
                say(
                    f"cannot read the API server ({error}); keeping the last names, trying every {POLL_INTERVAL_S:g} s"
                )
        time.sleep(max(0.0, POLL_INTERVAL_S - (time.monotonic() - started)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m watertight.cluster.agent", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--config", required=True, help="the agent's JSON settings (written by watertight cluster up)"
    )
    args = parser.parse_args(argv)
    try:
        config = AgentConfig.load(args.config)
    except (OSError, TypeError, ValueError) as error:
        print(f"watertight cluster agent: {args.config}: {error}", file=sys.stderr)
        return 2
    run(config)
    return 0


if __name__ == "__main__":
    sys.exit(main())
