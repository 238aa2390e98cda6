"""Render a Topology into the configuration of every component: etcd flags, Patroni YAML, app server,
gateway and entry settings.

Owns: what each process is told (its command line, environment and config files) and the order in
which they start. The renderers take an ``Endpoints`` for every address they write, so the Pulumi
programs can reuse them with Kubernetes service names; ``render_local`` is the local runtime's
whole set.

Secrets (the PAN key, PostgreSQL passwords) never go on a command line: Patroni reads its passwords
from ``PATRONI_*_PASSWORD`` and the app servers from ``PGPASSWORD`` (the Kubernetes form is an env
var from a Secret), and the PAN key is in the app server's settings file, which the runtime writes
readable by its owner only. Never: start or contact anything.
"""

from __future__ import annotations

import abc
import secrets as secrets_module
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import msgspec
import yaml
from cardcore.platform import auth

from watertight import pg, tls
from watertight.topology import CENTERS, Topology

# ---- names ----------------------------------------------------------------------------------------

DATABASE = "cardcore"
SUPERUSER = pg.SUPERUSER
REPLICATION_USER = "replicator"
ETCD_BIN = "/usr/bin/etcd"
ETCD_CLUSTER_TOKEN_SUFFIX = "-etcd"
PATRONI_NAMESPACE = "/watertight/"
DR_SITE = "dr"
ENTRY = "entry"

SECRET_PAN_KEY = "pan_key_hex"
SECRET_SUPERUSER_PASSWORD = "superuser_password"
SECRET_REPLICATION_PASSWORD = "replication_password"
# {"acquirer": token, "channel": token, "operator": token}: what clients send (CONTRACT)
SECRET_API_TOKENS = "api_tokens"
# the same shape, while a rotation is under way: still accepted, no longer handed out
SECRET_API_TOKENS_PREVIOUS = "api_tokens_previous"
# the same shape, at the start of a rotation: accepted already, not handed out yet (the servers
# must accept a token before any client is given it)
SECRET_API_TOKENS_NEXT = "api_tokens_next"
# {"current": N, "keys": {"N": "<64 hex>", ...}}: the master keys of card and identity data by
# version (cardcore.common.crypto); version 1 is the first pan_key_hex
SECRET_KEY_RING = "key_ring"
# {"cert": PEM, "key": PEM}: the run's CA, and the server certificate PostgreSQL presents, signed
# by it for every site address ({"cert", "key", "addresses"}); see watertight.tls. Optional: a
# target that has none serves PostgreSQL without TLS
SECRET_TLS_CA = "tls_ca"
SECRET_TLS_SERVER = "tls_server"
# {"cert", "key"}: the toolkit's client certificate (probes, runbooks, readiness checks and
# Prometheus present it to etcd, which admits no client without one the CA signed)
SECRET_TLS_CLIENT = "tls_client"
REQUIRED_SECRETS = (
    SECRET_PAN_KEY,
    SECRET_SUPERUSER_PASSWORD,
    SECRET_REPLICATION_PASSWORD,
    SECRET_API_TOKENS,
    SECRET_KEY_RING,
)
# beside each app server's and gateway's settings: the digests of the tokens it accepts
API_TOKENS_FILE = "api-tokens.json"
# beside each app server's settings: its key ring, read again when it changes (a key rotation)
KEY_RING_FILE = "keys.json"

# start order; components of one stage may start together
STAGE_ETCD = 1
STAGE_PATRONI_LEADER = 2
STAGE_PATRONI_REPLICA = 3
STAGE_DR_STANDBY = 4
STAGE_APP = 5
STAGE_GATEWAY = 6
STAGE_ENTRY = 7
STAGE_MONITORING = 8  # watertight.monitoring.config: Prometheus, Alertmanager, the PostgreSQL exporters

KINDS = (
    "etcd",
    "etcd-dr",
    "patroni",
    "app",
    "gateway",
    "entry",
    "prometheus",
    "alertmanager",
    "postgres-exporter",
)

# a crashed primary PostgreSQL (Patroni alive) is restarted in place for this long before failing
# over; Patroni's default of 300 s is ten times the RTO. Failover in synchronous mode loses nothing.
PRIMARY_START_TIMEOUT_S = 10
# the dr slot on each cell's primary keeps WAL for dr while dr is down, but never more than this
DR_SLOT_WAL_KEEP = "1GB"


def scope(cell: int) -> str:
    """The Patroni cluster (DCS scope) of a cell's main cluster."""
    return f"watertight-cell{cell}"


def dr_scope(cell: int) -> str:
    """The Patroni standby cluster of a cell at dr: its own scope in dr's own etcd."""
    return f"watertight-cell{cell}-dr"


def dr_slot_name(cell: int) -> str:
    """The permanent physical slot on the cell's primary that the dr standby leader streams from."""
    return f"dr_cell{cell}"


def etcd_name(site: str) -> str:
    return f"etcd-{site}"


ETCD_DR_NAME = "etcd-dr-local"


def pg_name(cell: int, site: str) -> str:
    """The component name of a cell's member in a site; also its Patroni member name."""
    return f"pg-cell{cell}-{site}"


def app_name(site: str) -> str:
    return f"app-{site}"


def gateway_name(site: str) -> str:
    return f"gateway-{site}"


def generate_secrets() -> dict[str, Any]:
    """Fresh random values for every key of REQUIRED_SECRETS (the runtime keeps them per run)."""
    return complete_secrets({})


def complete_secrets(secrets: Mapping[str, Any], tls_addresses: Iterable[str] = ()) -> dict[str, Any]:
    """``secrets`` with every missing key of REQUIRED_SECRETS made: random, except the key ring of
    a run that has a PAN key already, which starts from it (version 1), so its data stays readable.
    With ``tls_addresses`` (where PostgreSQL listens), also the run's CA, a server certificate
    naming every one of them (a new one when they changed or it expires within 30 days) and the
    toolkit's client certificate."""
    done = dict(secrets)
    wanted = sorted(set(tls_addresses))
    if wanted:
        if not done.get(SECRET_TLS_CA):
            done[SECRET_TLS_CA] = tls.make_ca()
        if not tls.covers(done.get(SECRET_TLS_SERVER), done[SECRET_TLS_CA], wanted):
            done[SECRET_TLS_SERVER] = tls.make_server(done[SECRET_TLS_CA], wanted)
        if not tls.client_current(done.get(SECRET_TLS_CLIENT), done[SECRET_TLS_CA]):
            done[SECRET_TLS_CLIENT] = tls.make_client(done[SECRET_TLS_CA])
    done.setdefault(SECRET_PAN_KEY, secrets_module.token_hex(32))
    done.setdefault(SECRET_SUPERUSER_PASSWORD, secrets_module.token_urlsafe(24))
    done.setdefault(SECRET_REPLICATION_PASSWORD, secrets_module.token_urlsafe(24))
    done.setdefault(SECRET_API_TOKENS, {kind: auth.new_token() for kind in auth.KINDS})
    done.setdefault(SECRET_KEY_RING, {"current": 1, "keys": {"1": done[SECRET_PAN_KEY]}})
    return done


