"""Which member's view of a Patroni cluster the runtime believes when they disagree: the case
seen in a partition, where the cut-off member still names itself leader from a stale read."""

from __future__ import annotations

from typing import Any

from watertight.runtime.local import choose_view

PROD = {"name": "pg-cell2-prod", "api_url": "http://127.0.31.1:20802/patroni"}
SAMECITY = {"name": "pg-cell2-samecity", "api_url": "http://127.0.32.1:20802/patroni"}


def member(base: dict[str, Any], role: str, timeline: int, **more: Any) -> dict[str, Any]:
    return {
        **base,
        "role": role,
        "state": "running" if role == "leader" else "streaming",
        "timeline": timeline,
        **more,
    }


# what the cut-off samecity member answered: itself leader on timeline 1 (it had demoted itself)
STALE = [member(PROD, "sync_standby", 1, lag=0), member(SAMECITY, "leader", 1)]
# what the prod member answered from the quorum side: it leads, on timeline 2
FRESH = [member(PROD, "leader", 2)]


def test_agreeing_views_are_taken_as_they_are() -> None:
    asked: list[str] = []
    assert choose_view([STALE, list(STALE)], lambda m: asked.append(m["name"]) or False) == STALE
    assert asked == []  # no need to ask anyone


def test_a_stale_leader_that_is_no_longer_primary_is_not_believed() -> None:
    primaries = {"pg-cell2-prod"}
    assert choose_view([STALE, FRESH], lambda m: m["name"] in primaries) == FRESH
    assert choose_view([FRESH, STALE], lambda m: m["name"] in primaries) == FRESH


def test_two_claimed_primaries_the_higher_timeline_wins() -> None:
    assert choose_view([STALE, FRESH], lambda m: True) == FRESH


def test_no_leader_primary_prefers_the_view_without_a_leader() -> None:
    electing = [member(PROD, "replica", 1)]
    assert choose_view([STALE, electing], lambda m: False) == electing
    assert choose_view([], lambda m: True) == []
