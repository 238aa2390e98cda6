"""Chaos Toolkit actions of the watertight extension: the faults, and the rollback that heals each.

| fault | heal |
| --- | --- |
| kill_site (SIGKILL: the site is gone) | restart_site |
| kill_listed_pids (SIGKILL of the PIDs `watertight status --json` lists for a site, as a user's script does) | restart_site |
| freeze_site (SIGSTOP: a gray failure) | thaw_site |
| kill_cell_primary (the member leading the cell) | restart_cell |
| kill_leader_patroni (only the Patroni process of the cell's leader) | restart_cell |
| kill_leader_postgres (only the postmaster of the cell's leader) | restart_cell |
| kill_app_mid_batch (an app server while its group commits are in flight) | restart_component |
| kill_cell (both centers' members; the dr copy too with include_dr) | restart_cell |
| kill_etcd_member | restart_etcd_member |
| kill_component (an app server or a gateway) | restart_component |
| partition_site | heal_partition |
| add_latency | remove_latency |

``heal_everything`` undoes all of them at once and ``wait_until_steady`` waits for the steady
state. Every action takes topology names, ``target`` ("local" or "kubernetes") and ``run_dir``
(default $WATERTIGHT_RUN_DIR or run/); it finds the topology again on each call and keeps nothing
between calls. Each says what it did in its return value (the journal keeps it).
"""

from __future__ import annotations

import time
from typing import Any

from watertight import render
from watertight.chaos import targets
from watertight.runtime.target import Target

__all__ = [
    "add_latency",
    "freeze_site",
    "heal_everything",
    "heal_partition",
    "kill_app_mid_batch",
    "kill_cell",
    "kill_cell_primary",
    "kill_component",
    "kill_etcd_member",
    "kill_leader_patroni",
    "kill_leader_postgres",
    "kill_listed_pids",
    "kill_site",
    "partition_site",
    "remove_latency",
    "restart_cell",
    "restart_component",
    "restart_etcd_member",
    "restart_site",
    "run_runbook",
    "thaw_site",
    "wait_until_steady",
]

WAIT_S_DEFAULT = 120.0
IN_FLIGHT_WAIT_S_MAX = 10.0
WAIT_POLL_S = 0.5
STEADY_TIMEOUT_S_MAX = 900.0

Configuration = dict[str, Any] | None


class NotHealed(RuntimeError):
    """A heal did not bring the steady state back within its bound; the message says what is missing."""


def _runtime(target: str, run_dir: str | None, configuration: Configuration) -> Target:
    return targets.runtime(target, run_dir, configuration)


def _wait_steady(runtime: Target, timeout_s: float) -> float:
    """Wait until the steady state holds; seconds waited. Raises NotHealed past ``timeout_s``."""
    assert 0 <= timeout_s <= STEADY_TIMEOUT_S_MAX, timeout_s
    started = time.monotonic()
    while True:
        reasons = runtime.not_ready_reasons()
        if not reasons:
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started > timeout_s:
            raise NotHealed(
                f"not steady {timeout_s:.0f} s after the heal: {'; '.join(reasons)}; see `watertight status` and the logs"
            )
        time.sleep(WAIT_POLL_S)


def _healed(result: dict[str, Any], runtime: Target, wait_s: float) -> dict[str, Any]:
    if wait_s > 0:
        result["steady_after_s"] = _wait_steady(runtime, wait_s)
    return result


def _thaw(runtime: Target, **selection: Any) -> list[str]:
    """Undo a freeze of the selection (harmless to a running process); returns those that were frozen."""
    frozen = runtime.frozen(**selection)
    runtime.thaw(**selection)
    return frozen


def _start(runtime: Target, **selection: Any) -> list[str]:
    thawed = _thaw(runtime, **selection)  # a frozen process counts as running: start would skip it
    return sorted(set(thawed) | set(runtime.start(**selection)))


# ---- sites ----------------------------------------------------------------------------------------