def key_ring_document(secrets: Mapping[str, Any]) -> str:
    """An app server's key ring file (cardcore.platform.settings.read_key_ring)."""
    ring = secrets[SECRET_KEY_RING]
    current = int(ring["current"])
    keys = {str(k): str(v) for k, v in ring["keys"].items()}
    if str(current) not in keys:
        raise ValueError(f"secrets: {SECRET_KEY_RING}: current version {current} has no key")
    return _json({"current": current, "keys": keys})


def accepted_api_tokens(secrets: Mapping[str, Any]) -> dict[str, list[str]]:
    """Every token each client kind may use: the current one, and while a rotation is under way
    the next one (before it is handed out) or the previous one (until it is retired)."""
    current = secrets[SECRET_API_TOKENS]
    extra = [secrets.get(SECRET_API_TOKENS_NEXT) or {}, secrets.get(SECRET_API_TOKENS_PREVIOUS) or {}]
    accepted: dict[str, list[str]] = {}
    for kind in auth.KINDS:
        if not current.get(kind):
            raise ValueError(f"secrets: {SECRET_API_TOKENS}.{kind} is missing")
        accepted[kind] = [current[kind]] + [more[kind] for more in extra if more.get(kind)]
    return accepted


def api_tokens_document(secrets: Mapping[str, Any]) -> str:
    """The tokens file of every app server, gateway and the entry: SHA-256 digests only, so a
    server's files do not hold a token a client could use."""
    return _json(auth.digests_document(accepted_api_tokens(secrets)))


# ---- endpoints ------------------------------------------------------------------------------------


class Endpoints(abc.ABC):
    """How components reach each other, and where they listen.

    Local: site addresses on loopback plus the topology's ports. Kubernetes: Service names,
    listening on every interface of the pod.
    """

    @abc.abstractmethod
    def listen_address(self, site: str) -> str:
        """The address a component of ``site`` binds to (local: the site address)."""

    @abc.abstractmethod
    def client_networks(self) -> list[str]:
        """CIDRs that clients of PostgreSQL connect from (pg_hba host lines)."""

    @abc.abstractmethod
    def etcd_client_url(self, site: str) -> str: ...

    @abc.abstractmethod
    def etcd_peer_url(self, site: str) -> str: ...

    @abc.abstractmethod
    def etcd_dr_client_url(self) -> str: ...

    @abc.abstractmethod
    def etcd_dr_peer_url(self) -> str: ...

    @abc.abstractmethod
    def postgres_host(self, cell: int, site: str) -> str: ...

    @abc.abstractmethod
    def postgres_port(self, cell: int) -> int: ...

    @abc.abstractmethod
    def patroni_api_url(self, cell: int, site: str) -> str: ...

    @abc.abstractmethod
    def app_url(self, site: str) -> str: ...

    @abc.abstractmethod
    def app_tls_url(self, site: str) -> str | None:
        """Where the gateway of another site reaches ``site``'s app server over TLS; None where
        the deployment makes no certificates (the hop then stays on ``app_url``)."""

    @abc.abstractmethod
    def gateway_url(self, site: str) -> str: ...

    @abc.abstractmethod
    def entry_url(self) -> str: ...

    @abc.abstractmethod
    def entry_listen_address(self) -> str: ...

    # derived -----------------------------------------------------------------------------------

    def postgres_member(self, cell: int, site: str) -> str:
        """``host:port`` of a cell's member in a site, as a client names it."""
        return f"{self.postgres_host(cell, site)}:{self.postgres_port(cell)}"


@dataclass(frozen=True)
class LocalEndpoints(Endpoints):
    """Every site is a loopback address of this machine; ports come from the topology.

    ``tls``: the run has a CA (``LocalRuntime`` always makes one), so the servers that speak HTTP
    between sites have ``https://`` URLs (etcd's client and peer URLs, Patroni's REST API); False
    only to render a topology whose secrets hold no CA."""

    topology: Topology
    tls: bool = True

    def listen_address(self, site: str) -> str:
        return self.topology.address(site)

    def client_networks(self) -> list[str]:
        # a process in the root namespace connecting to 127.0.2.1 gets the kernel's source address
        # for loopback, 127.0.0.1; inside a per-site network namespace it is the site's address
        addresses = [self.topology.address(site) for site in self.topology.sites]
        addresses += ["127.0.0.1", self.topology.entry.address]
        return [f"{address}/32" for address in dict.fromkeys(addresses)]

    @property
    def _scheme(self) -> str:
        return "https" if self.tls else "http"

    def etcd_client_url(self, site: str) -> str:
        return f"{self._scheme}://{self.topology.address(site)}:{self.topology.ports.etcd_client}"

    def etcd_peer_url(self, site: str) -> str:
        return f"{self._scheme}://{self.topology.address(site)}:{self.topology.ports.etcd_peer}"

    def etcd_dr_client_url(self) -> str:
        return f"{self._scheme}://{self.topology.address(DR_SITE)}:{self.topology.ports.etcd_dr_client}"

    def etcd_dr_peer_url(self) -> str:
        return f"{self._scheme}://{self.topology.address(DR_SITE)}:{self.topology.ports.etcd_dr_peer}"

    def postgres_host(self, cell: int, site: str) -> str:
        return self.topology.address(site)

    def postgres_port(self, cell: int) -> int:
        return self.topology.postgres_port(cell)

    def patroni_api_url(self, cell: int, site: str) -> str:
        return f"{self._scheme}://{self.topology.address(site)}:{self.topology.patroni_port(cell)}"

    def app_url(self, site: str) -> str:
        return self.topology.app_url(site)

    def app_tls_url(self, site: str) -> str:
        return self.topology.app_tls_url(site)

    def gateway_url(self, site: str) -> str:
        return self.topology.gateway_url(site)

    def entry_url(self) -> str:
        return self.topology.entry_url

    def entry_listen_address(self) -> str:
        return self.topology.entry.address


