"""The cell view and the not-steady reason both targets share (watertight.runtime.common)."""

from __future__ import annotations

from typing import Any

from watertight.runtime.common import cell_not_steady, cell_view_of


def member(name: str, role: str, state: str, timeline: int | None = 2) -> dict[str, Any]:
    return {"name": name, "role": role, "state": state, "timeline": timeline, "lag": 0}


def site_of(m: Any) -> str:
    return str(m["name"]).rsplit("-", 1)[-1]


def test_a_steady_cell_has_no_reason() -> None:
    view = cell_view_of(
        [
            member("pg-cell1-prod", "leader", "running"),
            member("pg-cell1-samecity", "sync_standby", "streaming"),
        ],
        [member("pg-cell1-dr", "standby_leader", "streaming")],
        site_of,
    )
    assert view["leader_site"] == "prod" and view["sync_standby"] == "samecity"
    assert cell_not_steady(1, view) is None


def test_the_reason_names_what_each_center_member_says() -> None:
    """A member stuck after a failed pg_rewind shows as stopped on its old timeline: the reason
    says so instead of leaving the user to guess which member and why."""
    view = cell_view_of(
        [
            member("pg-cell2-prod", "leader", "running", 3),
            member("pg-cell2-samecity", "replica", "stopped", 2),
        ],
        [member("pg-cell2-dr", "standby_leader", "streaming")],
        site_of,
    )
    reason = cell_not_steady(2, view)
    assert reason == (
        "cell 2 has no streaming sync standby (members: pg-cell2-prod leader running timeline 3, "
        "pg-cell2-samecity replica stopped timeline 2)"
    )


def test_without_a_leader_or_any_member_answering() -> None:
    view = cell_view_of([], [], site_of)
    assert cell_not_steady(1, view) == "cell 1 has no leader (members: none answer)"
    lone = cell_view_of([member("pg-cell1-samecity", "replica", "streaming", None)], [], site_of)
    assert cell_not_steady(1, lone) == "cell 1 has no leader (members: pg-cell1-samecity replica streaming)"
