"""The topology: sites, cells, addresses, ports and SLOs, read from one YAML file.

Owns: the model every runtime renders from (local processes, Kubernetes), and its validation:
an invalid file fails with the key that is wrong and why. Never: start or contact anything.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal

import msgspec
import yaml

SITE_NAMES = ("prod", "samecity", "dr")
CENTERS = ("prod", "samecity")
CELLS_MAX = 32

Port = Annotated[int, msgspec.Meta(ge=1024, le=65535)]


class TopologyError(ValueError):
    """The topology file is unusable; the message names the key."""


class Site(msgspec.Struct, forbid_unknown_fields=True):
    role: Literal["center", "dr"]
    address: str


class Entry(msgspec.Struct, forbid_unknown_fields=True):
    address: str = "127.0.0.1"
    port: Port = 18080


class Ports(msgspec.Struct, forbid_unknown_fields=True):
    etcd_client: Port = 12379
    etcd_peer: Port = 12380
    etcd_dr_client: Port = 12479
    etcd_dr_peer: Port = 12480
    postgres_base: Port = 15500
    patroni_base: Port = 18800
    app: Port = 18100
    app_tls: Port = 18143  # the app server's TLS listener, for the other center's gateway
    gateway: Port = 18000
    postgres_exporter_base: Port = 18850  # cell N: base + N, on every site's address


class PatroniTimings(msgspec.Struct, forbid_unknown_fields=True):
    ttl: Annotated[int, msgspec.Meta(ge=20, le=600)] = 20
    loop_wait: Annotated[int, msgspec.Meta(ge=1, le=60)] = 1
    retry_timeout: Annotated[int, msgspec.Meta(ge=1, le=60)] = 5
    maximum_lag_on_failover: Annotated[int, msgspec.Meta(ge=0)] = 1_048_576


class PostgresSettings(msgspec.Struct, forbid_unknown_fields=True):
    shared_buffers: str = "32MB"
    max_connections: Annotated[int, msgspec.Meta(ge=20, le=5000)] = 100


class AppTuning(msgspec.Struct, forbid_unknown_fields=True):
    batch_size_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    batch_wait_ms_max: Annotated[float, msgspec.Meta(ge=0, le=50)] = 1.0
    hold_ttl_seconds: Annotated[int, msgspec.Meta(ge=1)] = 604_800


class Fencing(msgspec.Struct, forbid_unknown_fields=True):
    """What keeps a deposed primary from serving. Both on in every real topology; switched off only
    to show that the drill's verdicts catch the split brain and stale reads that follow."""

    # each member runs under watertight.runtime.guard: PostgreSQL never outlives its Patroni
    member_guard: bool = True
    # app servers use only the member whose Patroni holds the leader lock
    app_leader_lock: bool = True


class Slo(msgspec.Struct, forbid_unknown_fields=True):
    rto_seconds: Annotated[float, msgspec.Meta(gt=0)] = 30.0
    rpo_transactions: Annotated[int, msgspec.Meta(ge=0)] = 0
    # what the SLO alerts of watertight.monitoring.rules hold each cell and site to
    error_ratio_max: Annotated[float, msgspec.Meta(gt=0, lt=1)] = 0.01
    latency_p99_ms_max: Annotated[float, msgspec.Meta(gt=0)] = 1000.0
    dr_lag_bytes_max: Annotated[int, msgspec.Meta(gt=0)] = 16 * 1024 * 1024


class Monitoring(msgspec.Struct, forbid_unknown_fields=True):
    """The local Prometheus and Alertmanager (watertight.monitoring): where they listen, and the
    drill's alert receiver that Alertmanager delivers to."""

    enabled: bool = True
    address: str = "127.0.0.1"
    prometheus_port: Port = 18090
    alertmanager_port: Port = 18093
    receiver_port: Port = 18094  # the drill listens there while it runs
    scrape_interval_s: Annotated[float, msgspec.Meta(ge=1, le=60)] = 2.0


