"""The failback steps: after activate-dr, bring the centers back as replicas of dr's primaries
(re-cloned: their old timelines may hold transactions dr never got, which must not come back),
move the primaries back to the centers with writes drained for the moment of the move, spread the
cells as the topology says, and make dr an asynchronous copy again.

Owns: re-cloning a cell's members (stop, wipe PGDATA, remove the cluster's keys from its
consensus, start: Patroni bootstraps them from the cluster they follow), the catch-up check, and
the promotion of the centers. Never: promote the centers before they replay everything dr wrote,
or leave dr writable once the centers are.
"""

from __future__ import annotations

import base64
import json
import shutil
import time
import urllib.request

import psycopg

from watertight import pg, render, tls
from watertight.runbooks.ops import (
    PROMOTE_TIMEOUT_S,
    Result,
    StepError,
    _check_cell,
    _runtime,
    _send,
    wait_until,
)
from watertight.runtime.local import LocalRuntime, http_json
from watertight.topology import CENTERS

RECLONE_TIMEOUT_S = 180.0
CONSENSUS_TIMEOUT_S = 60.0
CATCH_UP_TIMEOUT_S = 60.0
ETCD_TIMEOUT_S = 5.0
START_TIMEOUT_S = 60.0


def _etcd_delete_prefix(client_url: str, prefix: str, ca_file: str | None = None) -> int:
    """Delete every key under ``prefix`` through etcd's v3 JSON gateway (an https:// one verified
    with ``ca_file``, the run's CA); returns how many."""
    end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
    body = {
        "key": base64.b64encode(prefix.encode()).decode(),
        "range_end": base64.b64encode(end.encode()).decode(),
    }
    request = urllib.request.Request(
        f"{client_url}/v3/kv/deleterange",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"content-type": "application/json"},
    )
    try:
        with urllib.request.urlopen(
            request, timeout=ETCD_TIMEOUT_S, context=tls.context_for(client_url, ca_file)
        ) as response:
            return int(json.loads(response.read() or b"{}").get("deleted", 0))
    except OSError as error:
        raise StepError(f"etcd at {client_url} refused to delete {prefix}: {error}") from None


def _members(runtime: LocalRuntime, cell: int, dr: bool) -> list[render.Component]:
    return [
        c
        for c in runtime.components
        if c.kind == "patroni" and c.cell == cell and (c.site == render.DR_SITE) == dr
    ]


def _reclone(runtime: LocalRuntime, cell: int, dr: bool, etcd_url: str) -> float:
    """Stop the cell's members (centers or dr), wipe their data, drop their cluster from its
    consensus, start them again: Patroni bootstraps them from the cluster their config follows."""
    started = time.monotonic()
    members = _members(runtime, cell, dr)
    for member in members:
        runtime.stop(component=member.name)
    for member in members:
        if member.data_dir is not None:
            shutil.rmtree(render.pgdata(member.data_dir), ignore_errors=True)
    scope = render.dr_scope(cell) if dr else render.scope(cell)
    _etcd_delete_prefix(etcd_url, f"{render.PATRONI_NAMESPACE}{scope}/", runtime.root_cert())
    for member in members:
        runtime.start(component=member.name)
    return time.monotonic() - started


# ---- the steps --------------------------------------------------------------------------------------


def centers_consensus(run_dir: str, check: bool = False) -> Result:
    """Lift the fence of the centers and start their etcd members: the three-site consensus is
    whole again. The centers' members are configured to follow dr from now until promotion."""
    runtime = _runtime(run_dir)
    if not runtime.dr_active:
        return {"changed": False, "msg": "dr is not active: nothing to fail back"}
    etcds = [c for c in runtime.components if c.kind == "etcd"]
    if (
        not runtime.fenced_sites
        and runtime.mode.get("centers_follow_dr")
        and all(runtime.ready_status(c, timeout_s=2.0) == 200 for c in etcds)
    ):
        return {"changed": False, "msg": "the three-site consensus answers and the centers follow dr already"}
    if check:
        return {
            "changed": True,
            "msg": "would lift the fence of prod and samecity and start their etcd members",
        }
    runtime.set_mode(fenced_sites=[], centers_follow_dr=True)
    for etcd in etcds:
        runtime.start(component=etcd.name)
    seconds = wait_until(
        "the three-site etcd",
        lambda: all(runtime.ready_status(c, timeout_s=2.0) == 200 for c in etcds),
        CONSENSUS_TIMEOUT_S,
        "read the logs of etcd-prod, etcd-samecity and etcd-dr",
    )
    return {"changed": True, "msg": f"fence lifted; the three-site etcd answers after {seconds} s"}


