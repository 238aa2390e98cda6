"""What every target computes the same way, from the Target interface alone.

Owns: views built only from ``watertight.runtime.target.Target`` calls (a cell's leader, its
members' endpoints, the superuser's password), so local processes and pods answer alike.
Never: import a particular target, or change anything.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from watertight import pg

if TYPE_CHECKING:
    from watertight.runtime.target import Target

PG_CONNECT_TIMEOUT_S = 2  # libpq's minimum

IN_FLIGHT_SQL = "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND state <> 'idle'"


def writers_in_flight(target: Target, site: str) -> int:
    """Group commits of ``site``'s app server running now: its writer sessions not idle on the
    cells' leaders."""
    password = target.superuser_password()
    busy = 0
    for cell in target.topology.cell_numbers:
        try:
            leader = target.leader_site(cell)
            member = next(m for m in target.members(cell) if m.site == leader)
            with pg.connect_superuser(
                member.postgres_host, member.postgres_port, password, PG_CONNECT_TIMEOUT_S
            ) as conn:
                row = conn.execute(IN_FLIGHT_SQL, (f"cardcore-{site}-cell{cell}-writer",)).fetchone()
                busy += int(row[0]) if row else 0
        except Exception:  # a cell without a leader has nothing in flight to catch
            continue
    return busy
