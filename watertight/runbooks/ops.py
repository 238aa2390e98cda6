"""The steps of the operations team's runbooks, on the local target: each one idempotent, each with
a check mode that says what it would change and changes nothing, each bounded in time.

Owns: Patroni switchovers by cell, the drain file of the gateways, fencing a site, the dr
consensus and the promotion of the dr copies, dr's app server and gateway, and the RPO of an ack
log against the ledgers. The playbooks in runbooks/ call these through the Ansible module
``runbooks/library/watertight_step.py``; nothing here knows Ansible.
Never: act on a site or cell the topology does not name, promote dr while a center can still take
writes (the activation fences first), or wait without a bound.

Every step returns a dict with ``changed`` (bool) and ``msg`` (one sentence: what it decided and
why), plus figures of its own.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from cardcore.gateway import drain as gateway_drain

from watertight import render, tls
from watertight.runtime.local import LocalRuntime, RuntimeError_, http_json
from watertight.runtime.target import Target
from watertight.topology import CENTERS

SWITCHOVER_TIMEOUT_S = 60.0
DRAIN_TIMEOUT_S = 30.0
PROMOTE_TIMEOUT_S = 60.0
SERVE_TIMEOUT_S = 60.0
HTTP_TIMEOUT_S = 30.0
POLL_S = 0.2
ACK_CLOCK_MARGIN_S = 300.0  # the load's clock against the databases'

Result = dict[str, Any]


class StepError(RuntimeError):
    """A step could not do its job; the message says what failed and what to do next."""


def _runtime(run_dir: str) -> LocalRuntime:
    try:
        return LocalRuntime(Path(run_dir))
    except RuntimeError_ as error:
        raise StepError(str(error)) from None


def _send(
    method: str, url: str, body: Any, timeout_s: float = HTTP_TIMEOUT_S, ca_file: str | None = None
) -> tuple[int, str]:
    """One JSON request to a Patroni (an ``https://`` one verified with ``ca_file``, the run's CA)."""
    data = json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(
            request, timeout=timeout_s, context=tls.context_for(url, ca_file)
        ) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace")
    except OSError as error:
        return 0, str(error)


def wait_until(what: str, done: Callable[[], bool], timeout_s: float, hint: str) -> float:
    """Poll ``done`` every POLL_S until it holds; after ``timeout_s`` raise, saying what did not
    happen and ``hint`` (what to read or do). Returns the seconds it took."""
    started = time.monotonic()
    while not done():
        if time.monotonic() - started > timeout_s:
            raise StepError(f"{what}: not done after {timeout_s:.0f} s; {hint}")
        time.sleep(POLL_S)
    return round(time.monotonic() - started, 2)


def _check_site(runtime: Target, site: str, allowed: tuple[str, ...]) -> None:
    if site not in allowed:
        raise StepError(f"site must be one of {', '.join(allowed)}; got {site!r}")


def _check_cell(runtime: Target, cell: int) -> None:
    if cell not in runtime.topology.cell_numbers:
        raise StepError(f"no cell {cell}; cells are 1..{runtime.topology.cells}")


def _other_center(site: str) -> str:
    return next(s for s in CENTERS if s != site)


# ---- facts ------------------------------------------------------------------------------------------


def facts(run_dir: str) -> Result:
    """Who leads each cell now, which sites are fenced, whether dr serves."""
    runtime = _runtime(run_dir)
    cells = {}
    for cell in runtime.topology.cell_numbers:
        view = runtime.cell_view(cell)
        cells[str(cell)] = {
            "leader_site": view["leader_site"],
            "sync_standby": view["sync_standby"],
            "dr_role": (view["dr_copy"] or {}).get("role"),
        }
    return {
        "changed": False,
        "msg": f"{len(cells)} cells; fenced sites: {', '.join(runtime.fenced_sites) or 'none'}; dr active: {runtime.dr_active}",
        "cells": cells,
        "cell_numbers": list(runtime.topology.cell_numbers),
        "home_sites": {str(c): runtime.topology.leader_site(c) for c in runtime.topology.cell_numbers},
        "fenced_sites": runtime.fenced_sites,
        "dr_active": runtime.dr_active,
        "entry": runtime.topology.entry_url,
    }


# ---- switchover -------------------------------------------------------------------------------------


def switchover_cell(run_dir: str, cell: int, to_site: str, check: bool = False) -> Result:
    """Make ``to_site``'s member the leader of ``cell`` by a Patroni switchover (the sync standby
    takes over after the leader has shut down cleanly: nothing acknowledged is lost), and wait until
    the old leader streams again as the sync standby."""
    return switchover(_runtime(run_dir), cell, to_site, check)


def switchover(runtime: Target, cell: int, to_site: str, check: bool = False) -> Result:
    """``switchover_cell`` on any target: through the Patroni REST API of the cell's leader, as
    the target reaches it."""
    _check_cell(runtime, cell)
    _check_site(runtime, to_site, CENTERS)
    view = runtime.cell_view(cell)
    leader, sync = view["leader_site"], view["sync_standby"]
    if leader == to_site:
        return {"changed": False, "msg": f"cell {cell} is led by {to_site} already", "seconds": 0.0}
    if check:
        return {
            "changed": True,
            "msg": f"would switch cell {cell} over from {leader or '(no leader now)'} to {to_site}",
            "seconds": 0.0,
        }
    if leader is None:
        raise StepError(f"cell {cell} has no leader now; a switchover needs one (see `watertight status`)")
    if sync != to_site:
        raise StepError(
            f"cell {cell}: {to_site} is not its streaming sync standby (it is {sync}); a switchover "
            "to it could lose transactions. Wait for it to catch up, then run the runbook again"
        )
    started = time.monotonic()
    api = next(m.patroni_url for m in runtime.members(cell) if m.site == leader)
    status, text = _send(
        "POST",
        f"{api}/switchover",
        {"leader": render.pg_name(cell, leader), "candidate": render.pg_name(cell, to_site)},
        timeout_s=SWITCHOVER_TIMEOUT_S,
        ca_file=runtime.root_cert(),
    )
    if status != 200:
        raise StepError(
            f"Patroni refused the switchover of cell {cell} to {to_site}: {status} {text.strip()}"
        )
    deadline = started + SWITCHOVER_TIMEOUT_S
    leader_seconds: float | None = None
    while True:
        view = runtime.cell_view(cell)
        if leader_seconds is None and view["leader_site"] == to_site:
            leader_seconds = round(time.monotonic() - started, 2)
        if view["leader_site"] == to_site and view["sync_standby"] == leader:
            break
        if time.monotonic() > deadline:
            raise StepError(
                f"cell {cell}: after {SWITCHOVER_TIMEOUT_S:.0f} s the leader is {view['leader_site']} and "
                f"the sync standby {view['sync_standby']}; read the Patroni logs of pg-cell{cell}-*"
            )
        time.sleep(POLL_S)
    seconds = round(time.monotonic() - started, 2)
    return {
        "changed": True,
        "msg": f"cell {cell} switched over from {leader} to {to_site}: new leader after {leader_seconds} s, "
        f"{leader} streaming as its sync standby after {seconds} s",
        "leader_seconds": leader_seconds,
        "seconds": seconds,
    }


# ---- drain ------------------------------------------------------------------------------------------


def _read_drained(path: Path) -> set[int]:
    try:
        return set(json.loads(path.read_text()).get("drained_cells", []))
    except FileNotFoundError:
        return set()


def _gateways(runtime: LocalRuntime) -> list[render.Component]:
    return [c for c in runtime.components if c.kind in ("gateway", "entry") and runtime.expected(c)]


def drain_cell(run_dir: str, cell: int, drained: bool, check: bool = False) -> Result:
    """Drain ``cell`` (every gateway and the entry answer its new requests 503 / code 91 at once)
    or bring it back; wait until every running gateway has applied it and, when draining, until
    no request of the cell is in flight anywhere."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    path = render.drain_file(runtime.run_dir)
    now = _read_drained(path)
    wanted = (now | {cell}) if drained else (now - {cell})
    verb = "drained" if drained else "serving"
    changed = wanted != now
    if check:
        return {
            "changed": changed,
            "msg": f"cell {cell} would be {verb}" if changed else f"cell {cell} is {verb} already",
        }
    if changed:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"drained_cells": sorted(wanted)}))
        tmp.chmod(0o644)
        tmp.replace(path)
    started = time.monotonic()
    deadline = started + DRAIN_TIMEOUT_S
    while True:
        pending = []
        for gateway in _gateways(runtime):
            if not runtime.running(gateway):
                continue  # reads the file when it starts
            try:  # what the kubernetes target asks inside each gateway pod, too
                report = gateway_drain.status(gateway.ready_url or "", cell, timeout_s=1.0)
            except (OSError, ValueError):
                report = None
            if report is None or report["drained"] is not drained:
                pending.append(f"{gateway.name} has not applied it")
            elif drained and report["in_flight"]:
                pending.append(f"{gateway.name} has {report['in_flight']} requests in flight")
        if not pending:
            break
        if time.monotonic() > deadline:
            raise StepError(f"cell {cell} not {verb} after {DRAIN_TIMEOUT_S:.0f} s: {'; '.join(pending)}")
        time.sleep(POLL_S)
    seconds = round(time.monotonic() - started, 2)
    if not changed:
        return {"changed": False, "msg": f"cell {cell} is {verb} already", "seconds": seconds}
    return {
        "changed": True,
        "msg": f"cell {cell} is {verb} on every gateway after {seconds} s",
        "seconds": seconds,
    }


# ---- dr activation ----------------------------------------------------------------------------------


def fence_site(run_dir: str, site: str, check: bool = False) -> Result:
    """Fence a lost center: kill -9 whatever of it still runs and record it fenced, so neither
    `watertight up` nor a returning machine lets it take writes beside dr."""
    runtime = _runtime(run_dir)
    _check_site(runtime, site, CENTERS)
    alive = [c.name for c in runtime.select(site=site) if runtime.running(c)]
    fenced = site in runtime.fenced_sites
    if fenced and not alive:
        return {"changed": False, "msg": f"{site} is fenced already and nothing of it runs"}
    if check:
        return {"changed": True, "msg": f"would fence {site} (kill -9: {', '.join(alive) or 'nothing runs'})"}
    runtime.set_mode(fenced_sites=[*runtime.fenced_sites, site])
    killed = runtime.kill(site=site)
    return {
        "changed": True,
        "msg": f"{site} fenced; killed {', '.join(killed) or 'nothing (all down)'}",
        "killed": killed,
    }


def dr_consensus(run_dir: str, check: bool = False) -> Result:
    """dr's own etcd (the consensus of the dr standby clusters) answers; start it if it does not."""
    runtime = _runtime(run_dir)
    etcd = runtime.component(render.ETCD_DR_NAME)
    if runtime.ready_status(etcd, timeout_s=2.0) == 200:
        return {"changed": False, "msg": f"{etcd.name} has quorum (a single member at dr)"}
    if check:
        return {"changed": True, "msg": f"would start {etcd.name}"}
    runtime.start(component=etcd.name)
    wait_until(
        f"{etcd.name} healthy",
        lambda: runtime.ready_status(etcd, timeout_s=2.0) == 200,
        PROMOTE_TIMEOUT_S,
        "read its log",
    )
    return {"changed": True, "msg": f"{etcd.name} started and healthy"}


def _dr_member(runtime: LocalRuntime, cell: int) -> dict[str, Any] | None:
    return next(
        (
            m
            for m in runtime.cluster_members(cell, dr=True)
            if m.get("name") == render.pg_name(cell, render.DR_SITE)
        ),
        None,
    )


def promote_dr(run_dir: str, cell: int, check: bool = False) -> Result:
    """Promote ``cell``'s dr copy: remove ``standby_cluster`` from its cluster's dynamic
    configuration, and wait until it runs as a writable primary. Refuses while a center still
    holds a writable primary of the cell: fence both centers first."""
    runtime = _runtime(run_dir)
    _check_cell(runtime, cell)
    member = _dr_member(runtime, cell)
    if member and member.get("role") == "leader" and member.get("state") == "running":
        return {"changed": False, "msg": f"cell {cell}'s dr copy is the primary already", "seconds": 0.0}
    unfenced = [s for s in CENTERS if s not in runtime.fenced_sites]
    if check:
        after = f" once {', '.join(unfenced)} are fenced" if unfenced else ""
        return {"changed": True, "msg": f"would promote cell {cell}'s dr copy{after}", "seconds": 0.0}
    if unfenced:
        raise StepError(
            f"cell {cell}: {', '.join(unfenced)} not fenced; promoting dr beside a live center could give "
            "the cell two primaries. Fence the centers first (the activate-dr runbook does)"
        )
    if member is None:
        raise StepError(f"cell {cell}'s dr copy does not answer; start pg-cell{cell}-dr and run again")
    started = time.monotonic()
    api = render.LocalEndpoints(runtime.topology).patroni_api_url(cell, render.DR_SITE)
    status, text = _send("PATCH", f"{api}/config", {"standby_cluster": None}, ca_file=runtime.root_cert())
    if status != 200:
        raise StepError(f"Patroni refused to change cell {cell}'s dr configuration: {status} {text.strip()}")

    def promoted() -> bool:
        member = _dr_member(runtime, cell)
        return bool(member and member.get("role") == "leader" and member.get("state") == "running")

    wait_until(
        f"cell {cell}'s dr copy running as a primary",
        promoted,
        PROMOTE_TIMEOUT_S,
        f"read the log of pg-cell{cell}-dr",
    )
    seconds = round(time.monotonic() - started, 2)
    return {"changed": True, "msg": f"cell {cell}'s dr copy promoted in {seconds} s", "seconds": seconds}


def serve_from_dr(run_dir: str, check: bool = False) -> Result:
    """Start dr's app server and gateway and wait until the entry sends every cell there."""
    runtime = _runtime(run_dir)
    idle = [c for c in runtime.components if c.on_dr_activation and not runtime.running(c)]
    if runtime.dr_active and not idle and _entry_serves_from_dr(runtime):
        return {"changed": False, "msg": "dr serves every cell through the entry already"}
    if check:
        return {
            "changed": True,
            "msg": f"would start {', '.join(c.name for c in idle) or 'nothing'} and send the entry to dr",
        }
    started = time.monotonic()
    runtime.set_mode(dr_active=True)
    runtime.start(site=render.DR_SITE)  # the idle app server and gateway, now expected
    wait_until(
        "the entry reaching every cell through dr's gateway",
        lambda: _entry_serves_from_dr(runtime),
        SERVE_TIMEOUT_S,
        f"read {runtime.run_dir / 'logs'}/app-dr.log and gateway-dr.log",
    )
    seconds = round(time.monotonic() - started, 2)
    return {
        "changed": True,
        "msg": f"dr's app server and gateway serve every cell through the entry after {seconds} s",
    }


def _entry_serves_from_dr(runtime: LocalRuntime) -> bool:
    gateway = render.LocalEndpoints(runtime.topology).gateway_url(render.DR_SITE)
    status, body = http_json(runtime.topology.entry_url + "/readyz", timeout_s=1.0)
    if status != 200 or not isinstance(body, dict):
        return False
    cells = body.get("cells") or {}
    return all(
        gateway in (cells.get(str(cell)) or {}).get("upstreams", []) for cell in runtime.topology.cell_numbers
    )


def _acknowledged(ack_log: str) -> list[dict[str, Any]]:
    from watertight_load.ack_log import ack_log_files, read_ack_log

    path = Path(ack_log)
    if not ack_log_files(path):
        raise StepError(
            f"ack log {path} does not exist (nor its {path.name}.worker-* files); pass the ack log "
            "of the load that ran (ack_log=PATH)"
        )
    try:
        return [e for e in read_ack_log(path) if e.get("idempotency_key")]
    except ValueError as error:
        raise StepError(f"ack log {path}: {error}") from None


def ack_log_window(run_dir: str, ack_log: str) -> Result:
    """What a count of the RPO must read from each cell's ledger, for a target this process cannot
    query itself (kubernetes: psql runs in the dr member's pod): the cells the ack log names and
    the time from which their idempotency records must be listed (the first acknowledgement, less
    ACK_CLOCK_MARGIN_S for the skew between the load's clock and the database's)."""
    acked = _acknowledged(ack_log)
    times = sorted(str(entry["time"]) for entry in acked if entry.get("time"))
    since = None  # nothing acknowledged: nothing to list
    if len(times) < len(acked):
        since = "-infinity"  # an entry without a time: every key must be listed
    elif times:
        try:
            first = datetime.fromisoformat(times[0].replace("Z", "+00:00"))
        except ValueError:
            raise StepError(f"ack log {ack_log}: time {times[0]!r} is not an ISO 8601 time") from None
        if first.tzinfo is None:
            raise StepError(f"ack log {ack_log}: time {times[0]!r} has no time zone")
        since = (first - timedelta(seconds=ACK_CLOCK_MARGIN_S)).astimezone(UTC).isoformat()
    cells = sorted({int(entry["cell"]) for entry in acked})
    return {
        "changed": False,
        "msg": f"{len(acked)} acknowledged transactions in cells {cells or 'none'}, the first at {times[0] if times else 'no time'}",
        "acknowledged": len(acked),
        "cells": cells,
        "since": since,
    }


def rpo_of_ack_log(run_dir: str, ack_log: str, found_keys: list[str] | None = None) -> Result:
    """Acknowledged transactions of an ack log that the cells' primaries no longer hold: looked up
    in the local topology's ledgers, or among ``found_keys`` (the idempotency keys the cells' ledgers
    hold since ``ack_log_window``'s time, as the kubernetes target lists them)."""
    from watertight import drill, verdicts

    acked = _acknowledged(ack_log)
    found = set(found_keys) if found_keys is not None else drill.found_in_ledgers(_runtime(run_dir), acked)
    result = verdicts.rpo(acked, found)
    return {
        "changed": False,
        "msg": f"{result['missing']} of {result['acknowledged']} acknowledged transactions are missing",
        "rpo": result,
    }


STEPS = {
    "facts": facts,
    "switchover_cell": switchover_cell,
    "drain_cell": drain_cell,
    "fence_site": fence_site,
    "dr_consensus": dr_consensus,
    "promote_dr": promote_dr,
    "serve_from_dr": serve_from_dr,
    "ack_log_window": ack_log_window,
    "rpo_of_ack_log": rpo_of_ack_log,
}