def _centers_follow(runtime: LocalRuntime, cell: int) -> bool:
    """The centers' members replicate from dr: a standby leader and a streaming replica."""
    members = runtime.cluster_members(cell)
    roles = sorted(str(m.get("role")) for m in members if runtime.site_of_member(m) in CENTERS)
    states = {str(m.get("state")) for m in members}
    return roles in (["replica", "standby_leader"], ["standby_leader", "sync_standby"]) and states <= {
        "running",
        "streaming",
    }


def _centers_lead(runtime: LocalRuntime, cell: int) -> bool:
    view = runtime.cell_view(cell)
    return view["leader_site"] in CENTERS and view["sync_standby"] in CENTERS


def reclone_centers(run_dir: str, cell: int, check: bool = False) -> Result:
    """Make the cell's center members fresh replicas of its dr primary (re-cloned)."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    if _centers_lead(runtime, cell) and not runtime.dr_active:
        return {"changed": False, "msg": f"cell {cell} is led by the centers already"}
    if _centers_follow(runtime, cell):
        return {"changed": False, "msg": f"cell {cell}'s centers replicate from dr already"}
    if not runtime.mode.get("centers_follow_dr"):
        if check:
            return {"changed": True, "msg": f"would re-clone cell {cell}'s center members from dr"}
        raise StepError("the centers are not set to follow dr; run the failback runbook from its start")
    if check:
        return {"changed": True, "msg": f"would re-clone cell {cell}'s center members from dr"}
    etcd = render.LocalEndpoints(runtime.topology).etcd_client_url(CENTERS[0])
    _reclone(runtime, cell, dr=False, etcd_url=etcd)
    seconds = wait_until(
        f"cell {cell}'s centers following dr",
        lambda: _centers_follow(runtime, cell),
        RECLONE_TIMEOUT_S,
        f"read the logs of pg-cell{cell}-prod and pg-cell{cell}-samecity",
    )
    return {
        "changed": True,
        "msg": f"cell {cell}'s center members re-cloned from dr, streaming after {seconds} s",
    }


def start_centers(run_dir: str, check: bool = False) -> Result:
    """Start whatever of the centers is not running (app servers, gateways)."""
    runtime = _runtime(run_dir)
    idle = [c for c in runtime.components if c.site in CENTERS and not runtime.running(c)]
    if not idle:
        return {"changed": False, "msg": "every component of the centers runs"}
    if check:
        return {"changed": True, "msg": f"would start {', '.join(c.name for c in idle)}"}
    for site in CENTERS:
        runtime.start(site=site)
    http = [c for c in idle if c.kind in ("app", "gateway")]

    def answering() -> bool:
        dead = [c.name for c in http if not runtime.running(c)]
        if dead:
            raise StepError(f"{', '.join(dead)} exited at start; read {runtime.run_dir / 'logs'}/<name>.log")
        return all(runtime.ready_status(c, timeout_s=1.0) != 0 for c in http)

    seconds = wait_until(
        "the centers' app servers and gateways answering", answering, START_TIMEOUT_S, "read their logs"
    )
    return {"changed": True, "msg": f"started {', '.join(c.name for c in idle)}; answering after {seconds} s"}


def _lsn(text: str) -> int:
    high, low = text.split("/")
    return (int(high, 16) << 32) + int(low, 16)


def promote_centers(run_dir: str, cell: int, check: bool = False) -> Result:
    """With the cell drained, wait until the centers' standby leader has replayed all that dr
    wrote, then promote the centers' cluster and wait for its sync standby."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    if _centers_lead(runtime, cell):
        return {"changed": False, "msg": f"cell {cell} is led by the centers already"}
    if check:
        return {"changed": True, "msg": f"would promote cell {cell}'s centers once they replay all of dr"}
    members = runtime.cluster_members(cell)
    standby = next((m for m in members if m.get("role") == "standby_leader"), None)
    if standby is None:
        raise StepError(
            f"cell {cell}: no standby leader in the centers; run reclone first (the runbook does)"
        )
    dr_member = next(iter(runtime.cluster_members(cell, dr=True)), None)
    started = time.monotonic()
    dr_api = render.LocalEndpoints(runtime.topology).patroni_api_url(cell, render.DR_SITE)

    ca_file = runtime.root_cert()

    def caught_up() -> bool:
        _, dr_state = http_json(f"{dr_api}/patroni", timeout_s=1.0, ca_file=ca_file)
        _, center_state = http_json(str(standby.get("api_url")), timeout_s=1.0, ca_file=ca_file)
        if not isinstance(dr_state, dict) or not isinstance(center_state, dict):
            return False
        written = (dr_state.get("xlog") or {}).get("location")
        replayed = (center_state.get("xlog") or {}).get("replayed_location")
        return written is not None and replayed is not None and int(replayed) >= int(written)

    wait_until(
        f"cell {cell}'s centers replaying all of dr ({dr_member and dr_member.get('name')})",
        caught_up,
        CATCH_UP_TIMEOUT_S,
        "is the cell drained? (the runbook drains every cell first)",
    )
    api = str(standby.get("api_url")).removesuffix("/patroni")
    status, text = _send("PATCH", f"{api}/config", {"standby_cluster": None}, ca_file=ca_file)
    if status != 200:
        raise StepError(f"Patroni refused to change cell {cell}'s configuration: {status} {text.strip()}")
    wait_until(
        f"cell {cell} led by the centers with a sync standby",
        lambda: _centers_lead(runtime, cell),
        PROMOTE_TIMEOUT_S,
        f"read the logs of pg-cell{cell}-prod and pg-cell{cell}-samecity",
    )
    seconds = round(time.monotonic() - started, 2)
    leader = runtime.cell_view(cell)["leader_site"]
    return {"changed": True, "msg": f"cell {cell} promoted in the centers ({leader} leads) after {seconds} s"}