@dataclass(frozen=True)
class KubernetesEndpoints(Endpoints):
    """Every site is a Kubernetes cluster; each component has a Service named like the component
    (``etcd-prod``, ``pg-cell1-samecity``, ``app-prod``...) in ``namespace`` of its site's cluster,
    reached by ``<component>.<namespace>.<service_domains[site]>`` from every site (multi-cluster
    DNS, per-cluster domains with forwarding, or external DNS for LoadBalancer Services: the
    platform's choice, given as configuration). Ports are the topology's; pods listen on every
    interface. ``site_networks`` are the pod and node networks of each site: PostgreSQL clients
    and replication peers connect from them (pg_hba). ``site_namespaces`` names a site's own
    namespace where sites share a cluster (one namespace each); the others use ``namespace``.
    """

    topology: Topology
    namespace: str
    service_domains: Mapping[str, str]
    site_networks: Mapping[str, tuple[str, ...]]
    entry: str  # the URL clients use: the bank's global load balancer in front of the gateways
    site_namespaces: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for site in self.topology.sites:
            if not self.service_domains.get(site):
                raise ValueError(f"KubernetesEndpoints: no service domain for site {site!r}")
            if not self.site_networks.get(site):
                raise ValueError(f"KubernetesEndpoints: no networks for site {site!r}")

    def host(self, site: str, component: str) -> str:
        """The DNS name of a component's Service, as every site resolves it."""
        return f"{component}.{self.namespace_of(site)}.{self.service_domains[site]}"

    def namespace_of(self, site: str) -> str:
        return self.site_namespaces.get(site) or self.namespace

    def listen_address(self, site: str) -> str:
        return "0.0.0.0"

    def client_networks(self) -> list[str]:
        networks = [network for site in self.topology.sites for network in self.site_networks[site]]
        return list(dict.fromkeys(networks))

    def etcd_client_url(self, site: str) -> str:
        return f"http://{self.host(site, etcd_name(site))}:{self.topology.ports.etcd_client}"

    def etcd_peer_url(self, site: str) -> str:
        return f"http://{self.host(site, etcd_name(site))}:{self.topology.ports.etcd_peer}"

    def etcd_dr_client_url(self) -> str:
        return f"http://{self.host(DR_SITE, ETCD_DR_NAME)}:{self.topology.ports.etcd_dr_client}"

    def etcd_dr_peer_url(self) -> str:
        return f"http://{self.host(DR_SITE, ETCD_DR_NAME)}:{self.topology.ports.etcd_dr_peer}"

    def postgres_host(self, cell: int, site: str) -> str:
        return self.host(site, pg_name(cell, site))

    def postgres_port(self, cell: int) -> int:
        return self.topology.postgres_port(cell)

    def patroni_api_url(self, cell: int, site: str) -> str:
        return f"http://{self.host(site, pg_name(cell, site))}:{self.topology.patroni_port(cell)}"

    def app_url(self, site: str) -> str:
        return f"http://{self.host(site, app_name(site))}:{self.topology.ports.app}"

    def app_tls_url(self, site: str) -> None:
        return None  # the stack makes no certificates yet (issue 16)

    def gateway_url(self, site: str) -> str:
        return f"http://{self.host(site, gateway_name(site))}:{self.topology.ports.gateway}"

    def entry_url(self) -> str:
        return self.entry

    def entry_listen_address(self) -> str:
        return "0.0.0.0"


def _port(url: str) -> int:
    port = urlsplit(url).port
    if port is None:
        raise ValueError(f"{url}: no port")
    return port


def _netloc(url: str) -> str:
    return urlsplit(url).netloc