class Topology(msgspec.Struct, forbid_unknown_fields=True):
    sites: dict[str, Site]
    name: str = "watertight-local"
    cells: Annotated[int, msgspec.Meta(ge=1, le=CELLS_MAX)] = 2
    leaders: dict[int, Literal["prod", "samecity"]] = {}
    entry: Entry = msgspec.field(default_factory=Entry)
    ports: Ports = msgspec.field(default_factory=Ports)
    patroni: PatroniTimings = msgspec.field(default_factory=PatroniTimings)
    postgres: PostgresSettings = msgspec.field(default_factory=PostgresSettings)
    app: AppTuning = msgspec.field(default_factory=AppTuning)
    fencing: Fencing = msgspec.field(default_factory=Fencing)
    slo: Slo = msgspec.field(default_factory=Slo)
    monitoring: Monitoring = msgspec.field(default_factory=Monitoring)

    # ---- derived views -----------------------------------------------------------------------

    @property
    def cell_numbers(self) -> list[int]:
        return list(range(1, self.cells + 1))

    def leader_site(self, cell: int) -> str:
        """The center that leads ``cell`` at start: as configured, else alternating."""
        return self.leaders.get(cell, CENTERS[(cell - 1) % 2])

    def standby_site(self, cell: int) -> str:
        """The other center: where the cell's synchronous standby lives."""
        return CENTERS[1 - CENTERS.index(self.leader_site(cell))]

    def address(self, site: str) -> str:
        return self.sites[site].address

    def postgres_port(self, cell: int) -> int:
        return self.ports.postgres_base + cell

    def patroni_port(self, cell: int) -> int:
        return self.ports.patroni_base + cell

    def gateway_url(self, site: str) -> str:
        return f"http://{self.address(site)}:{self.ports.gateway}"

    def app_url(self, site: str) -> str:
        return f"http://{self.address(site)}:{self.ports.app}"

    def app_tls_url(self, site: str) -> str:
        return f"https://{self.address(site)}:{self.ports.app_tls}"

    def postgres_exporter_port(self, cell: int) -> int:
        return self.ports.postgres_exporter_base + cell

    @property
    def prometheus_url(self) -> str:
        return f"http://{self.monitoring.address}:{self.monitoring.prometheus_port}"

    @property
    def alertmanager_url(self) -> str:
        return f"http://{self.monitoring.address}:{self.monitoring.alertmanager_port}"

    @property
    def alert_receiver_url(self) -> str:
        return f"http://{self.monitoring.address}:{self.monitoring.receiver_port}/alerts"

    @property
    def entry_url(self) -> str:
        return f"http://{self.entry.address}:{self.entry.port}"

    def validate(self) -> None:
        if sorted(self.sites) != sorted(SITE_NAMES):
            raise TopologyError(
                f"sites: must name exactly {', '.join(SITE_NAMES)}; got {', '.join(sorted(self.sites)) or 'none'}"
            )
        for name in CENTERS:
            if self.sites[name].role != "center":
                raise TopologyError(f"sites.{name}.role: must be 'center'")
        if self.sites["dr"].role != "dr":
            raise TopologyError("sites.dr.role: must be 'dr'")
        seen: dict[str, str] = {}
        for name, site in self.sites.items():
            _loopback(f"sites.{name}.address", site.address)
            if site.address in seen:
                raise TopologyError(
                    f"sites.{name}.address: {site.address} is also the address of site {seen[site.address]}"
                )
            seen[site.address] = name
        _loopback("entry.address", self.entry.address)
        _loopback("monitoring.address", self.monitoring.address)
        for cell in self.leaders:
            if not 1 <= cell <= self.cells:
                raise TopologyError(f"leaders: cell {cell} is not one of 1..{self.cells}")
        p = self.ports
        singles = {
            "ports.etcd_client": p.etcd_client,
            "ports.etcd_peer": p.etcd_peer,
            "ports.etcd_dr_client": p.etcd_dr_client,
            "ports.etcd_dr_peer": p.etcd_dr_peer,
            "ports.app": p.app,
            "ports.gateway": p.gateway,
        }
        if self.monitoring.enabled:
            singles.update(
                {
                    "monitoring.prometheus_port": self.monitoring.prometheus_port,
                    "monitoring.alertmanager_port": self.monitoring.alertmanager_port,
                    "monitoring.receiver_port": self.monitoring.receiver_port,
                }
            )
        ranges = {
            "ports.postgres_base": range(p.postgres_base + 1, p.postgres_base + self.cells + 1),
            "ports.patroni_base": range(p.patroni_base + 1, p.patroni_base + self.cells + 1),
        }
        if self.monitoring.enabled:
            ranges["ports.postgres_exporter_base"] = range(
                p.postgres_exporter_base + 1, p.postgres_exporter_base + self.cells + 1
            )
        used: dict[int, str] = {}
        for key, port in singles.items():
            if port in used:
                raise TopologyError(f"{key}: port {port} is also {used[port]}")
            used[port] = key
        for key, span in ranges.items():
            if span.stop - 1 > 65535:
                raise TopologyError(
                    f"{key}: {self.cells} cells need ports up to {span.stop - 1}, above 65535"
                )
            for port in span:
                if port in used:
                    raise TopologyError(f"{key}: cell port {port} collides with {used[port]}")
                used[port] = key
        t = self.patroni
        if t.loop_wait + 2 * t.retry_timeout > t.ttl:
            raise TopologyError(
                f"patroni: loop_wait + 2 x retry_timeout ({t.loop_wait} + 2 x {t.retry_timeout}) must not exceed ttl ({t.ttl})"
            )


def _loopback(key: str, value: str) -> None:
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise TopologyError(f"{key}: {value!r} is not an IP address") from None
    if not address.is_loopback:
        raise TopologyError(
            f"{key}: {value} is not a loopback address; the local runtime only uses 127.0.0.0/8"
        )


def parse(text: str, origin: str = "topology") -> Topology:
    try:
        raw = yaml.load(text, Loader=yaml.CSafeLoader)  # libyaml: the runtime parses it on every call
    except yaml.YAMLError as error:
        raise TopologyError(f"{origin}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise TopologyError(f"{origin}: must be a mapping of keys (sites, cells, ...)")
    try:
        topology = msgspec.convert(raw, type=Topology, strict=True)
    except msgspec.ValidationError as error:
        raise TopologyError(f"{origin}: {key_message(str(error))}") from None
    try:
        topology.validate()
    except TopologyError as error:
        raise TopologyError(f"{origin}: {error}") from None
    return topology


def key_message(message: str) -> str:
    """msgspec says '... - at `$.ports.app`'; say 'ports.app: ...' like the rest of our errors."""
    if " - at `$" in message:
        text, _, where = message.rpartition(" - at `$")
        key = where.rstrip("`").lstrip(".")
        return f"{key}: {text}" if key else text
    return message


def load(path: str | Path, cells: int | None = None) -> Topology:
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as error:
        raise TopologyError(f"{file}: cannot read: {error.strerror}") from None
    topology = parse(text, str(file))
    if cells is not None:
        if not 1 <= cells <= CELLS_MAX:
            raise TopologyError(f"--cells: must be 1..{CELLS_MAX}, got {cells}")
        topology = msgspec.structs.replace(topology, cells=cells)
        topology.validate()
    return topology


DEFAULT_PATH = Path(__file__).resolve().parent.parent / "topology.yaml"


def dump(topology: Topology) -> str:
    """The topology as YAML (what the run directory records)."""
    return yaml.safe_dump(msgspec.to_builtins(topology), sort_keys=False)