def kill_site(
    site: str, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """Lose a whole site at once: SIGKILL to every process of ``site`` (kubernetes: every pod of
    the site deleted with no grace period). Heal with restart_site."""
    return {"site": site, "killed": _runtime(target, run_dir, configuration).kill(site=site)}


def kill_listed_pids(
    site: str,
    every_process: bool = False,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """SIGKILL exactly the PIDs ``watertight status --json`` lists for ``site``: each component's
    ``pid`` (with ``every_process``, also every PID of its ``processes``), one by one, as a
    user's own fault injection does, and nothing else: no process tree, no cgroup. Whatever a
    component started must not outlive it (a PostgreSQL must not outlive its Patroni). Heal with
    restart_site."""
    return _runtime(target, run_dir, configuration).kill_listed_pids(site, every_process)


def restart_site(
    site: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Bring ``site`` back: thaw what is frozen, start what is not running (its database members
    rejoin as replicas; kubernetes: the controllers recreate the pods), then wait up to ``wait_s``
    for the steady state (0: do not wait)."""
    runtime = _runtime(target, run_dir, configuration)
    return _healed({"site": site, "started": _start(runtime, site=site)}, runtime, wait_s)


def freeze_site(
    site: str, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """A gray failure: SIGSTOP every process of ``site``; alive, holding its sockets, silent.
    Heal with thaw_site."""
    return {"site": site, "frozen": _runtime(target, run_dir, configuration).freeze(site=site)}


def thaw_site(
    site: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """SIGCONT every process of ``site``, then wait up to ``wait_s`` for the steady state."""
    runtime = _runtime(target, run_dir, configuration)
    return _healed({"site": site, "thawed": _thaw(runtime, site=site)}, runtime, wait_s)


# ---- cells ----------------------------------------------------------------------------------------


def kill_cell_primary(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """SIGKILL the member that leads ``cell`` right now (Patroni and its PostgreSQL; kubernetes:
    its pod deleted with no grace period). Returns the site and member it killed. Heal with
    restart_cell."""
    runtime = _runtime(target, run_dir, configuration)
    runtime.components_of(cell=cell)
    site = runtime.cell_view(cell)["leader_site"]
    if site is None:
        raise RuntimeError(f"cell {cell} has no leader to kill; see `watertight status`")
    member = render.pg_name(cell, site)
    return {"cell": cell, "site": site, "member": member, "killed": runtime.kill(component=member)}


def _kill_leader_process(
    cell: int, role: str, target: str, run_dir: str | None, configuration: Configuration
) -> dict[str, Any]:
    runtime = _runtime(target, run_dir, configuration)
    site = runtime.leader_site(cell)
    member = render.pg_name(cell, site)
    return {"cell": cell, "site": site, "member": member, role: runtime.kill_process(member, role)}


def kill_leader_patroni(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """SIGKILL only the Patroni process of the member leading ``cell`` (a crash, the OOM killer, an
    operator's ``kill -9``); its PostgreSQL must not outlive it (the member guard fences it), and
    the sync standby takes over once the leader key runs out. Heal with restart_cell."""
    return _kill_leader_process(cell, "patroni", target, run_dir, configuration)


def kill_leader_postgres(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """SIGKILL only the postmaster of the member leading ``cell``; its Patroni restarts it in place
    (crash recovery) or, past primary_start_timeout, gives the lock up. Heal with restart_cell."""
    return _kill_leader_process(cell, "postgres", target, run_dir, configuration)


def kill_app_mid_batch(
    site: str,
    wait_s: float = IN_FLIGHT_WAIT_S_MAX,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """SIGKILL ``site``'s app server while one of its group commits is in flight (its writer
    session busy on a cell's leader; waits at most ``wait_s`` for one, then kills anyway and says
    so). The answers it owed are lost: the clients' requests are indeterminate, each committed
    wholly or not at all. Heal with restart_component."""
    component = render.app_name(site)
    assert 0 <= wait_s <= IN_FLIGHT_WAIT_S_MAX, wait_s
    runtime = _runtime(target, run_dir, configuration)
    runtime.components_of(component=component)
    deadline = time.monotonic() + wait_s
    in_flight = 0
    while time.monotonic() < deadline:
        in_flight = runtime.writers_in_flight(site)
        if in_flight:
            break
        time.sleep(0.01)
    return {
        "component": component,
        "batches_in_flight": in_flight,
        "killed": runtime.kill(component=component),
    }


def kill_cell(
    cell: int,
    include_dr: bool = False,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Lose a whole cell: SIGKILL its members in both centers (its whole main cluster) and, with
    ``include_dr``, its dr copy. App servers and gateways stay: they serve the other cells. Heal
    with restart_cell."""
    runtime = _runtime(target, run_dir, configuration)
    members = [
        name
        for name in runtime.components_of(cell=cell)
        if include_dr or not name.endswith(f"-{render.DR_SITE}")
    ]
    killed = [hit for member in members for hit in runtime.kill(component=member)]
    return {"cell": cell, "killed": killed}


def restart_cell(
    cell: int,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Start every member of ``cell`` that is not running (and thaw any frozen one), then wait up
    to ``wait_s`` for the steady state."""
    runtime = _runtime(target, run_dir, configuration)
    return _healed({"cell": cell, "started": _start(runtime, cell=cell)}, runtime, wait_s)


# ---- single components ----------------------------------------------------------------------------


def kill_etcd_member(
    site: str, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """SIGKILL ``site``'s member of the three-site etcd cluster (quorum holds with the other two).
    Heal with restart_etcd_member."""
    return kill_component(render.etcd_name(site), target, run_dir, configuration)


def restart_etcd_member(
    site: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Start ``site``'s etcd member again (it rejoins on its data), then wait for the steady state."""
    return restart_component(render.etcd_name(site), wait_s, target, run_dir, configuration)


def kill_component(
    component: str,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """SIGKILL one component by name: ``app-<site>``, ``gateway-<site>``, ``etcd-<site>``,
    ``pg-cell<N>-<site>``... Heal with restart_component."""
    return {
        "component": component,
        "killed": _runtime(target, run_dir, configuration).kill(component=component),
    }


def restart_component(
    component: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Start ``component`` if it is not running (thaw it if frozen), then wait up to ``wait_s``
    for the steady state."""
    runtime = _runtime(target, run_dir, configuration)
    return _healed({"component": component, "started": _start(runtime, component=component)}, runtime, wait_s)


# ---- network --------------------------------------------------------------------------------------


def partition_site(
    site: str, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """Cut ``site`` off from the other sites, both ways, silently (packets dropped, nothing
    reset). Clients outside the sites (the entry, the load) still reach it, which is what makes a
    split brain possible. Local: nftables with cgroup v2 matching (root); kubernetes: a
    NetworkPolicy (where the CNI enforces it). Heal with heal_partition."""
    return _runtime(target, run_dir, configuration).partition(site)


def heal_partition(
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Remove the partition, then wait up to ``wait_s`` for the steady state."""
    runtime = _runtime(target, run_dir, configuration)
    return _healed(runtime.heal_partition(), runtime, wait_s)


def add_latency(
    delay_ms: int,
    sites: list[str] | None = None,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Delay every packet between two different sites among ``sites`` (default all three) by
    ``delay_ms``, one way. Local: an NFQUEUE delayer (the kernel here has no netem); kubernetes:
    Chaos Mesh. Heal with remove_latency."""
    return _runtime(target, run_dir, configuration).add_latency(delay_ms, sites)


def remove_latency(
    target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """Stop delaying packets between sites."""
    return _runtime(target, run_dir, configuration).remove_latency()


# ---- all at once ----------------------------------------------------------------------------------


def heal_everything(
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Undo every fault: network faults removed, every process thawed, everything not running
    started; then wait up to ``wait_s`` for the steady state. Safe to run when nothing is broken."""
    runtime = _runtime(target, run_dir, configuration)
    healed_network = runtime.heal_network()
    thawed = _thaw(runtime)
    started = runtime.start()
    return _healed({"network": healed_network, "thawed": thawed, "started": started}, runtime, wait_s)


def wait_until_steady(
    timeout_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> dict[str, Any]:
    """Wait until every cell has a leader and a sync standby and every gateway and the entry
    answer; fails after ``timeout_s`` naming what is missing."""
    return {"steady_after_s": _wait_steady(_runtime(target, run_dir, configuration), timeout_s)}


# ---- runbooks -------------------------------------------------------------------------------------


def run_runbook(
    name: str,
    extras: dict[str, Any] | None = None,
    check: bool = False,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run an operations runbook (runbooks/NAME.yml, through ansible-runner) as a step of an
    experiment, e.g. activate-dr after both centers are lost, failback as its rollback. Returns the
    runbook's summary (rc, status, step timings); raises when the runbook failed, naming the step.
    On target kubernetes the clusters are the configuration's ``kube_contexts`` (and
    ``kube_namespace``); the artifacts go under the run directory."""
    from watertight.runbooks import runner

    strings = {k: str(v) for k, v in (extras or {}).items()}
    runtime = _runtime(target, run_dir, configuration)
    summary = runner.run(name, strings, runtime.run_dir, check=check, target=runtime)
    if summary["rc"] != 0:
        raise RuntimeError(
            f"runbook {name} failed at {summary['failed_step']}: {summary.get('error')}; "
            f"artifacts in {summary['artifacts']}"
        )
    return summary