def _address(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    return str(parts.hostname), _port(url)


def _listen_url(url: str, host: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{host}:{_port(url)}"


# ---- component -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """One process of the topology, ready to start."""

    name: str
    kind: str  # one of KINDS
    site: str | None  # None for the entry
    cell: int | None
    argv: list[str]  # absolute program path first
    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # path relative to the component's directory
    service_user: bool = False  # run as watertight.pg.service_user() when root
    ready_url: str | None = None  # GET answers 2xx when ready
    stage: int = 0
    # the runtime creates it before the start (mode 0700, owned by the service user when
    # service_user) and `down --purge` deletes it
    data_dir: Path | None = None
    # first line: the PID of a process the component starts outside its own process tree (Patroni
    # starts the postmaster detached): kill, stop, freeze and RSS must include it and its children
    detached_pid_file: Path | None = None
    # started only while dr is active (the activate-dr runbook), never by a plain `up`: dr's app
    # server and gateway stay idle until both centers are lost
    on_dr_activation: bool = False
    # the (address, port) pairs it listens on: `up` refuses to start it while another process
    # holds one of them
    listens: tuple[tuple[str, int], ...] = ()


# the named pipe in a member's component directory that its Patroni's watchdog writes to
WATCHDOG_PIPE = "watchdog"


def component_dir(run_dir: Path, name: str) -> Path:
    """Where the runtime writes a component's ``files`` (and its working directory)."""
    return run_dir / "components" / name


def drain_file(run_dir: Path) -> Path:
    """The cells drained for maintenance, read by every gateway and the entry of a local run."""
    return run_dir / "control" / "drained-cells.json"


def data_dir(run_dir: Path, name: str) -> Path:
    """A component's data: etcd's data dir; for a PostgreSQL member the directory that holds its
    PGDATA (``pgdata/``), its socket and its pgpass. Owned by the service user for Patroni."""
    return run_dir / "data" / name


def pgdata(member_dir: Path) -> Path:
    """PGDATA of a PostgreSQL member whose data directory is ``member_dir``."""
    return member_dir / "pgdata"


# ---- etcd ----------------------------------------------------------------------------------------


def _etcd_common(data_dir: Path) -> list[str]:
    return [
        "--data-dir",
        str(data_dir),
        "--logger",
        "zap",
        "--log-outputs",
        "stderr",
        # small and fast: Patroni writes a few keys a second; keep history and snapshots short
        "--snapshot-count",
        "5000",
        "--auto-compaction-mode",
        "periodic",
        "--auto-compaction-retention",
        "10m",
        "--heartbeat-interval",
        "100",
        "--election-timeout",
        "1000",
    ]


def _tls_files_for(url: str, files: TlsFiles | None, name: str) -> None:
    """A server whose endpoint is https:// needs its TLS files, and one in clear none."""
    if url.startswith("https://") != (files is not None):
        wanted = "needs its TLS files" if files is None else "is in clear: TLS files make no sense"
        raise ValueError(f"{name}: {url} {wanted} (LocalEndpoints.tls and the run's CA disagree)")


def _etcd_tls(files: TlsFiles | None) -> list[str]:
    """etcd over TLS: clients verify the member with the CA and must present a certificate the CA
    signed (Patroni the run's certificate, the toolkit and Prometheus its client certificate):
    without it anyone who reaches etcd could write a cell's leader key. Peers verify each other
    both ways (each presents the run's certificate, which names every site address)."""
    if files is None:
        return []
    return [
        "--cert-file",
        str(files.cert_file),
        "--key-file",
        str(files.key_file),
        "--client-cert-auth",
        "--trusted-ca-file",
        str(files.ca_file),
        "--peer-cert-file",
        str(files.cert_file),
        "--peer-key-file",
        str(files.key_file),
        "--peer-trusted-ca-file",
        str(files.ca_file),
        "--peer-client-cert-auth",
    ]


def etcd_args(
    topology: Topology, endpoints: Endpoints, site: str, data_dir: Path, tls_files_at: TlsFiles | None = None
) -> list[str]:
    """etcd 3.4 command line of ``site``'s member of the three-site cluster (one member per site).

    The v3 API only (Patroni's etcd3 module); the same flags start the member again on its data
    (etcd ignores the --initial-* flags once its data dir holds a member). ``tls_files_at``: it
    speaks TLS to clients and peers (``_etcd_tls``); the endpoints' URLs must then be https://.
    """
    if site not in topology.sites:
        raise ValueError(f"etcd_args: unknown site {site!r}")
    _tls_files_for(endpoints.etcd_client_url(site), tls_files_at, etcd_name(site))
    listen = endpoints.listen_address(site)
    initial = ",".join(f"{s}={endpoints.etcd_peer_url(s)}" for s in topology.sites)
    return [
        ETCD_BIN,
        "--name",
        site,
        "--listen-client-urls",
        _listen_url(endpoints.etcd_client_url(site), listen),
        "--advertise-client-urls",
        endpoints.etcd_client_url(site),
        "--listen-peer-urls",
        _listen_url(endpoints.etcd_peer_url(site), listen),
        "--initial-advertise-peer-urls",
        endpoints.etcd_peer_url(site),
        "--initial-cluster",
        initial,
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        topology.name + ETCD_CLUSTER_TOKEN_SUFFIX,
        *_etcd_common(data_dir),
        *_etcd_tls(tls_files_at),
    ]


def etcd_dr_args(
    topology: Topology, endpoints: Endpoints, data_dir: Path, tls_files_at: TlsFiles | None = None
) -> list[str]:
    """The single-member etcd at dr that holds the dr standby clusters' leader keys, so they can be
    promoted when the three-site quorum is gone."""
    listen = endpoints.listen_address(DR_SITE)
    _tls_files_for(endpoints.etcd_dr_client_url(), tls_files_at, ETCD_DR_NAME)
    return [
        ETCD_BIN,
        "--name",
        "dr-local",
        "--listen-client-urls",
        _listen_url(endpoints.etcd_dr_client_url(), listen),
        "--advertise-client-urls",
        endpoints.etcd_dr_client_url(),
        "--listen-peer-urls",
        _listen_url(endpoints.etcd_dr_peer_url(), listen),
        "--initial-advertise-peer-urls",
        endpoints.etcd_dr_peer_url(),
        "--initial-cluster",
        f"dr-local={endpoints.etcd_dr_peer_url()}",
        "--initial-cluster-state",
        "new",
        "--initial-cluster-token",
        topology.name + ETCD_CLUSTER_TOKEN_SUFFIX + "-dr",
        *_etcd_common(data_dir),
        *_etcd_tls(tls_files_at),
    ]


# ---- Patroni -------------------------------------------------------------------------------------


def _postgres_parameters(topology: Topology) -> dict[str, Any]:
    """Cluster-wide PostgreSQL settings (Patroni keeps them equal on every member), small for a
    2-core laptop."""
    return {
        "wal_level": "replica",
        "hot_standby": "on",
        "wal_log_hints": "on",  # pg_rewind after failover
        "max_connections": topology.postgres.max_connections,
        "shared_buffers": topology.postgres.shared_buffers,
        "max_wal_senders": 10,
        "max_replication_slots": 10,
        "max_worker_processes": 4,
        "max_parallel_workers": 2,
        "max_parallel_workers_per_gather": 0,
        "autovacuum_max_workers": 2,
        "jit": "off",
        "wal_keep_size": "128MB",
        "max_slot_wal_keep_size": DR_SLOT_WAL_KEEP,
        "max_wal_size": "256MB",
        "min_wal_size": "64MB",
        # notice a silent peer (a partition, a frozen process) in seconds, not the default minute:
        # a leader's commits wait on its sync standby until its walsender gives up on it and
        # Patroni (next loop) drops it from synchronous_standby_names. 2 s + loop_wait stays under
        # the app's 5 s statement timeout, so the cells the other center leads see a stall, not
        # errors, when a center goes silent; the standby answers keepalives at once (status 1 s)
        "wal_sender_timeout": "2s",
        "wal_receiver_timeout": "5s",
        "wal_receiver_status_interval": "1s",
        "hot_standby_feedback": "on",
        "password_encryption": "scram-sha-256",
        "log_line_prefix": "%m [%p] %q%u@%d ",
        "log_min_messages": "warning",
    }


def _pg_hba(endpoints: Endpoints, tls_only: bool = False) -> list[str]:
    # the socket lives in the member's own 0700 directory of the service user: trust there
    lines = ["local all all trust"]
    kind = "hostssl" if tls_only else "host"  # with TLS, a connection in clear is refused
    for network in endpoints.client_networks():
        lines.append(f"{kind} replication {REPLICATION_USER} {network} scram-sha-256")
        lines.append(f"{kind} all all {network} scram-sha-256")
    return lines


@dataclass(frozen=True)
class TlsFiles:
    """Where a component finds its TLS files: the CA's certificate (what it verifies its peers and
    servers with: the primary a member replicates from, the other etcd members), its certificate
    and key (the run's server certificate, which is also the client certificate etcd peers
    present to each other)."""

    @classmethod
    def in_dir(cls, directory: Path) -> TlsFiles:
        return cls(directory / TLS_CA_FILE, directory / TLS_CERT_FILE, directory / TLS_KEY_FILE)

    ca_file: Path
    cert_file: Path
    key_file: Path


# in a member's and an app server's component directory (0600, the member's owned by the service
# user, as PostgreSQL wants its key)
TLS_CA_FILE = "tls/ca.crt"
TLS_CERT_FILE = "tls/server.crt"
TLS_KEY_FILE = "tls/server.key"
# in the run directory, readable by anyone: what operators' clients verify the members with
TLS_ROOT_CERT = "tls-ca.crt"
# in the run directory beside it (0600): the toolkit's client certificate and key (watertight.tls)
TLS_CLIENT_CERT = tls.CLIENT_CERT_BESIDE_CA
TLS_CLIENT_KEY = tls.CLIENT_KEY_BESIDE_CA
# in Prometheus' component directory: the same, which it presents to etcd
TLS_CLIENT_CERT_FILE = "tls/client.crt"
TLS_CLIENT_KEY_FILE = "tls/client.key"


def tls_files(secrets: Mapping[str, Any], server: bool) -> dict[str, str]:
    """A component's TLS files from the run's secrets (``server``: with the certificate and key
    PostgreSQL presents); none when the secrets hold no CA."""
    ca = secrets.get(SECRET_TLS_CA)
    if not ca:
        return {}
    files = {TLS_CA_FILE: str(ca["cert"])}
    if server:
        files[TLS_CERT_FILE] = str(secrets[SECRET_TLS_SERVER]["cert"])
        files[TLS_KEY_FILE] = str(secrets[SECRET_TLS_SERVER]["key"])
    return files


def _watchdog(device: Path | None) -> dict[str, Any]:
    """Patroni's watchdog: off, or required and fed to the member guard's pipe (Patroni's
    ``testing`` driver writes ``Ctimeout=N``, a keepalive per loop and ``V`` to a named pipe;
    watertight.runtime.guard fences PostgreSQL when they stop). ttl // 2 (safety_margin -1): a
    leader whose Patroni froze is fenced 10 s before its leader key can run out."""
    if device is None:
        return {"mode": "off"}
    return {"mode": "required", "driver": "testing", "device": str(device), "safety_margin": -1}


def _patroni_common(
    topology: Topology,
    endpoints: Endpoints,
    cell: int,
    site: str,
    data_dir: Path,
    bin_dir: Path,
    watchdog_device: Path | None = None,
    tls_files_at: TlsFiles | None = None,
) -> dict[str, Any]:
    listen = endpoints.listen_address(site)
    port = endpoints.postgres_port(cell)
    api = endpoints.patroni_api_url(cell, site)
    socket_path = data_dir / f".s.PGSQL.{port}"
    if len(str(socket_path)) > pg.SOCKET_PATH_LENGTH_MAX:
        raise ValueError(
            f"{pg_name(cell, site)}: socket path {socket_path} is longer than {pg.SOCKET_PATH_LENGTH_MAX} "
            "bytes; use a shorter run directory"
        )
    return {
        "name": pg_name(cell, site),
        "namespace": PATRONI_NAMESPACE,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"{listen}:{_port(api)}",
            "connect_address": _netloc(api),
            **_restapi_tls(tls_files_at),
        },
        # patronictl with this file verifies the members' REST API with the run's CA
        **({"ctl": {"cacert": str(tls_files_at.ca_file)}} if tls_files_at is not None else {}),
        "watchdog": _watchdog(watchdog_device),
        "postgresql": {
            "listen": f"{listen}:{port}",
            "connect_address": endpoints.postgres_member(cell, site),
            "data_dir": str(pgdata(data_dir)),
            "bin_dir": str(bin_dir),
            "pgpass": str(data_dir / "pgpass"),
            "use_unix_socket": True,
            # a replica's copy starts with a checkpoint on the primary: a spread one takes minutes
            "basebackup": [{"checkpoint": "fast"}],
            # a deposed primary that pg_rewind cannot bring back (WAL gone, a rewind cut short) is
            # copied afresh from the leader instead of staying down until an operator comes: what
            # it holds past the divergence was never acknowledged (synchronous mode), so nothing
            # acknowledged is dropped with it, and the cell gets its sync standby back by itself
            "remove_data_directory_on_rewind_failure": True,
            "remove_data_directory_on_diverged_timelines": True,
            # passwords come from PATRONI_SUPERUSER_PASSWORD / PATRONI_REPLICATION_PASSWORD;
            # with TLS, replication, pg_rewind and Patroni's own checks verify the server as
            # libpq's verify-full does (the CA signed it, for the address dialled)
            "authentication": {
                "superuser": {"username": SUPERUSER, **_client_tls(tls_files_at)},
                "replication": {"username": REPLICATION_USER, **_client_tls(tls_files_at)},
            },
            "parameters": {"unix_socket_directories": str(data_dir), **_server_tls(tls_files_at)},
            "pg_hba": _pg_hba(endpoints, tls_only=tls_files_at is not None),
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False, "nosync": False},
    }


def _restapi_tls(files: TlsFiles | None) -> dict[str, str]:
    """Patroni's REST API over TLS with the member's certificate; ``cafile``: what Patroni verifies
    the other members' REST API with when it asks them (the leader race). No client
    certificate is asked for (``verify_client`` unset)."""
    if files is None:
        return {}
    return {"certfile": str(files.cert_file), "keyfile": str(files.key_file), "cafile": str(files.ca_file)}


def _client_tls(files: TlsFiles | None) -> dict[str, str]:
    return {} if files is None else pg.verify_full(str(files.ca_file))


def _server_tls(files: TlsFiles | None) -> dict[str, str]:
    if files is None:
        return {}
    return {
        "ssl": "on",
        "ssl_cert_file": str(files.cert_file),
        "ssl_key_file": str(files.key_file),
        "ssl_ca_file": str(files.ca_file),
        "ssl_min_protocol_version": "TLSv1.3",
    }


def _bootstrap_dcs(topology: Topology) -> dict[str, Any]:
    t = topology.patroni
    return {
        "ttl": t.ttl,
        "loop_wait": t.loop_wait,
        "retry_timeout": t.retry_timeout,
        "maximum_lag_on_failover": t.maximum_lag_on_failover,
        "primary_start_timeout": PRIMARY_START_TIMEOUT_S,
        "postgresql": {
            "use_pg_rewind": True,
            "use_slots": True,
            "parameters": _postgres_parameters(topology),
        },
    }


def patroni_config(
    topology: Topology,
    endpoints: Endpoints,
    cell: int,
    site: str,
    data_dir: Path,
    bin_dir: Path,
    centers_follow_dr: bool = False,
    watchdog_device: Path | None = None,
    tls_files_at: TlsFiles | None = None,
) -> dict[str, Any]:
    """Patroni YAML (as a dict) of a cell's member in ``site``.

    prod / samecity: a member of the cell's main cluster (scope ``watertight-cell<N>``) in the
    three-site etcd, synchronous mode (not strict): the sync standby is the other center, and a
    leader that lost it keeps accepting writes. dr: the cell's standby cluster (scope
    ``watertight-cell<N>-dr``) in dr's own etcd, streaming asynchronously from whichever center
    member is the primary (libpq multi-host; Patroni adds target_session_attrs=read-write because
    it uses a slot).

    ``data_dir`` holds PGDATA (``pgdata/``), the socket and pgpass; ``bin_dir`` is
    watertight.pg.pg_bindir() locally. No password is in it (see the module docstring).

    ``centers_follow_dr`` (failback, after activate-dr): a center member that bootstraps again
    (re-cloned) starts the main cluster as a standby cluster of the cell's dr primary, until the
    failback runbook promotes it.

    ``watchdog_device``: the named pipe of the member guard (watertight.runtime.guard) that runs
    this Patroni; without it the watchdog is off.

    ``tls_files_at``: PostgreSQL serves TLS only (``hostssl``) with these files, and every client
    Patroni starts verifies the server (``verify-full``); without it, TCP in clear.
    """
    if not 1 <= cell <= topology.cells:
        raise ValueError(f"patroni_config: cell {cell} is not one of 1..{topology.cells}")
    if site not in topology.sites:
        raise ValueError(f"patroni_config: unknown site {site!r}")
    _tls_files_for(endpoints.patroni_api_url(cell, site), tls_files_at, pg_name(cell, site))
    config = _patroni_common(
        topology, endpoints, cell, site, data_dir, bin_dir, watchdog_device, tls_files_at
    )
    dcs = _bootstrap_dcs(topology)
    if site in CENTERS:
        config["scope"] = scope(cell)
        config["etcd3"] = _etcd3_section(
            [endpoints.etcd_client_url(site)]
            + [endpoints.etcd_client_url(s) for s in topology.sites if s != site],
            tls_files_at,
        )
        dcs.update(
            synchronous_mode=True,
            synchronous_mode_strict=False,
            synchronous_node_count=1,
            slots={dr_slot_name(cell): {"type": "physical"}},
        )
        if centers_follow_dr:
            dcs["standby_cluster"] = {
                "host": endpoints.postgres_host(cell, DR_SITE),
                "port": endpoints.postgres_port(cell),
                "create_replica_methods": ["basebackup"],
            }
    else:
        config["scope"] = dr_scope(cell)
        config["etcd3"] = _etcd3_section([endpoints.etcd_dr_client_url()], tls_files_at)
        hosts = [endpoints.postgres_host(cell, s) for s in _centers_leader_first(topology, cell)]
        dcs.update(
            synchronous_mode=False,
            standby_cluster={
                "host": ",".join(hosts),
                "port": endpoints.postgres_port(cell),
                "primary_slot_name": dr_slot_name(cell),
                "create_replica_methods": ["basebackup"],
            },
        )
    config["bootstrap"] = {
        "dcs": dcs,
        "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, {"auth-local": "trust"}],
        # Patroni appends the connection string as the last argument
        "post_bootstrap": f"{bin_dir / 'psql'} -X -q -v ON_ERROR_STOP=1 -c 'CREATE DATABASE {DATABASE}'",
    }
    # keys in the order a reader expects
    order = ["scope", "namespace", "name", "log", "restapi", "etcd3", "bootstrap", "postgresql"]
    return {key: config[key] for key in order} | {k: v for k, v in config.items() if k not in order}


def _etcd3_section(urls: list[str], files: TlsFiles | None = None) -> dict[str, Any]:
    """Patroni's etcd3 section; over https it verifies the members with the CA and presents the
    run's certificate (etcd admits no client without one)."""
    schemes = {urlsplit(url).scheme for url in urls}
    if len(schemes) != 1:
        raise ValueError(f"etcd URLs mix schemes: {urls}")
    protocol = schemes.pop()
    verify = (
        {"cacert": str(files.ca_file), "cert": str(files.cert_file), "key": str(files.key_file)}
        if protocol == "https" and files is not None
        else {}
    )
    return {"hosts": [_netloc(url) for url in urls], "protocol": protocol, **verify}


def _centers_leader_first(topology: Topology, cell: int) -> list[str]:
    return [topology.leader_site(cell), topology.standby_site(cell)]


def patroni_env(secrets: Mapping[str, Any]) -> dict[str, str]:
    """The environment that carries Patroni's passwords (never its YAML or its command line)."""
    return {
        "PATRONI_SUPERUSER_PASSWORD": secrets[SECRET_SUPERUSER_PASSWORD],
        "PATRONI_REPLICATION_PASSWORD": secrets[SECRET_REPLICATION_PASSWORD],
    }


# ---- app, gateway, entry -------------------------------------------------------------------------


def _dsn(members: list[str], root_cert: str | None = None) -> str:
    dsn = f"postgresql://{SUPERUSER}@{','.join(members)}/{DATABASE}?target_session_attrs=read-write"
    if root_cert is not None:
        dsn += "&" + urlencode(pg.verify_full(root_cert), safe="/", quote_via=quote)
    return dsn


def app_settings(
    topology: Topology,
    endpoints: Endpoints,
    site: str,
    pan_key_hex: str,
    api_tokens_file: str = API_TOKENS_FILE,
    keys_file: str | None = None,
    root_cert: str | None = None,
    serve_tls: bool = False,
) -> dict[str, Any]:
    """cardcore AppSettings of ``site``'s app server, as a dict.

    Every cell's dsn is libpq multi-host over the cell's members in both centers (the cell's
    leader-to-be first) with target_session_attrs=read-write, so the app follows the primary. At dr
    (idle until the activate-dr runbook) it names the dr members. The password is not in it: the
    app server reads PGPASSWORD. ``api_tokens_file``: where it finds the digests of the accepted
    API tokens (``api_tokens_document``; relative to the settings file, or absolute). ``keys_file``:
    its key ring (``key_ring_document``), instead of the one key ``pan_key_hex``. ``root_cert``:
    the CA's certificate (absolute path) when PostgreSQL serves TLS: every connection verifies the
    member (``sslmode=verify-full``). ``serve_tls``: it also listens with TLS at
    ``endpoints.app_tls_url`` (where there is one), presenting ``TLS_CERT_FILE`` (cardcore.platform.tls).
    """
    if site not in topology.sites:
        raise ValueError(f"app_settings: unknown site {site!r}")
    cells: dict[str, Any] = {}
    for cell in topology.cell_numbers:
        sites = [DR_SITE] if site == DR_SITE else _centers_leader_first(topology, cell)
        members = [endpoints.postgres_member(cell, s) for s in sites]
        cells[str(cell)] = {
            "dsn": _dsn(members, root_cert),
            "member_sites": dict(zip(members, sites, strict=True)),
            "leader_site": sites[0],
            # serve only from the member whose Patroni holds the leader lock
            "patroni_urls": {
                member: endpoints.patroni_api_url(cell, s) for member, s in zip(members, sites, strict=True)
            }
            if topology.fencing.app_leader_lock
            else {},
        }
    url = endpoints.app_url(site)
    tls_url = endpoints.app_tls_url(site) if serve_tls else None
    tls_listen = (
        {"port": _port(tls_url), "cert_file": TLS_CERT_FILE, "key_file": TLS_KEY_FILE} if tls_url else None
    )
    return {
        "site": site,
        "cells": cells,
        "cell_count": topology.cells,
        **({"keys_file": keys_file} if keys_file is not None else {"pan_key_hex": pan_key_hex}),
        "api_tokens_file": api_tokens_file,
        # what the https:// Patroni URLs are verified with
        **({"tls_ca_file": root_cert} if root_cert is not None else {}),
        "host": endpoints.listen_address(site),
        "port": _port(url),
        **({"tls": tls_listen} if tls_listen else {}),
        "hold_ttl_seconds": topology.app.hold_ttl_seconds,
        "batch_size_max": topology.app.batch_size_max,
        "batch_wait_ms_max": topology.app.batch_wait_ms_max,
    }


def gateway_settings(
    topology: Topology,
    endpoints: Endpoints,
    site: str,
    drain_file: str | None = None,
    api_tokens_file: str = API_TOKENS_FILE,
    tls_ca_file: str | None = None,
) -> dict[str, Any]:
    """cardcore GatewaySettings of ``site``'s gateway: every cell -> its own site's app server, then
    the other center's (the gateway spreads over the healthy ones). ``drain_file``: where the
    drain-cell runbook names the cells drained for maintenance. ``tls_ca_file``: the other
    center's app server is reached over TLS (``endpoints.app_tls_url``, where there is one) and
    verified with this CA; its own site's stays in clear."""
    if site not in topology.sites:
        raise ValueError(f"gateway_settings: unknown site {site!r}")

    def other(s: str) -> str:
        tls_url = endpoints.app_tls_url(s) if tls_ca_file is not None else None
        return tls_url or endpoints.app_url(s)

    apps = [endpoints.app_url(site)] + [other(s) for s in CENTERS if s != site]
    if site == DR_SITE:
        apps = [endpoints.app_url(DR_SITE)]
    url = endpoints.gateway_url(site)
    return {
        "site": site,
        "cell_count": topology.cells,
        "upstreams": {str(cell): list(apps) for cell in topology.cell_numbers},
        "api_tokens_file": api_tokens_file,
        "host": endpoints.listen_address(site),
        "port": _port(url),
        **({"drain_file": drain_file} if drain_file else {}),
        **({"tls_ca_file": tls_ca_file} if any(url.startswith("https://") for url in apps) else {}),
    }


def entry_settings(topology: Topology, endpoints: Endpoints, drain_file: str | None = None) -> dict[str, Any]:
    """The entry: a gateway (python -m cardcore.gateway) in front of the site gateways, standing
    for the bank's global load balancer. Each cell lists its leader-to-be center's gateway first,
    then the other center's, then dr's: dr's gateway runs only after the activate-dr runbook (a
    health-checked pool that is empty until then), so the entry follows the activation by itself."""
    return {
        "site": ENTRY,
        "cell_count": topology.cells,
        "upstreams": {
            str(cell): [endpoints.gateway_url(s) for s in _centers_leader_first(topology, cell)]
            + [endpoints.gateway_url(DR_SITE)]
            for cell in topology.cell_numbers
        },
        "api_tokens_file": API_TOKENS_FILE,
        "host": endpoints.entry_listen_address(),
        "port": _port(endpoints.entry_url()),
        **({"drain_file": drain_file} if drain_file else {}),
    }


# ---- the local set -------------------------------------------------------------------------------


def _json(settings: dict[str, Any]) -> str:
    return msgspec.json.format(msgspec.json.encode(settings), indent=2).decode() + "\n"


def render_local(
    topology: Topology,
    run_dir: Path,
    python: str,
    secrets: Mapping[str, Any],
    centers_follow_dr: bool = False,
) -> list[Component]:
    """Every component of the local runtime, in start order.

    ``python`` is an interpreter with watertight, cardcore and Patroni installed that the service
    user can run (the project's .venv). ``secrets`` holds every key of REQUIRED_SECRETS. Files go to
    ``component_dir(run_dir, name)``; each component's ``data_dir`` is ``data_dir(run_dir, name)``.
    """
    missing = [key for key in REQUIRED_SECRETS if not secrets.get(key)]
    if missing:
        raise ValueError(f"render_local: secrets missing: {', '.join(missing)}")
    run_dir = Path(run_dir).absolute()
    endpoints = LocalEndpoints(topology, tls=bool(secrets.get(SECRET_TLS_CA)))
    bin_dir = pg.pg_bindir()
    components: list[Component] = []

    server_tls = tls_files(secrets, server=True)  # a server's TLS files (none without a CA)

    def tls_at(name: str) -> TlsFiles | None:
        return TlsFiles.in_dir(component_dir(run_dir, name)) if server_tls else None

    for site in topology.sites:
        name = etcd_name(site)
        components.append(
            Component(
                name=name,
                kind="etcd",
                site=site,
                cell=None,
                argv=etcd_args(topology, endpoints, site, data_dir(run_dir, name), tls_at(name)),
                files=dict(server_tls),
                ready_url=endpoints.etcd_client_url(site) + "/health",
                stage=STAGE_ETCD,
                data_dir=data_dir(run_dir, name),
                listens=(_address(endpoints.etcd_client_url(site)), _address(endpoints.etcd_peer_url(site))),
            )
        )
    components.append(
        Component(
            name=ETCD_DR_NAME,
            kind="etcd-dr",
            site=DR_SITE,
            cell=None,
            argv=etcd_dr_args(topology, endpoints, data_dir(run_dir, ETCD_DR_NAME), tls_at(ETCD_DR_NAME)),
            files=dict(server_tls),
            ready_url=endpoints.etcd_dr_client_url() + "/health",
            stage=STAGE_ETCD,
            data_dir=data_dir(run_dir, ETCD_DR_NAME),
            listens=(_address(endpoints.etcd_dr_client_url()), _address(endpoints.etcd_dr_peer_url())),
        )
    )

    def member(cell: int, site: str, stage: int) -> Component:
        name = pg_name(cell, site)
        member_dir = data_dir(run_dir, name)
        own_dir = component_dir(run_dir, name)
        fifo = own_dir / WATCHDOG_PIPE if topology.fencing.member_guard else None
        config = patroni_config(
            topology,
            endpoints,
            cell,
            site,
            member_dir,
            bin_dir,
            centers_follow_dr and site in CENTERS,
            watchdog_device=fifo,
            tls_files_at=tls_at(name),
        )
        postmaster_pid = pgdata(member_dir) / "postmaster.pid"
        patroni = [python, "-m", "patroni", str(own_dir / "patroni.yml")]
        guard = [
            python,
            "-m",
            "watertight.runtime.guard",
            "--watchdog",
            str(fifo),
            "--pid-file",
            str(postmaster_pid),
        ]
        return Component(
            name=name,
            kind="patroni",
            site=site,
            cell=cell,
            # the guard is the component's PID: Patroni runs under it, and PostgreSQL never
            # outlives Patroni (watertight.runtime.guard)
            argv=[*guard, "--", *patroni] if fifo is not None else patroni,
            env=patroni_env(secrets),
            # libyaml's dumper: the same text as safe_dump, five times faster (every LocalRuntime
            # renders the set; probes and the drill's samplers make one several times a second)
            files={"patroni.yml": yaml.dump(config, Dumper=yaml.CSafeDumper, sort_keys=False), **server_tls},
            service_user=True,
            ready_url=endpoints.patroni_api_url(cell, site) + "/readiness",
            stage=stage,
            data_dir=member_dir,
            detached_pid_file=postmaster_pid,
            listens=(
                (endpoints.postgres_host(cell, site), endpoints.postgres_port(cell)),
                _address(endpoints.patroni_api_url(cell, site)),
            ),
        )

    for cell in topology.cell_numbers:
        components.append(member(cell, topology.leader_site(cell), STAGE_PATRONI_LEADER))
    for cell in topology.cell_numbers:
        components.append(member(cell, topology.standby_site(cell), STAGE_PATRONI_REPLICA))
    for cell in topology.cell_numbers:
        components.append(member(cell, DR_SITE, STAGE_DR_STANDBY))

    drain = str(drain_file(run_dir))
    tokens = api_tokens_document(secrets)
    app_tls = server_tls  # the CA for PostgreSQL and Patroni; the pair for its TLS listener
    gateway_tls = tls_files(secrets, server=False)  # the CA for the other center's app server
    for site in (*CENTERS, DR_SITE):
        name = app_name(site)
        components.append(
            Component(
                name=name,
                kind="app",
                site=site,
                cell=None,
                argv=[python, "-m", "cardcore", "--config", str(component_dir(run_dir, name) / "app.json")],
                env={"PGPASSWORD": secrets[SECRET_SUPERUSER_PASSWORD]},
                files={
                    "app.json": _json(
                        app_settings(
                            topology,
                            endpoints,
                            site,
                            "",
                            keys_file=KEY_RING_FILE,
                            root_cert=str(component_dir(run_dir, name) / TLS_CA_FILE) if app_tls else None,
                            serve_tls=bool(app_tls),
                        )
                    ),
                    KEY_RING_FILE: key_ring_document(secrets),
                    **app_tls,
                    API_TOKENS_FILE: tokens,
                },
                ready_url=endpoints.app_url(site) + "/readyz",
                stage=STAGE_APP,
                on_dr_activation=site == DR_SITE,
                listens=(_address(endpoints.app_url(site)),)
                + ((_address(endpoints.app_tls_url(site) or ""),) if app_tls else ()),
            )
        )
    for site in (*CENTERS, DR_SITE):
        name = gateway_name(site)
        components.append(
            Component(
                name=name,
                kind="gateway",
                site=site,
                cell=None,
                argv=[
                    python,
                    "-m",
                    "cardcore.gateway",
                    "--config",
                    str(component_dir(run_dir, name) / "gateway.json"),
                ],
                files={
                    "gateway.json": _json(
                        gateway_settings(
                            topology, endpoints, site, drain, tls_ca_file=TLS_CA_FILE if gateway_tls else None
                        )
                    ),
                    API_TOKENS_FILE: tokens,
                    **gateway_tls,
                },
                ready_url=endpoints.gateway_url(site) + "/readyz",
                stage=STAGE_GATEWAY,
                on_dr_activation=site == DR_SITE,
                listens=(_address(endpoints.gateway_url(site)),),
            )
        )
    components.append(
        Component(
            name=ENTRY,
            kind="entry",
            site=None,
            cell=None,
            argv=[
                python,
                "-m",
                "cardcore.gateway",
                "--config",
                str(component_dir(run_dir, ENTRY) / "entry.json"),
            ],
            files={"entry.json": _json(entry_settings(topology, endpoints, drain)), API_TOKENS_FILE: tokens},
            ready_url=endpoints.entry_url() + "/readyz",
            stage=STAGE_ENTRY,
            listens=(_address(endpoints.entry_url()),),
        )
    )
    return components
