"""Chaos Toolkit probes of the watertight extension: is the topology in its steady state, who
leads each cell, how many primaries accept writes, and what the load timeline says.

Every probe takes topology names, ``target`` ("local" or "kubernetes"), ``run_dir`` (default
$WATERTIGHT_RUN_DIR or run/) and the experiment's ``configuration``, finds the topology again on
each call through the Target interface, and holds no state. Probes answer; they never change
anything.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from watertight import pg
from watertight.chaos import targets
from watertight.chaos.timeline import read_timeline
from watertight.runtime.local import http_json
from watertight.runtime.target import Target

__all__ = [
    "cell_leader_site",
    "cell_sync_standby_site",
    "entry_answers",
    "every_cell_has_leader_and_sync_standby",
    "load_error_ratio",
    "load_tps",
    "not_steady_reasons",
    "primaries",
    "topology_status",
    "writable_primaries",
    "writable_primaries_by_cell",
]

PG_CONNECT_TIMEOUT_S = 2  # libpq's minimum
MEMBER_PROBE_TIMEOUT_S = 3.0
ENTRY_TIMEOUT_S = 2.0


Configuration = dict[str, Any] | None


def _runtime(target: str, run_dir: str | None, configuration: Configuration) -> Target:
    return targets.runtime(target, run_dir, configuration)


def entry_answers(
    all_cells: bool = False,
    timeout_s: float = ENTRY_TIMEOUT_S,
    target: str = "local",
    run_dir: str | None = None,
    configuration: Configuration = None,
) -> bool:
    """The entry (what clients use) answers ready: at least one cell servable, or every cell
    with ``all_cells``."""
    url = _runtime(target, run_dir, configuration).entry_url
    status, body = http_json(f"{url}/readyz", timeout_s=timeout_s)
    if status != 200:
        return False
    if all_cells:
        cells = body.get("cells", {}) if isinstance(body, dict) else {}
        return bool(cells) and all(cell.get("ready") for cell in cells.values())
    return True


def not_steady_reasons(
    target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> list[str]:
    """Why the topology is not in its steady state (empty when it is): every cell has a running
    leader and a streaming sync standby, every gateway and the entry answer ready."""
    return _runtime(target, run_dir, configuration).not_ready_reasons()


def every_cell_has_leader_and_sync_standby(
    target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> bool:
    """Every cell has a running leader and a streaming synchronous standby (the other center)."""
    runtime = _runtime(target, run_dir, configuration)
    for cell in runtime.topology.cell_numbers:
        view = runtime.cell_view(cell)
        if view["leader_site"] is None or view["sync_standby"] is None:
            return False
    return True


def cell_leader_site(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> str | None:
    """The site whose member leads ``cell`` (None while it has no leader)."""
    runtime = _runtime(target, run_dir, configuration)
    runtime.components_of(cell=cell)  # names the cells when there is no such cell
    leader: str | None = runtime.cell_view(cell)["leader_site"]
    return leader


def cell_sync_standby_site(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> str | None:
    """The site of ``cell``'s streaming synchronous standby (None when it has none)."""
    runtime = _runtime(target, run_dir, configuration)
    runtime.components_of(cell=cell)
    standby: str | None = runtime.cell_view(cell)["sync_standby"]
    return standby


MEMBER_STATE_SQL = """
SELECT pg_is_in_recovery(),
       current_setting('default_transaction_read_only'),
       current_setting('synchronous_standby_names'),
       (SELECT count(*) FROM pg_stat_replication WHERE sync_state IN ('sync', 'quorum'))
"""


def _member_state(host: str, port: int, password: str, root_cert: str | None) -> dict[str, bool] | None:
    """What a member's PostgreSQL says of itself; None when it does not answer.

    ``out_of_recovery``: a primary in its own eyes, not read-only. ``writable``: it would also
    acknowledge a commit now, i.e. synchronous replication is off or has a sync standby attached;
    a demoted-to-be primary waiting on a standby that left acknowledges nothing. A member with
    no host (its pod is gone) does not answer."""
    if not host:
        return None
    try:
        with pg.connect_superuser(host, port, password, PG_CONNECT_TIMEOUT_S, root_cert) as connection:
            row = connection.execute(MEMBER_STATE_SQL).fetchone()
    except psycopg.Error:
        return None
    assert row is not None
    in_recovery, read_only, standby_names, sync_attached = row
    out_of_recovery = not in_recovery and read_only == "off"
    return {
        "out_of_recovery": out_of_recovery,
        "writable": out_of_recovery and (standby_names == "" or int(sync_attached) > 0),
    }


