"""The faults a user injects, not the ones our own actions do (issue 13): SIGKILL of exactly the
PIDs `watertight status --json` lists for a site, and of the Patroni process of each cell's
leader alone, under writes that read their own writes back. Within 30 s every cell has exactly one
writable primary, no read is stale, nothing acknowledged is missing, the cells the fault should
not touch see no errors, and no process of a killed component is left; afterwards `down` leaves no
process of the run and nothing listening on the topology's addresses."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cards import customers_in_each_cell
from tests.topologies import moved
from tests.writers import Writers, ledger_transactions
from watertight import pg, render, verdicts
from watertight import topology as topology_module
from watertight.chaos import probes
from watertight.pg import service_tempdir
from watertight.runtime import processes
from watertight.runtime.local import LocalRuntime

TEXT = moved(70, 3)
RECOVERY_S_MAX = 30.0
ORPHAN_WAIT_S = 5.0
SAMPLE_S = 0.5
ETCD_LOST_S = 25.0  # how long a member starting without an etcd quorum is watched


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = service_tempdir("watertight-faults-")
    run_dir.chmod(0o755)
    local = LocalRuntime(run_dir, topology_module.parse(TEXT, "member faults topology"), TEXT)
    try:
        local.up(progress=print)
        yield local
    finally:
        local.down(purge=True)


@pytest.fixture(scope="module")
def accounts(runtime: LocalRuntime) -> dict[int, str]:
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        opened = customers_in_each_cell(client)
    return {cell: customer["account_id"] for cell, customer in opened.items()}


def listed_status(runtime: LocalRuntime) -> dict[str, Any]:
    """What a user sees: `watertight status --json` of the run directory."""
    result = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "status", "--json", "--run-dir", str(runtime.run_dir)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    status: dict[str, Any] = json.loads(result.stdout)
    return status


def heal(runtime: LocalRuntime) -> None:
    runtime.start()
    runtime.up(progress=print)


def judge_the_fault(
    runtime: LocalRuntime, writers: Writers, killed_components: list[str], quiet_cells: list[int], at: float
) -> None:
    """Sample every cell's writable primaries until each has exactly one again (never two), check
    that nothing of a killed component runs, then let the writers show the recovery."""
    samples: list[tuple[float, int, int]] = []
    deadline = at + RECOVERY_S_MAX
    while True:
        counts = probes.writable_primaries_by_cell(run_dir=str(runtime.run_dir))
        now = time.time()
        samples += [(now, int(cell), count) for cell, count in counts.items()]
        assert max(counts.values()) <= 1, f"two writable primaries {now - at:.1f} s after the kill: {counts}"
        if all(count == 1 for count in counts.values()):
            break
        assert now < deadline, (
            f"not one writable primary per cell {RECOVERY_S_MAX:g} s after the kill: {counts}"
        )
        time.sleep(SAMPLE_S)
    print(f"one writable primary per cell {time.time() - at:.1f} s after the kill")
    assert verdicts.writable_primaries_max(samples, runtime.topology.cell_numbers) == {
        f"cell-{cell}": 1 for cell in runtime.topology.cell_numbers
    }
    left: dict[str, list[int]] = {}
    for name in killed_components:
        pids = runtime.component_pids(runtime.component(name))
        if pids:
            left[name] = pids
    assert not left, f"processes of killed components still run: {left}"
    # every cell serves again, seen by the writers (their reads included)
    wait_until = time.time() + RECOVERY_S_MAX
    while time.time() < wait_until:
        with writers.lock:
            recent = [s for s in writers.timeline if s[0] > time.time() - 3.0]
        if recent and all(any(ok for _, c, ok in recent if c == cell) for cell in writers.accounts):
            break
        time.sleep(0.5)
    time.sleep(3.0)
    for cell in quiet_cells:
        failures = [f for t, f in writers.failed[cell] if t >= 0]
        assert not failures, f"cell {cell} should not have noticed: {failures[:5]}"


def check_the_writes(runtime: LocalRuntime, writers: Writers) -> None:
    stale = verdicts.stale_reads(writers.history)
    assert stale["reads"] > 0
    assert stale["stale"] == 0, stale
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        for cell, account in writers.accounts.items():
            acked = set(writers.acked_ids(cell))
            assert acked, f"nothing was acknowledged on cell {cell}"
            missing = acked - ledger_transactions(client, account)
            assert not missing, f"cell {cell}: {len(missing)} acknowledged transactions missing"


def test_killing_every_pid_status_lists_for_a_site_leaves_one_primary_per_cell_and_no_orphan(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    heal(runtime)
    status = listed_status(runtime)
    prod = [c for c in status["components"] if c["site"] == "prod" and c["pid"]]
    assert {c["name"] for c in prod} >= {
        "etcd-prod",
        "pg-cell1-prod",
        "pg-cell2-prod",
        "app-prod",
        "gateway-prod",
    }
    quiet = [int(cell) for cell, view in status["cells"].items() if view["leader_site"] == "samecity"]
    with Writers(runtime.topology.entry_url, accounts, read_back=True) as writers:
        time.sleep(2.0)
        with writers.lock:
            for cell in writers.failed:
                writers.failed[cell].clear()
        at = time.time()
        processes.signal_pids([int(c["pid"]) for c in prod], signal.SIGKILL)
        judge_the_fault(runtime, writers, [c["name"] for c in prod], quiet, at)
    check_the_writes(runtime, writers)


def test_killing_the_patroni_of_every_cells_leader_alone_fences_its_postgres(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    heal(runtime)
    status = listed_status(runtime)
    leaders = [
        c
        for c in status["components"]
        if c["kind"] == "patroni"
        and c["cell"]
        and status["cells"][str(c["cell"])]["leader_site"] == c["site"]
    ]
    assert len(leaders) == runtime.topology.cells
    assert all(c["patroni_pid"] and c["postgres_pid"] for c in leaders), leaders
    with Writers(runtime.topology.entry_url, accounts, read_back=True) as writers:
        time.sleep(2.0)
        at = time.time()
        processes.signal_pids([int(c["patroni_pid"]) for c in leaders], signal.SIGKILL)
        # the guard fences PostgreSQL at once: well before the leader key can run out
        deadline = time.monotonic() + ORPHAN_WAIT_S
        while any(processes.state_of(int(c["postgres_pid"])) not in (None, "Z", "X") for c in leaders):
            assert time.monotonic() < deadline, "a leader's PostgreSQL outlived its Patroni"
            time.sleep(0.05)
        print(f"both leaders' PostgreSQL fenced {time.time() - at:.2f} s after their Patroni died")
        judge_the_fault(runtime, writers, [c["name"] for c in leaders], [], at)
    check_the_writes(runtime, writers)


def test_a_member_started_while_etcd_has_no_quorum_joins_once_it_is_back(runtime: LocalRuntime) -> None:
    """Patroni 4.1.5 exits at start when etcd lists its members but grants no lease (the quorum
    lost, or the member's site cut off, as after a watchdog reset during a partition). The guard
    starts it again, bounded, instead of leaving the member down for good: it joins once etcd has
    its quorum back. (CI saw a member left down after a partition healed.)"""
    heal(runtime)
    leader = runtime.cell_view(1)["leader_site"]
    site = next(s for s in ("prod", "samecity") if s != leader)
    member = runtime.component(f"pg-cell1-{site}")
    # the member's own site keeps its etcd member, which lists the members but has no quorum
    others = [runtime.component(render.etcd_name(s)) for s in runtime.topology.sites if s != site]
    runtime.kill(component=member.name)
    for etcd in others:
        runtime.kill(component=etcd.name)
    log = runtime.log_path(member)

    def failed_starts() -> int:
        return log.read_text(errors="replace").count("a start that failed") if log.exists() else 0

    before = failed_starts()
    try:
        runtime.start(component=member.name)
        deadline = time.monotonic() + ETCD_LOST_S
        while time.monotonic() < deadline:
            assert runtime.running(member), (
                f"{member.name} went down while etcd had no quorum:\n{pg.log_tail(log, 15)}"
            )
            if failed_starts() > before:
                break
            time.sleep(0.5)
        print(f"{member.name}: {failed_starts() - before} failed starts of Patroni while etcd had no quorum")
    finally:
        for etcd in others:
            runtime.start(component=etcd.name)
    heal(runtime)  # up: every cell has its leader and a streaming sync standby again
    assert runtime.running(member)
    view = runtime.cell_view(1)  # either member may have won the election after the quorum came back
    assert {view["leader_site"], view["sync_standby"]} == {"prod", "samecity"}, view


def test_after_the_kills_down_leaves_no_process_and_nothing_listening(runtime: LocalRuntime) -> None:
    heal(runtime)
    status = listed_status(runtime)
    victim = next(c for c in status["components"] if c["name"] == "pg-cell2-samecity")
    # the hardest case for down: the guard and its keeper at once, so nothing fences PostgreSQL
    keeper = next(p["pid"] for p in victim["processes"] if p["role"] == "keeper")
    processes.signal_pids([int(victim["pid"]), int(keeper)], signal.SIGKILL)
    time.sleep(1.0)
    orphaned = listed_status(runtime)
    shown = next(c for c in orphaned["components"] if c["name"] == "pg-cell2-samecity")
    assert not shown["alive"] and shown["orphans"], shown
    # up will not start the member beside its orphan, and says which PID holds its address
    with pytest.raises(Exception, match=rf"held by PID {shown['postgres_pid']}"):
        runtime.up()
    addresses = {address for c in runtime.components for address in c.listens}
    runtime.down()
    assert runtime.pids() == [] and runtime.stray_pids() == []
    assert processes.listeners(addresses) == {}
    runtime.up(progress=print)  # the module's fixture purges it at the end
