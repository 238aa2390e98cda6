"""The drill's refusals before anything starts. The default drill end to end (`make drill`'s
experiment, its report as CONTRACT.md names it) runs in tests/test_drill_controls.py, on that
module's topology: a topology of its own and a second drill of the same experiment cost 3-4
minutes of the suite."""

from __future__ import annotations

from pathlib import Path

import pytest

from watertight import drill


def test_an_unknown_experiment_fails_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="no experiment 'site-loss-mars'"):
        drill.run(["site-loss-mars"], 10, 10, tmp_path, tmp_path / "run", print)
    assert not (tmp_path / "run").exists()