def _in_parallel(calls: dict[str, Callable[[], Any]], timeout_s: float) -> dict[str, Any]:
    """Run each call in a daemon thread; a call not done by ``timeout_s`` answers None (a frozen
    member must not stall the probe beyond its bound)."""
    answers: dict[str, Any] = {}

    def run(name: str, call: Callable[[], Any]) -> None:
        answers[name] = call()

    threads = [threading.Thread(target=run, args=item, daemon=True) for item in calls.items()]
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {name: answers.get(name) for name in calls}


def primaries(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> list[dict[str, Any]]:
    """Every member of ``cell`` (both centers and the dr copy): whether its PostgreSQL is out of
    recovery, whether it would acknowledge a write (None: it did not answer within
    MEMBER_PROBE_TIMEOUT_S), and the role its Patroni REST API reports."""
    return _primaries(_runtime(target, run_dir, configuration), cell)


def _primaries(runtime: Target, cell: int) -> list[dict[str, Any]]:
    members = runtime.members(cell)
    password = runtime.superuser_password()
    root_cert = runtime.root_cert()
    states = _in_parallel(
        {
            m.name: functools.partial(_member_state, m.postgres_host, m.postgres_port, password, root_cert)
            for m in members
        },
        MEMBER_PROBE_TIMEOUT_S,
    )
    roles = _in_parallel(
        {
            m.name: functools.partial(http_json, f"{m.patroni_url}/patroni", 0.5, ca_file=root_cert)
            for m in members
            if m.patroni_url
        },
        MEMBER_PROBE_TIMEOUT_S,
    )
    found = []
    for member in members:
        state, answer = states[member.name], roles.get(member.name)
        role = answer[1] if answer else None
        found.append(
            {
                "member": member.name,
                "site": member.site,
                "out_of_recovery": state["out_of_recovery"] if state else None,
                "writable": state["writable"] if state else None,
                "patroni_role": role.get("role") if isinstance(role, dict) else None,
            }
        )
    return found


def writable_primaries(
    cell: int, target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> int:
    """How many members of ``cell`` would acknowledge a write right now, asked of each member's
    PostgreSQL (out of recovery, not read-only, synchronous replication off or with its sync
    standby attached): 1 in steady state, 0 during a failover, 2 or more is split brain."""
    return sum(1 for member in primaries(cell, target, run_dir, configuration) if member["writable"])


def writable_primaries_by_cell(
    target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, int]:
    """``{"1": n, "2": n, ...}``: writable primaries of every cell (a split-brain sample)."""
    return writable_primaries_of(_runtime(target, run_dir, configuration))


def writable_primaries_of(runtime: Target) -> dict[str, int]:
    """``writable_primaries_by_cell`` of a runtime already found (the drill's sampler keeps one)."""
    runtime.members(runtime.topology.cell_numbers[0])  # rendered once here, not once per cell's thread
    counts = _in_parallel(
        {
            str(cell): functools.partial(
                lambda c: sum(1 for member in _primaries(runtime, c) if member["writable"]), cell
            )
            for cell in runtime.topology.cell_numbers
        },
        2 * MEMBER_PROBE_TIMEOUT_S,
    )
    return {cell: int(count or 0) for cell, count in counts.items()}


def topology_status(
    target: str = "local", run_dir: str | None = None, configuration: Configuration = None
) -> dict[str, Any]:
    """The runtime's status (sites, cells, components), for the journal."""
    return _runtime(target, run_dir, configuration).status()


def load_error_ratio(
    timeline_path: str, window_s: float = 10.0, cells: list[int] | None = None, now: float | None = None
) -> float:
    """Failed / all requests of the load timeline (JSON lines ``{"t", "cell", "ok"}``) in the last
    ``window_s`` seconds, for ``cells`` (default all). 0.0 when there was no request."""
    end = time.time() if now is None else now
    samples = [s for s in read_timeline(Path(timeline_path)) if end - window_s <= s[0] <= end]
    if cells:
        samples = [s for s in samples if s[1] in set(cells)]
    return sum(1 for s in samples if not s[2]) / len(samples) if samples else 0.0


def load_tps(
    timeline_path: str, window_s: float = 10.0, cells: list[int] | None = None, now: float | None = None
) -> float:
    """Successful requests per second of the load timeline over the last ``window_s`` seconds,
    for ``cells`` (default all): compare with the offered rate."""
    assert window_s > 0, window_s
    end = time.time() if now is None else now
    samples = [s for s in read_timeline(Path(timeline_path)) if end - window_s <= s[0] <= end and s[2]]
    if cells:
        samples = [s for s in samples if s[1] in set(cells)]
    return len(samples) / window_s
