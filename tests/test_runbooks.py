"""The runbooks through ansible-runner against a real local topology under light load: a planned
switchover of a center loses nothing, draining a cell leaves the other untouched, and activating dr
after the loss of both centers serves every cell again and reports the RPO. Every runbook run a
second time changes nothing; check mode changes nothing."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest

from tests.ansible_tasks import ansible_template, kubernetes_task
from tests.cards import customers_in_each_cell
from tests.topologies import moved
from tests.writers import Writers, ledger_transactions
from watertight import pg, render, verdicts
from watertight import topology as topology_module
from watertight.runbooks import ops, runner
from watertight.runtime.local import LocalRuntime, http_json

# its own addresses and entry port: other test modules' topologies are left alone
TEST_TOPOLOGY = moved(50, 2).replace("port: 28080", "port: 28180").replace("_port: 2809", "_port: 2819")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = pg.service_tempdir("watertight-runbooks-")
    run_dir.chmod(0o755)
    topology = topology_module.parse(TEST_TOPOLOGY, "runbook test topology")
    local = LocalRuntime(run_dir, topology, TEST_TOPOLOGY)
    try:
        local.up(progress=print)
        yield local
    finally:
        LocalRuntime(run_dir).down(purge=True)


@pytest.fixture(scope="module")
def accounts(runtime: LocalRuntime) -> dict[int, str]:
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        return {cell: opened["account_id"] for cell, opened in customers_in_each_cell(client).items()}


def leaders(runtime: LocalRuntime) -> dict[int, str | None]:
    return {cell: runtime.cell_view(cell)["leader_site"] for cell in runtime.topology.cell_numbers}


def assert_nothing_lost(runtime: LocalRuntime, writers: Writers, accounts: dict[int, str]) -> None:
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        for cell, account_id in accounts.items():
            acked = writers.acked_ids(cell)
            assert acked, f"cell {cell}: nothing was acknowledged"
            missing = set(acked) - ledger_transactions(client, account_id)
            assert not missing, f"cell {cell}: {len(missing)} acknowledged transactions missing"


def serving_diagnostics(runtime: LocalRuntime) -> str:
    """What the entry, the gateways and the app servers report, and the app servers' last lines."""
    lines = []
    for component in runtime.components:
        if component.kind in ("entry", "gateway", "app") and runtime.expected(component):
            lines.append(f"{component.name} readyz: {http_json(component.ready_url or '', timeout_s=2.0)}")
            if component.kind == "app":
                log = runtime.log_path(component).read_text(errors="replace").splitlines()
                lines += [f"  | {line}" for line in log[-15:]]
    return "\n".join(lines)


def gateway_drain_state(runtime: LocalRuntime, cell: int) -> dict[str, Any]:
    """``python -m cardcore.gateway.drain`` against prod's gateway."""
    gateway = next(c for c in runtime.components if c.name == "gateway-prod")
    address = urlsplit(gateway.ready_url or "")
    result = subprocess.run(
        [sys.executable, "-m", "cardcore.gateway.drain", "--host", str(address.hostname),
         "--port", str(address.port), "--cell", str(cell)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# ---- without a topology -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["switchover-site", "activate-dr", "failback", "drain-cell"])
def test_every_runbook_passes_the_ansible_syntax_check(name: str) -> None:
    assert name in runner.names()
    rc, output = runner.syntax_check(name)
    assert rc == 0, output


def test_a_broken_playbook_fails_the_syntax_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.yml").write_text(
        "- hosts: localhost\n  tasks:\n    - name: x\n      no_such_module_anywhere: {}\n"
    )
    monkeypatch.setattr(runner, "RUNBOOKS_DIR", tmp_path)
    rc, output = runner.syntax_check("broken")
    assert rc != 0 and "no_such_module_anywhere" in output


def test_bad_extras_and_unknown_runbooks_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(runner.RunbookError, match="KEY=VALUE"):
        runner.parse_extras(["site"])
    with pytest.raises(runner.RunbookError, match="set by watertight"):
        runner.parse_extras(["watertight_run_dir=/tmp"])
    assert runner.parse_extras(["site=prod", "ack_log=a=b"]) == {"site": "prod", "ack_log": "a=b"}
    result = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "runbook", "no-such-runbook", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no runbook named 'no-such-runbook'" in result.stderr and "switchover-site" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_step_summary_reads_ansible_runner_events() -> None:
    event = {
        "event": "runner_on_ok",
        "event_data": {
            "task": "Promote each cell's dr copy",
            "duration": 3.21,
            "res": {"changed": True, "results": [{"msg": "cell 1 promoted"}, {"msg": "cell 2 promoted"}]},
        },
    }
    step = runner.step_of(event)
    assert step is not None
    assert (step["status"], step["changed"], step["seconds"]) == ("ok", True, 3.21)
    assert step["msg"] == "cell 1 promoted; cell 2 promoted"
    assert runner.step_of({"event": "playbook_on_task_start", "event_data": {}}) is None


# ---- against the topology ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_switchover_site_moves_every_cell_prod_leads_and_loses_nothing(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    before = leaders(runtime)
    led_by_prod = [cell for cell, site in before.items() if site == "prod"]
    assert led_by_prod and set(before.values()) == {"prod", "samecity"}

    checked = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir, check=True)
    assert checked["rc"] == 0 and checked["status"] == "successful", checked
    assert any("would switch cell" in s["msg"] for s in checked["steps"])
    assert leaders(runtime) == before  # check mode changed nothing

    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(1)
        summary = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir)
        time.sleep(2)
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    assert leaders(runtime) == dict.fromkeys(runtime.topology.cell_numbers, "samecity")
    (switch,) = [s for s in summary["steps"] if s["task"].startswith("Switch each cell")]
    assert switch["changed"] and switch["seconds"] is not None
    print(f"switchover-site prod: {switch['seconds']} s for {len(led_by_prod)} cell(s); {switch['msg']}")
    assert Path(summary["artifacts"]).is_dir()
    assert json.loads((Path(summary["artifacts"]).parents[1] / "summary.json").read_text())["rc"] == 0
    assert_nothing_lost(runtime, writers, accounts)

    again = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again

    # back as the topology spreads them, for the tests that follow
    for cell in led_by_prod:
        ops.switchover_cell(str(runtime.run_dir), cell, "prod")
    assert leaders(runtime) == before


