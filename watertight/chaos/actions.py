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

import signal
import time
from typing import Any

from watertight import render
from watertight.chaos import kubernetes, network, probes, targets
from watertight.runtime import processes
from watertight.runtime.local import LocalRuntime

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


class NotHealed(RuntimeError):
    """A heal did not bring the steady state back within its bound; the message says what is missing."""


def _is_kubernetes(target: str) -> bool:
    return targets.check_target(target) == targets.KUBERNETES


def _wait_steady(target: str, run_dir: str | None, timeout_s: float) -> float:
    """Wait until the steady state holds; seconds waited. Raises NotHealed past ``timeout_s``."""
    assert 0 <= timeout_s <= STEADY_TIMEOUT_S_MAX, timeout_s
    started = time.monotonic()
    while True:
        reasons = probes.not_steady_reasons(target, run_dir)
        if not reasons:
            return round(time.monotonic() - started, 1)
        if time.monotonic() - started > timeout_s:
            raise NotHealed(
                f"not steady {timeout_s:.0f} s after the heal: {'; '.join(reasons)}; see `watertight status` and the logs"
            )
        time.sleep(WAIT_POLL_S)


def _healed(result: dict[str, Any], target: str, run_dir: str | None, wait_s: float) -> dict[str, Any]:
    if wait_s > 0 and not _is_kubernetes(target):
        result["steady_after_s"] = _wait_steady(target, run_dir, wait_s)
    return result


def _frozen(runtime: LocalRuntime, **selection: Any) -> list[str]:
    return [
        c.name
        for c in runtime.select(**selection)
        if (record := runtime.records.get(c.name)) is not None and processes.frozen(record)
    ]


def _thaw(runtime: LocalRuntime, **selection: Any) -> list[str]:
    """SIGCONT the selection (harmless to a running process); returns those that were frozen."""
    frozen = _frozen(runtime, **selection)
    runtime.thaw(**selection)
    return frozen


def _start(runtime: LocalRuntime, **selection: Any) -> list[str]:
    thawed = _thaw(runtime, **selection)  # a frozen process counts as running: start would skip it
    return sorted(set(thawed) | set(runtime.start(**selection)))


# ---- sites ----------------------------------------------------------------------------------------


