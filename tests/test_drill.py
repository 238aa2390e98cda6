"""The drill's refusals before anything starts. The default drill end to end (`make drill`'s
experiment, its report as CONTRACT.md names it) runs in tests/test_drill_controls.py, on that
module's topology: a topology of its own and a second drill of the same experiment cost 3-4
minutes of the suite."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from watertight import drill


def test_an_unknown_experiment_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no experiment 'site-loss-mars'"):
        drill.run(["site-loss-mars"], 10, 10, tmp_path, tmp_path / "run", print)
    assert not (tmp_path / "run").exists()


def test_a_failed_action_after_the_fault_is_not_reported_as_a_fault_never_injected() -> None:
    def run(name: str, status: str) -> dict[str, Any]:
        return {"activity": {"type": "action", "name": name}, "status": status, "exception": ["boom\n"]}

    later_failed = {
        "run": [run("kill-the-prod-site", "succeeded"), run("sample-writable-primaries", "failed")]
    }
    fault_failed = {
        "run": [run("kill-the-prod-site", "failed"), run("sample-writable-primaries", "succeeded")]
    }
    assert not drill.fault_action_failed(later_failed)
    assert drill.failed_actions(later_failed) == ["sample-writable-primaries: boom"]
    assert drill.fault_action_failed(fault_failed)
    assert not drill.fault_action_failed({})
