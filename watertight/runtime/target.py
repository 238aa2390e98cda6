"""The interface every target of the toolkit implements: the topology as local processes
(``watertight.runtime.local.LocalRuntime``) or as pods of Kubernetes clusters
(``watertight.runtime.kubernetes.KubernetesRuntime``).

Owns: what chaos actions, probes, the drill, bench and the runbook runner may ask of a topology,
in topology names (site, cell, component, role), never PIDs or pod names; the one error a target
raises for what it cannot do (``TargetUnsupported``); the endpoints of a cell's members.
Never: branch on where the topology runs. Nothing above this layer does either: it asks the
target, and a target that cannot do something says so with ``TargetUnsupported``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from cardcore.platform import auth

from watertight.topology import Topology

Progress = Callable[[str], None]


class TargetUnsupported(RuntimeError):
    """A target was asked for an operation it cannot do; the message names the operation, the
    target, what the operation needs, and what to do instead."""

    def __init__(self, operation: str, target: str, needs: str, instead: str | None = None) -> None:
        self.operation = operation
        self.target = target
        self.needs = needs
        self.instead = instead
        text = f"{operation} is not available on target {target}: it needs {needs}"
        super().__init__(f"{text}; {instead}" if instead else text)


@dataclass(frozen=True)
class Member:
    """Where a cell's member answers: its PostgreSQL and its Patroni REST API, as the toolkit
    reaches them from where it runs."""

    name: str  # the component (and Patroni member) name, pg-cell<N>-<site>
    site: str
    postgres_host: str
    postgres_port: int
    patroni_url: str


@dataclass(frozen=True)
class Alerting:
    """The drill's view of a target's alerting."""

    alertmanager_url: str
    receiver_url: str


@runtime_checkable
class Target(Protocol):
    """What a topology offers the toolkit, wherever it runs. Selections are topology names:
    ``site``, ``cell``, ``component``; None means every one. Every fault returns the components
    it hit; a name that does not exist raises, naming those that do."""

    name: str  # "local" or "kubernetes"
    topology: Topology
    run_dir: Path  # where the toolkit keeps what it writes for this topology (marks, reports, runbooks)

    # ---- where clients go ------------------------------------------------------------------
    @property
    def entry_url(self) -> str:
        """The URL clients use (the global load balancer)."""
        ...

    def gateway_urls(self) -> dict[str, str]:
        """The centers' gateways as the toolkit reaches them: site -> URL."""
        ...

    def api_tokens(self) -> dict[str, str]:
        """The token of each client kind (``Authorization: Bearer``)."""
        ...

    def client_tokens(self) -> auth.ClientTokens:
        """The header each request to the core needs."""
        ...

    def api_tokens_file(self) -> Path:
        """A private file ``{"api_tokens": {...}}`` for Locust's ``--api-tokens``."""
        ...

    def alerting(self) -> Alerting | None:
        """Where the drill reads alerts (its Alertmanager, and the address its receiver listens
        at for what Alertmanager delivers), or None when the target has no alerting it can read."""
        ...

    def superuser_password(self) -> str:
        """PostgreSQL's superuser password (probes and ledger checks connect with it)."""
        ...

    def root_cert(self) -> str | None:
        """The run's CA certificate file: what clients verify every TLS server of the topology
        with (PostgreSQL as ``verify-full``, Patroni's REST API, the app servers' TLS listeners);
        None where the topology serves without TLS."""
        ...

    # ---- views -----------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        """Sites, cells and components with what runs (``watertight status --json`` locally)."""
        ...

    def components_of(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """The component names a selection names (raises on a name that does not exist)."""
        ...

    def instances(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """What runs for the selection now: ``<component> pid <N>`` locally, ``<site>/<pod>`` on
        Kubernetes."""
        ...

    def cell_view(self, cell: int) -> dict[str, Any]:
        """Patroni's view of a cell: leader_site, sync_standby, timeline, dr_copy, members."""
        ...

    def leader_site(self, cell: int) -> str:
        """The site whose member leads ``cell`` now; raises when none does."""
        ...

    def members(self, cell: int) -> list[Member]:
        """Every member of ``cell`` (both centers and the dr copy) with its endpoints."""
        ...

    def primary_hosts(self, cell: int) -> list[str]:
        """The PostgreSQL hosts of ``cell`` where its writable primary can be in the current mode
        (the centers not fenced, or dr once it serves): a read-write connection tries them."""
        ...

    def ready_urls(self) -> dict[str, str]:
        """What must answer ``/readyz`` 200 in the steady state (the expected gateways and the
        entry): name -> URL."""
        ...

    def not_ready_reasons(self) -> list[str]:
        """Why the topology is not in its steady state (empty when it is)."""
        ...

    @property
    def dr_active(self) -> bool:
        """Whether dr serves (activate-dr ran, failback did not yet)."""
        ...

    # ---- faults and heals ------------------------------------------------------------------
    def kill(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """The machine is gone: SIGKILL / delete with no grace period."""
        ...

    def stop(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Graceful stop."""
        ...

    def freeze(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Alive but silent (SIGSTOP): a gray failure."""
        ...

    def thaw(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Undo freeze; returns the components that were frozen."""
        ...

    def frozen(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """The components of the selection that are frozen now."""
        ...

    def restart(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Stop (gracefully) and start again what the selection names."""
        ...

    def start(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Start what the selection names that does not run (and should, in the current mode);
        returns those."""
        ...

    def kill_process(self, component: str, role: str) -> list[Any]:
        """SIGKILL only the processes of ``role`` (patroni, postgres, guard, keeper...) within
        one component; returns what was killed."""
        ...

    def kill_listed_pids(self, site: str, every_process: bool = False) -> dict[str, Any]:
        """SIGKILL exactly the PIDs the status lists for ``site``, one by one."""
        ...

    def writers_in_flight(self, site: str) -> int:
        """Group commits of ``site``'s app server in flight now (its busy writer sessions)."""
        ...

    def partition(self, site: str) -> dict[str, Any]:
        """Cut ``site`` off from the other sites, both ways."""
        ...

    def heal_partition(self) -> dict[str, Any]:
        """Remove any partition."""
        ...

    def add_latency(self, delay_ms: int, sites: list[str] | None = None) -> dict[str, Any]:
        """Delay packets between ``sites`` (default all) by ``delay_ms``."""
        ...

    def remove_latency(self) -> dict[str, Any]:
        """Remove any added latency."""
        ...

    def heal_network(self) -> dict[str, Any]:
        """Remove every network fault in force (nothing when none is)."""
        ...

    def switchover(self, cell: int, to_site: str) -> dict[str, Any]:
        """A planned switchover of ``cell`` to ``to_site``'s member (nothing acknowledged lost)."""
        ...

    # ---- whole topology --------------------------------------------------------------------
    def up(self, progress: Progress = ...) -> dict[str, Any]:
        """Make sure the topology runs and is steady (a local target starts it; a cluster's is
        waited for); raises naming what is missing."""
        ...

    def cpu_sample(self) -> dict[Any, tuple[str, float]]:
        """CPU seconds so far of everything the topology runs (keyed by what the target counts
        by: a PID locally), each with its component's kind (bench takes differences)."""
        ...

    def runbook_vars(self) -> dict[str, Any]:
        """The extra variables a runbook needs to act on this target (``watertight_target`` and
        what its tasks address)."""
        ...