def kill_site(
    site: str, target: str = "local", run_dir: str | None = None, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Lose a whole site at once: SIGKILL to every process of ``site`` (kubernetes: delete every
    pod of the site's cluster with no grace period). Heal with restart_site."""
    if _is_kubernetes(target):
        return {"site": site, "killed": kubernetes.terminate(kubernetes.select(configuration, site=site))}
    return {"site": site, "killed": targets.local_runtime(run_dir).kill(site=site)}


def kill_listed_pids(
    site: str, every_process: bool = False, target: str = "local", run_dir: str | None = None
) -> dict[str, Any]:
    """SIGKILL exactly the PIDs ``watertight status --json`` lists for ``site``: each component's
    ``pid`` (with ``every_process``, also every PID of its ``processes``), one by one, as a
    user's own fault injection does, and nothing else: no process tree, no cgroup. Whatever a
    component started must not outlive it (a PostgreSQL must not outlive its Patroni). Heal with
    restart_site."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported("kill_listed_pids", "the kubernetes runtime's pods (delete them)")
    runtime = targets.local_runtime(run_dir)
    runtime.select(site=site)
    listed: list[int] = []
    for component in runtime.status()["components"]:
        if component["site"] != site:
            continue
        if component["pid"]:
            listed.append(int(component["pid"]))
        if every_process:
            listed += [int(p["pid"]) for p in component["processes"] if int(p["pid"]) not in listed]
    killed = processes.signal_pids(listed, signal.SIGKILL)
    return {"site": site, "listed": listed, "killed": killed}


def restart_site(
    site: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Bring ``site`` back: thaw what is frozen, start what is not running (its database members
    rejoin as replicas), then wait up to ``wait_s`` for the steady state (0: do not wait).
    Kubernetes: the controllers recreate the pods; nothing to start."""
    if _is_kubernetes(target):
        kubernetes.select(configuration, site=site)
        return {"site": site, "started": [], "note": "pods are recreated by their controllers"}
    started = _start(targets.local_runtime(run_dir), site=site)
    return _healed({"site": site, "started": started}, target, run_dir, wait_s)


def freeze_site(site: str, target: str = "local", run_dir: str | None = None) -> dict[str, Any]:
    """A gray failure: SIGSTOP every process of ``site``; alive, holding its sockets, silent.
    Heal with thaw_site."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported(
            "freeze_site", "a pod pause (e.g. Chaos Mesh PodChaos or SIGSTOP via exec)"
        )
    return {"site": site, "frozen": targets.local_runtime(run_dir).freeze(site=site)}


def thaw_site(
    site: str, wait_s: float = WAIT_S_DEFAULT, target: str = "local", run_dir: str | None = None
) -> dict[str, Any]:
    """SIGCONT every process of ``site``, then wait up to ``wait_s`` for the steady state."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported(
            "thaw_site", "a pod pause (e.g. Chaos Mesh PodChaos or SIGSTOP via exec)"
        )
    thawed = _thaw(targets.local_runtime(run_dir), site=site)
    return _healed({"site": site, "thawed": thawed}, target, run_dir, wait_s)


# ---- cells ----------------------------------------------------------------------------------------


def kill_cell_primary(cell: int, target: str = "local", run_dir: str | None = None) -> dict[str, Any]:
    """SIGKILL the member that leads ``cell`` right now (Patroni and its PostgreSQL). Returns the
    site and member it killed. Heal with restart_cell."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported(
            "kill_cell_primary",
            "the leader of the cell (a role label set on the pod, e.g. by a Patroni callback)",
        )
    runtime = targets.local_runtime(run_dir)
    runtime.select(cell=cell)
    site = runtime.cell_view(cell)["leader_site"]
    if site is None:
        raise RuntimeError(f"cell {cell} has no leader to kill; see `watertight status`")
    member = render.pg_name(cell, site)
    return {"cell": cell, "site": site, "member": member, "killed": runtime.kill(component=member)}


def _kill_leader_process(
    cell: int, role: str, target: str, run_dir: str | None, fault: str
) -> dict[str, Any]:
    if _is_kubernetes(target):
        raise kubernetes.unsupported(
            fault, "the kubernetes runtime's per-process kill (exec in the member's pod)"
        )
    runtime = targets.local_runtime(run_dir)
    site = runtime.leader_site(cell)
    member = render.pg_name(cell, site)
    return {"cell": cell, "site": site, "member": member, role: runtime.kill_process(member, role)}


def kill_leader_patroni(cell: int, target: str = "local", run_dir: str | None = None) -> dict[str, Any]:
    """SIGKILL only the Patroni process of the member leading ``cell`` (a crash, the OOM killer, an
    operator's ``kill -9``); its PostgreSQL must not outlive it (the member guard fences it), and
    the sync standby takes over once the leader key runs out. Heal with restart_cell."""
    return _kill_leader_process(cell, "patroni", target, run_dir, "kill_leader_patroni")


def kill_leader_postgres(cell: int, target: str = "local", run_dir: str | None = None) -> dict[str, Any]:
    """SIGKILL only the postmaster of the member leading ``cell``; its Patroni restarts it in place
    (crash recovery) or, past primary_start_timeout, gives the lock up. Heal with restart_cell."""
    return _kill_leader_process(cell, "postgres", target, run_dir, "kill_leader_postgres")


def _writers_in_flight(runtime: LocalRuntime, site: str) -> int:
    """Group commits of ``site``'s app server running now: its writer sessions not idle on the
    cells' leaders."""
    from watertight import pg

    password = runtime.superuser_password()
    busy = 0
    for cell in runtime.topology.cell_numbers:
        try:
            leader = runtime.leader_site(cell)
            with pg.connect_superuser(
                runtime.topology.address(leader), runtime.topology.postgres_port(cell), password, 2
            ) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'",
                    (f"cardcore-{site}-cell{cell}-writer",),
                ).fetchone()
                busy += int(row[0]) if row else 0
        except Exception:  # a cell without a leader has nothing in flight to catch
            continue
    return busy


def kill_app_mid_batch(
    site: str,
    wait_s: float = IN_FLIGHT_WAIT_S_MAX,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SIGKILL ``site``'s app server while one of its group commits is in flight (its writer
    session busy on a cell's leader; waits at most ``wait_s`` for one, then kills anyway and says
    so). The answers it owed are lost: the clients' requests are indeterminate, each committed
    wholly or not at all. Heal with restart_component."""
    component = render.app_name(site)
    if _is_kubernetes(target):
        return kill_component(component, target, run_dir, configuration)
    assert 0 <= wait_s <= IN_FLIGHT_WAIT_S_MAX, wait_s
    runtime = targets.local_runtime(run_dir)
    runtime.component(component)
    deadline = time.monotonic() + wait_s
    in_flight = 0
    while time.monotonic() < deadline:
        in_flight = _writers_in_flight(runtime, site)
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
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Lose a whole cell: SIGKILL its members in both centers (its whole main cluster) and, with
    ``include_dr``, its dr copy. App servers and gateways stay: they serve the other cells. Heal
    with restart_cell."""
    if _is_kubernetes(target):
        selections = kubernetes.select(configuration, cell=cell, kind="patroni")
        if not include_dr:
            selections = [s for s in selections if s.site != render.DR_SITE]
        return {"cell": cell, "killed": kubernetes.terminate(selections)}
    runtime = targets.local_runtime(run_dir)
    members = [
        c
        for c in runtime.select(cell=cell)
        if c.kind == "patroni" and (include_dr or c.site != render.DR_SITE)
    ]
    killed = [name for member in members for name in runtime.kill(component=member.name)]
    return {"cell": cell, "killed": killed}


def restart_cell(
    cell: int,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start every member of ``cell`` that is not running (and thaw any frozen one), then wait up
    to ``wait_s`` for the steady state."""
    if _is_kubernetes(target):
        kubernetes.select(configuration, cell=cell)
        return {"cell": cell, "started": [], "note": "pods are recreated by their controllers"}
    started = _start(targets.local_runtime(run_dir), cell=cell)
    return _healed({"cell": cell, "started": started}, target, run_dir, wait_s)


# ---- single components ----------------------------------------------------------------------------


def kill_etcd_member(
    site: str, target: str = "local", run_dir: str | None = None, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """SIGKILL ``site``'s member of the three-site etcd cluster (quorum holds with the other two).
    Heal with restart_etcd_member."""
    return kill_component(render.etcd_name(site), target, run_dir, configuration)


def restart_etcd_member(
    site: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start ``site``'s etcd member again (it rejoins on its data), then wait for the steady state."""
    return restart_component(render.etcd_name(site), wait_s, target, run_dir, configuration)


def kill_component(
    component: str,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """SIGKILL one component by name: ``app-<site>``, ``gateway-<site>``, ``etcd-<site>``,
    ``pg-cell<N>-<site>``... Heal with restart_component."""
    if _is_kubernetes(target):
        return {
            "component": component,
            "killed": kubernetes.terminate(kubernetes.select(configuration, component=component)),
        }
    return {"component": component, "killed": targets.local_runtime(run_dir).kill(component=component)}


def restart_component(
    component: str,
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Start ``component`` if it is not running (thaw it if frozen), then wait up to ``wait_s``
    for the steady state."""
    if _is_kubernetes(target):
        kubernetes.select(configuration, component=component)
        return {"component": component, "started": [], "note": "pods are recreated by their controllers"}
    started = _start(targets.local_runtime(run_dir), component=component)
    return _healed({"component": component, "started": started}, target, run_dir, wait_s)


# ---- network --------------------------------------------------------------------------------------


def partition_site(
    site: str, target: str = "local", run_dir: str | None = None, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Cut ``site`` off from the other sites, both ways, silently (packets dropped, nothing
    reset). Clients outside the sites (the entry, the load) still reach it, which is what makes a
    split brain possible. Local: nftables with cgroup v2 matching (root). Heal with heal_partition."""
    if _is_kubernetes(target):
        return kubernetes.partition(configuration, site)
    runtime = targets.local_runtime(run_dir)
    runtime.select(site=site)
    return network.partition(targets.site_network(runtime), site)


def heal_partition(
    wait_s: float = WAIT_S_DEFAULT,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Remove the partition, then wait up to ``wait_s`` for the steady state."""
    if _is_kubernetes(target):
        return {"healed": kubernetes.heal_partition(configuration)}
    runtime = targets.local_runtime(run_dir)
    result = network.heal_partition(targets.site_network(runtime))
    return _healed(result, target, run_dir, wait_s)


def add_latency(
    delay_ms: int,
    sites: list[str] | None = None,
    target: str = "local",
    run_dir: str | None = None,
    configuration: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Delay every packet between two different sites among ``sites`` (default all three) by
    ``delay_ms``, one way. Local: an NFQUEUE delayer (the kernel here has no netem); kubernetes:
    Chaos Mesh. Heal with remove_latency."""
    if _is_kubernetes(target):
        return {
            "delay_ms": delay_ms,
            "sites": kubernetes.add_latency(configuration, delay_ms, sites or ["prod", "samecity", "dr"]),
        }
    runtime = targets.local_runtime(run_dir)
    return network.add_latency(targets.site_network(runtime), delay_ms, sites)


def remove_latency(
    target: str = "local", run_dir: str | None = None, configuration: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Stop delaying packets between sites."""
    if _is_kubernetes(target):
        return {"removed": kubernetes.remove_latency(configuration)}
    runtime = targets.local_runtime(run_dir)
    return network.remove_latency(targets.site_network(runtime))


# ---- all at once ----------------------------------------------------------------------------------


def heal_everything(
    wait_s: float = WAIT_S_DEFAULT, target: str = "local", run_dir: str | None = None
) -> dict[str, Any]:
    """Undo every fault: network faults removed, every process thawed, everything not running
    started; then wait up to ``wait_s`` for the steady state. Safe to run when nothing is broken."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported(
            "heal_everything", "the per-fault heals (heal_partition, remove_latency)"
        )
    runtime = targets.local_runtime(run_dir)
    healed_network = (
        network.heal_all(targets.site_network(runtime)) if network.read_state(runtime.run_dir) else {}
    )
    thawed = _thaw(runtime)
    started = runtime.start()
    return _healed({"network": healed_network, "thawed": thawed, "started": started}, target, run_dir, wait_s)


def wait_until_steady(
    timeout_s: float = WAIT_S_DEFAULT, target: str = "local", run_dir: str | None = None
) -> dict[str, Any]:
    """Wait until every cell has a leader and a sync standby and every gateway and the entry
    answer; fails after ``timeout_s`` naming what is missing."""
    if _is_kubernetes(target):
        raise kubernetes.unsupported("wait_until_steady", "the cells' Patroni REST APIs")
    return {"steady_after_s": _wait_steady(target, run_dir, timeout_s)}


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
    from watertight.runbooks import kube, runner

    strings = {k: str(v) for k, v in (extras or {}).items()}
    if _is_kubernetes(target):
        contexts = (configuration or {}).get("kube_contexts") or {}
        cluster = kube.KubeTarget.from_settings(
            ",".join(f"{site}={context}" for site, context in dict(contexts).items()),
            (configuration or {}).get("kube_namespace"),
        )
        summary = runner.run(name, strings, targets.run_dir_of(run_dir), check=check, target=cluster)
    else:
        runtime = targets.local_runtime(run_dir)
        summary = runner.run(name, strings, runtime.run_dir, check=check)
    if summary["rc"] != 0:
        raise RuntimeError(
            f"runbook {name} failed at {summary['failed_step']}: {summary.get('error')}; "
            f"artifacts in {summary['artifacts']}"
        )
    return summary