SEAL_SQL = "ALTER SYSTEM SET default_transaction_read_only = on"
SEAL_TIMEOUT_S = 10.0


def seal_dr(run_dir: str, cell: int, check: bool = False) -> Result:
    """With the cell drained and before the centers are promoted: dr's primary of the cell stops
    taking writes (``default_transaction_read_only`` by ALTER SYSTEM, reloaded, and every client
    session ended so none keeps a write open), so there is no moment with two members that would
    acknowledge a write, and what the centers must replay stops growing. ``reclone_dr`` later
    replaces dr's data directory, and the setting with it."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    if not runtime.dr_active:
        return {"changed": False, "msg": "dr does not serve: nothing to seal"}
    endpoints = render.LocalEndpoints(runtime.topology)
    host, port = endpoints.postgres_host(cell, render.DR_SITE), endpoints.postgres_port(cell)
    password = runtime.superuser_password()
    root_cert = runtime.root_cert()
    try:
        with pg.connect_superuser(host, port, password, int(SEAL_TIMEOUT_S), root_cert) as connection:
            connection.execute(f"SET statement_timeout = {int(SEAL_TIMEOUT_S * 1000)}")
            row = connection.execute(
                "SELECT pg_is_in_recovery(), current_setting('default_transaction_read_only')"
            ).fetchone()
            assert row is not None
            in_recovery, read_only = row
            if in_recovery or read_only == "on":
                why = "follows the centers" if in_recovery else "is read-only already"
                return {"changed": False, "msg": f"cell {cell}'s dr member {why}"}
            if check:
                return {"changed": True, "msg": f"would make cell {cell}'s dr primary read-only"}
            connection.execute(SEAL_SQL)
            connection.execute("SELECT pg_reload_conf()")
            ended = connection.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
                " WHERE backend_type = 'client backend' AND pid <> pg_backend_pid() AND datname = %s",
                (render.DATABASE,),
            ).fetchone()
    except psycopg.Error as error:
        raise StepError(
            f"cell {cell}: could not make dr's primary ({host}:{port}) read-only: {error}; "
            f"read the log of pg-cell{cell}-dr"
        ) from None
    wait_until(
        f"cell {cell}'s dr primary read-only",
        lambda: _dr_read_only(host, port, password, root_cert),
        SEAL_TIMEOUT_S,
        f"read the log of pg-cell{cell}-dr",
    )
    sessions = int(ended[0]) if ended else 0
    return {
        "changed": True,
        "msg": f"cell {cell}'s dr primary is read-only; {sessions} client sessions ended",
    }


def _dr_read_only(host: str, port: int, password: str, root_cert: str | None) -> bool:
    """A new session sees the reloaded setting."""
    try:
        with pg.connect_superuser(host, port, password, 2, root_cert) as connection:
            row = connection.execute("SHOW default_transaction_read_only").fetchone()
    except psycopg.Error:
        return False
    return row is not None and row[0] == "on"


def retire_dr(run_dir: str, check: bool = False) -> Result:
    """dr stops serving: its app server, gateway and primaries stop, and the runtime goes back to
    the centers (the entry follows by itself: dr's gateway is gone)."""
    runtime = _runtime(run_dir)
    serving = [
        c
        for c in runtime.components
        if c.site == render.DR_SITE and (c.on_dr_activation or c.kind == "patroni") and runtime.running(c)
    ]
    if not runtime.dr_active:
        return {"changed": False, "msg": "dr does not serve"}
    if check:
        return {
            "changed": True,
            "msg": f"would stop {', '.join(c.name for c in serving)} and serve from the centers",
        }
    for component in serving:
        runtime.stop(component=component.name)
    runtime.set_mode(dr_active=False, centers_follow_dr=False)
    return {"changed": True, "msg": f"dr retired: stopped {', '.join(c.name for c in serving)}"}


def _dr_follows(runtime: LocalRuntime, cell: int) -> bool:
    dr_copy = runtime.cell_view(cell)["dr_copy"]
    return (
        bool(dr_copy) and dr_copy["role"] == "standby_leader" and dr_copy["state"] in ("streaming", "running")
    )


def reclone_dr(run_dir: str, cell: int, check: bool = False) -> Result:
    """Make the cell's dr member an asynchronous copy of the centers again (re-cloned)."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    view = runtime.cell_view(cell)
    if (
        not runtime.dr_active
        and _dr_follows(runtime, cell)
        and view["dr_copy"]["timeline"] == view["timeline"]
    ):
        return {"changed": False, "msg": f"cell {cell}'s dr copy streams from the centers already"}
    if check:
        return {"changed": True, "msg": f"would re-clone cell {cell}'s dr copy from the centers"}
    if runtime.dr_active:
        raise StepError("dr still serves; retire it first (the runbook does)")
    etcd = render.LocalEndpoints(runtime.topology).etcd_dr_client_url()
    _reclone(runtime, cell, dr=True, etcd_url=etcd)
    seconds = wait_until(
        f"cell {cell}'s dr copy streaming",
        lambda: _dr_follows(runtime, cell),
        RECLONE_TIMEOUT_S,
        f"read the log of pg-cell{cell}-dr",
    )
    return {
        "changed": True,
        "msg": f"cell {cell}'s dr copy re-cloned from the centers, streaming after {seconds} s",
    }


STEPS = {
    "centers_consensus": centers_consensus,
    "reclone_centers": reclone_centers,
    "start_centers": start_centers,
    "seal_dr": seal_dr,
    "promote_centers": promote_centers,
    "retire_dr": retire_dr,
    "reclone_dr": reclone_dr,
}
