"""infra/snapshots/<stack>.json is what a reviewer reads to see the plan of each stack: it must be
what the program declares now (regenerate with `.venv/bin/python -m watertight_infra.harness`)."""

from __future__ import annotations

import json

import pytest

from watertight_infra import harness

STACKS = harness.stack_names()


@pytest.mark.parametrize("stack", STACKS)
def test_the_committed_snapshot_is_what_the_program_declares_now(stack: str) -> None:
    path = harness.SNAPSHOT_DIR / f"{stack}.json"
    assert path.exists(), f"no {path}: run .venv/bin/python -m watertight_infra.harness"
    fresh = harness.snapshot_text(harness.run(stack))
    assert path.read_text(encoding="utf-8") == fresh, (
        f"{path} is stale: run .venv/bin/python -m watertight_infra.harness and review the diff"
    )


@pytest.mark.parametrize("stack", STACKS)
def test_the_snapshot_states_the_plan_and_hides_the_secrets(stack: str) -> None:
    text = (harness.SNAPSHOT_DIR / f"{stack}.json").read_text(encoding="utf-8")
    snapshot = json.loads(text)
    plan = snapshot["outputs"]["plan"]
    assert plan["pods"]["total"] > 0 and plan["cores_total"] > 0
    assert snapshot["kubernetes_objects_by_kind"]["StatefulSet"] == 4 + 3 * plan["cells"]
    for value in harness.MOCK_SECRETS.values():
        assert value not in text
    secrets = [r for r in snapshot["resources"] if r["type"] == "kubernetes:core/v1:Secret"]
    assert secrets and all(r["inputs"]["stringData"] == harness.SECRET_SHOWN for r in secrets)


def test_the_snapshot_is_stable_between_runs() -> None:
    assert harness.snapshot_text(harness.run(STACKS[0])) == harness.snapshot_text(harness.run(STACKS[0]))
