"""What every target computes the same way, from the Target interface alone.

Owns: views built only from ``watertight.runtime.target.Target`` calls (a cell's leader, its
members' endpoints, the superuser's password), so local processes and pods answer alike.
Never: import a particular target, or change anything.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from watertight import pg

if TYPE_CHECKING:
    from watertight.runtime.target import Target

PG_CONNECT_TIMEOUT_S = 2  # libpq's minimum

IN_FLIGHT_SQL = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'"


def writers_in_flight(target: Target, site: str) -> int:
    """Group commits of ``site``'s app server running now: its writer sessions not idle on the
    cells' leaders."""
    password = target.superuser_password()
    root_cert = target.root_cert()
    busy = 0
    for cell in target.topology.cell_numbers:
        try:
            leader = target.leader_site(cell)
            member = next(m for m in target.members(cell) if m.site == leader)
            with pg.connect_superuser(
                member.postgres_host, member.postgres_port, password, PG_CONNECT_TIMEOUT_S, root_cert
            ) as conn:
                row = conn.execute(IN_FLIGHT_SQL, (f"cardcore-{site}-cell{cell}-writer",)).fetchone()
                busy += int(row[0]) if row else 0
        except Exception:  # a cell without a leader has nothing in flight to catch
            continue
    return busy


def cell_view_of(
    members: list[dict[str, Any]],
    dr_members: list[dict[str, Any]],
    site_of_member: Callable[[Mapping[str, Any]], str | None],
) -> dict[str, Any]:
    """A cell's view from its Patroni cluster's member list (the centers' members) and its dr
    standby cluster's: who leads, the streaming sync standby, the dr copy, every member."""
    leader = next((m for m in members if m.get("role") == "leader" and m.get("state") == "running"), None)
    sync = next(
        (m for m in members if m.get("role") == "sync_standby" and m.get("state") == "streaming"), None
    )
    dr = next((m for m in dr_members if m.get("role") in ("standby_leader", "leader")), None)
    return {
        "leader_site": site_of_member(leader) if leader else None,
        "sync_standby": site_of_member(sync) if sync else None,
        "timeline": leader.get("timeline") if leader else None,
        "replication_lag_bytes": sync.get("lag") if sync else None,
        "dr_copy": {
            "role": dr.get("role"),
            "state": dr.get("state"),
            "lag": dr.get("lag"),
            "timeline": dr.get("timeline"),
        }
        if dr
        else None,
        "members": [
            {
                "name": m.get("name"),
                "site": site_of_member(m),
                "role": m.get("role"),
                "state": m.get("state"),
                "lag": m.get("lag"),
                "timeline": m.get("timeline"),
            }
            for m in [*members, *dr_members]
        ],
    }


def cell_not_steady(cell: int, view: Mapping[str, Any]) -> str | None:
    """Why cell ``cell`` (its ``cell_view_of``) is not steady, naming what each center member says
    (a member stuck after a failed rewind or a start that failed is then plain), or None."""
    if view["leader_site"] is not None and view["sync_standby"] is not None:
        return None
    what = "has no leader" if view["leader_site"] is None else "has no streaming sync standby"
    members = ", ".join(
        f"{m['name']} {m.get('role') or '?'} {m.get('state') or '?'}"
        + (f" timeline {m['timeline']}" if m.get("timeline") is not None else "")
        for m in view["members"]
        if m.get("site") != "dr"
    )
    return f"cell {cell} {what} (members: {members or 'none answer'})"