@pytest.mark.timeout(300)
def test_drain_cell_stops_one_cell_and_the_other_never_notices(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(1)
        drained_at = time.time()
        summary = runner.run("drain-cell", {"cell": "2"}, runtime.run_dir)
        assert summary["rc"] == 0 and summary["changed"] == 1, summary
        with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
            refused = client.post(
                "/v1/repayments",
                json={"idempotency_key": "drained-1", "account_id": accounts[2], "amount": 1},
            )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "cell_drained"
        # what the kubernetes target's drain-cell runs inside each gateway pod, against a real gateway
        assert gateway_drain_state(runtime, 2) == {"drained": True, "in_flight": 0}
        serving = gateway_drain_state(runtime, 1)  # under the writers' load: requests may be in flight
        assert serving["drained"] is False and isinstance(serving["in_flight"], int), serving
        again = runner.run("drain-cell", {"cell": "2"}, runtime.run_dir)
        assert again["rc"] == 0 and again["changed"] == 0, again
        time.sleep(1)
        back = runner.run("drain-cell", {"cell": "2", "state": "serving"}, runtime.run_dir)
        assert back["rc"] == 0 and back["changed"] == 1, back
        restored_at = time.time()
        time.sleep(1.5)
    window = (drained_at, restored_at)
    assert verdicts.isolation(writers.timeline, [1], window) == 0.0
    assert verdicts.requests_in(writers.timeline, [1], window) > 20
    assert any(not ok for t, cell, ok in writers.timeline if cell == 2 and drained_at < t < restored_at)
    assert all(ok for t, cell, ok in writers.timeline if cell == 2 and t > restored_at + 0.5)
    assert_nothing_lost(runtime, writers, accounts)

    assert gateway_drain_state(runtime, 2) == {"drained": False, "in_flight": 0}
    with pytest.raises(AssertionError, match="reports no cell 9"):
        gateway_drain_state(runtime, 9)

    bad = runner.run("drain-cell", {"cell": "9"}, runtime.run_dir)
    assert bad["rc"] != 0 and "no cell 9" in str(bad["error"])
    missing = runner.run("drain-cell", {}, runtime.run_dir)
    assert missing["rc"] != 0 and "pass cell=N" in str(missing["error"])


def keys_listed_as_on_kubernetes(runtime: LocalRuntime, ack_log: Path) -> list[str]:
    """What activate-dr on kubernetes hands its RPO step: its listing task's psql command, run here
    against each cell's dr member (the pod's socket replaced by dr's address), its results put
    through the step's found_keys expression."""
    listing = kubernetes_task("activate-dr", "List the idempotency keys")
    count = kubernetes_task("activate-dr", "Count acknowledged")
    window = ops.ack_log_window(str(runtime.run_dir), str(ack_log))
    password = runtime.superuser_password()
    variables: dict[str, Any] = {
        "ack_window": window,
        "kube_cells": [{"cell": cell} for cell in runtime.topology.cell_numbers],
        "kube": {
            "postgres_socket_dir": runtime.topology.address("dr"),
            "superuser": pg.SUPERUSER,
            "database": render.DATABASE,
        },
    }
    results = []
    for item in ansible_template(listing["loop"], variables):
        argv = shlex.split(
            ansible_template(listing["kubernetes.core.k8s_exec"]["command"], {**variables, "item": item})
        )
        assert argv[0] == "psql", argv
        env = {
            **os.environ,
            "PGPORT": str(runtime.topology.postgres_port(item["cell"])),
            "PGPASSWORD": password,
        }
        done = subprocess.run(
            [str(pg.pg_bindir() / "psql"), *argv[1:]], env=env, capture_output=True, text=True, timeout=60
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results.append({"item": item, "rc": done.returncode, "stdout_lines": done.stdout.splitlines()})
    found = ansible_template(count["watertight_step"]["found_keys"], {"dr_keys": {"results": results}})
    assert isinstance(found, list)
    return found


@pytest.mark.timeout(420)
def test_activate_dr_after_losing_both_centers_serves_every_cell_from_dr(
    runtime: LocalRuntime, accounts: dict[int, str], tmp_path: Path
) -> None:
    ack_log = tmp_path / "ack.jsonl"
    checked = runner.run("activate-dr", {}, runtime.run_dir, check=True)
    assert checked["rc"] == 0, checked
    assert runtime.fenced_sites == [] and not runtime.dr_active
    # an ack log that is not there stops the run before it fences anything
    bad = runner.run("activate-dr", {"ack_log": str(tmp_path / "none.jsonl")}, runtime.run_dir)
    assert bad["rc"] != 0 and "does not exist" in str(bad["error"]), bad
    reread = LocalRuntime(runtime.run_dir)
    assert reread.fenced_sites == [] and not reread.dr_active and reread.pids(site="prod")

    with Writers(runtime.topology.entry_url, accounts, ack_log=ack_log) as writers:
        time.sleep(2)
        lost_at = time.time()
        runtime.kill(site="prod")
        runtime.kill(site="samecity")
        summary = runner.run("activate-dr", {"ack_log": str(ack_log)}, runtime.run_dir)
        time.sleep(3)  # writes go on, now on dr
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    print(f"activate-dr took {summary['seconds']} s: " + "; ".join(s["msg"] for s in summary["steps"]))

    reloaded = LocalRuntime(runtime.run_dir)
    assert reloaded.dr_active and reloaded.fenced_sites == ["prod", "samecity"]
    assert reloaded.pids(site="prod") == [] and reloaded.pids(site="samecity") == []
    for cell in runtime.topology.cell_numbers:
        dr_copy = reloaded.cell_view(cell)["dr_copy"]
        assert dr_copy["role"] == "leader" and dr_copy["state"] == "running", dr_copy
        served_after = [t for t, c, ok in writers.timeline if c == cell and ok and t > lost_at]
        assert served_after, f"cell {cell} never served again after the loss"

    # the RPO the runbook reported is the one the ledgers show
    (rpo_step,) = [s for s in summary["steps"] if s["task"].startswith("Count acknowledged")]
    reported = rpo_step["result"]["rpo"]
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        found = set().union(*(ledger_transactions(client, account) for account in accounts.values()))
    at_the_end = verdicts.rpo(writers.acked, found)
    assert reported["acknowledged"] <= at_the_end["acknowledged"]
    assert reported["missing"] <= at_the_end["missing"]  # acked after the runbook counted are on dr
    print(f"activate-dr RPO: {reported}")

    # the kubernetes target counts the same RPO from the keys psql lists in each cell's dr member:
    # its tasks, templated by Ansible with this topology's dr addresses, against the same ledgers
    counted_here = ops.rpo_of_ack_log(str(runtime.run_dir), str(ack_log))["rpo"]
    listed = keys_listed_as_on_kubernetes(runtime, ack_log)
    assert len(listed) >= counted_here["acknowledged"] - counted_here["missing"] > 0
    counted_there = ops.rpo_of_ack_log(str(runtime.run_dir), str(ack_log), found_keys=listed)["rpo"]
    assert counted_there == counted_here

    again = runner.run("activate-dr", {}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again
    # a plain `up` keeps the fenced centers down and dr serving
    assert reloaded.up()["started"] == []
    assert reloaded.pids(site="prod") == []


@pytest.mark.timeout(600)
def test_failback_brings_the_centers_back_spread_as_before_and_loses_nothing_dr_acknowledged(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    assert LocalRuntime(runtime.run_dir).dr_active, "runs after the activate-dr test"
    checked = runner.run("failback", {}, runtime.run_dir, check=True)
    assert checked["rc"] == 0, checked
    assert LocalRuntime(runtime.run_dir).dr_active  # check mode changed nothing

    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(2)
        summary = runner.run("failback", {}, runtime.run_dir)
        time.sleep(3)  # writes go on, on the centers again
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    print(f"failback took {summary['seconds']} s: " + "; ".join(s["msg"] for s in summary["steps"]))

    after = LocalRuntime(runtime.run_dir)
    assert not after.dr_active and after.fenced_sites == []
    for cell in runtime.topology.cell_numbers:
        view = after.cell_view(cell)
        assert view["leader_site"] == runtime.topology.leader_site(cell), view
        assert view["sync_standby"] == runtime.topology.standby_site(cell), view
        assert view["dr_copy"]["role"] == "standby_leader", view
        last = [ok for t, c, ok in writers.timeline if c == cell][-5:]
        assert last and all(last), (
            f"cell {cell} does not serve at the end: {writers.failed[cell][-3:]}\n{serving_diagnostics(after)}"
        )
    assert not after.running(after.component("gateway-dr")) and not after.running(after.component("app-dr"))
    assert_nothing_lost(runtime, writers, accounts)

    again = runner.run("failback", {}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again
