"""A drill against a deliberately broken topology fails: with the member guard and the app
servers' leader-lock fencing switched off, killing the PIDs `watertight status --json` lists for
prod leaves prod's PostgreSQL running as a primary beside the one samecity promotes. The app
server's writer, timed out on the deposed primary (its sync standby is gone), reconnects to the
newer timeline and acknowledges writes there, while the pooled connections it reads through stay
on the deposed one: the drill's stale-read verdict (judged from what the clients saw) fails, every
run, though the RTO looks fine.
The same drill passes on the real topology (tests/test_drill_controls.py, tests/test_member_faults.py)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topologies import moved
from watertight import drill
from watertight import topology as topology_module
from watertight.pg import service_tempdir
from watertight.runtime.local import LocalRuntime

FENCING_ON = "  member_guard: true      # PostgreSQL never outlives its Patroni (watertight.runtime.guard)\n  app_leader_lock: true   # app servers use only the member whose Patroni holds the leader lock\n"
TEXT = moved(80, 4)
assert FENCING_ON in TEXT, "topology.yaml's fencing section changed: update this test"
BROKEN = TEXT.replace(FENCING_ON, "  member_guard: false\n  app_leader_lock: false\n")


@pytest.fixture(scope="module")
def broken() -> Iterator[LocalRuntime]:
    run_dir = service_tempdir("watertight-broken-")
    run_dir.chmod(0o755)
    topology = topology_module.parse(BROKEN, "broken topology")
    assert not topology.fencing.member_guard and not topology.fencing.app_leader_lock
    local = LocalRuntime(run_dir, topology, BROKEN)
    try:
        local.up(progress=print)
        yield local
    finally:
        local.down(purge=True)


def test_without_fencing_a_users_kill_of_the_listed_pids_fails_the_drill_on_stale_reads(
    broken: LocalRuntime, tmp_path: Path
) -> None:
    code = drill.run(["site-pids-kill-prod"], 60.0, 150.0, tmp_path, broken.run_dir, print)
    report = json.loads((tmp_path / "site-pids-kill-prod" / "report.json").read_text())
    assert code == 1 and report["passed"] is False
    assert report["stale_reads"] > 0, report["stale_reads_detail"]
    assert any("reads were stale" in reason for reason in report["reasons"]), report["reasons"]
