"""hold_fault: the fault stays in force at least min_s, then until the entry has answered ready
for every cell served_s in a row, at most max_s; bad bounds fail before anything waits. The entry
is scripted here; the drills hold real faults with it (tests/test_drill_controls.py and others)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from watertight import drill
from watertight.chaos import actions, probes


def scripted(monkeypatch: pytest.MonkeyPatch, ready: Callable[[float], bool]) -> list[float]:
    """The entry's answer as a function of seconds since the hold began; returns the asked times."""
    asked: list[float] = []
    started = time.monotonic()

    def entry_answers(all_cells: bool, timeout_s: float, *_: Any) -> bool:
        assert all_cells and timeout_s <= 2.0
        asked.append(time.monotonic() - started)
        return ready(asked[-1])

    monkeypatch.setattr(probes, "entry_answers", entry_answers)
    monkeypatch.setattr(actions, "HOLD_POLL_S", 0.05)
    return asked


def test_a_recovered_system_is_held_min_s_then_released(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, lambda _: True)
    result = actions.hold_fault(min_s=0.6, max_s=5.0, served_s=0.2)
    assert 0.6 <= result["held_s"] < 1.5, result
    assert result["ended"] == "every cell served for 0.2 s"


def test_the_hold_waits_for_served_s_in_a_row_after_the_last_unready_answer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # ready, then not (a cell is lost), then ready from 1.0 s on: released at 1.0 + served_s
    scripted(monkeypatch, lambda t: t < 0.2 or t >= 1.0)
    result = actions.hold_fault(min_s=0.1, max_s=5.0, served_s=0.5)
    assert 1.5 <= result["held_s"] < 2.3, result


def test_a_system_that_never_recovers_is_held_max_s(monkeypatch: pytest.MonkeyPatch) -> None:
    scripted(monkeypatch, lambda _: False)
    result = actions.hold_fault(min_s=0.1, max_s=0.8, served_s=0.2)
    assert 0.8 <= result["held_s"] < 1.3, result
    assert result["ended"].startswith("max_s")


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"min_s": -1}, "min_s=-1"),
        ({"max_s": "40"}, "max_s='40'"),
        ({"served_s": 10_000}, "served_s=10000"),
        ({"min_s": 30, "max_s": 20}, "min_s=30 is more than max_s=20"),
    ],
)
def test_bad_bounds_fail_before_anything_waits(
    monkeypatch: pytest.MonkeyPatch, arguments: dict[str, Any], named: str
) -> None:
    asked = scripted(monkeypatch, lambda _: True)
    with pytest.raises(ValueError, match=named):
        actions.hold_fault(**arguments)
    assert asked == []


def test_a_failed_hold_is_not_reported_as_a_fault_never_injected() -> None:
    def run(name: str, status: str) -> dict[str, Any]:
        return {"activity": {"type": "action", "name": name}, "status": status, "exception": ["boom\n"]}

    hold_failed = {"run": [run("kill-the-prod-site", "succeeded"), run("hold-the-fault", "failed")]}
    fault_failed = {"run": [run("kill-the-prod-site", "failed"), run("hold-the-fault", "succeeded")]}
    assert not drill.fault_action_failed(hold_failed)
    assert drill.failed_actions(hold_failed) == ["hold-the-fault: boom"]
    assert drill.fault_action_failed(fault_failed)
    assert not drill.fault_action_failed({})
