"""The runbooks' tasks as Ansible sees them: a task of runbooks/kubernetes/ by name, and a string
templated by Ansible's own templating (its filters, native types), so tests can evaluate the
expressions the kubernetes target computes without a cluster."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

KUBERNETES_TASKS = Path(__file__).resolve().parents[1] / "runbooks" / "kubernetes"


def ansible_template(text: Any, variables: dict[str, Any]) -> Any:
    """``text`` as Ansible templates a task's argument (a mapping or list: each string in it)."""
    from ansible.parsing.dataloader import DataLoader
    from ansible.template import Templar, trust_as_template

    def trusted(value: Any) -> Any:
        if isinstance(value, str):
            return trust_as_template(value)
        if isinstance(value, dict):
            return {key: trusted(item) for key, item in value.items()}
        if isinstance(value, list):
            return [trusted(item) for item in value]
        return value

    return Templar(loader=DataLoader(), variables=variables).template(trusted(text))


def ansible_condition(conditions: list[str] | str, variables: dict[str, Any]) -> bool:
    """A task's ``when`` (every condition must hold)."""
    listed = [conditions] if isinstance(conditions, str) else conditions
    return all(bool(ansible_template("{{ " + condition + " }}", variables)) for condition in listed)


def top_level_tasks(runbook: str) -> list[dict[str, Any]]:
    """The top-level tasks of runbooks/kubernetes/RUNBOOK.yml, in order."""
    tasks: list[dict[str, Any]] = yaml.safe_load((KUBERNETES_TASKS / f"{runbook}.yml").read_text())
    return tasks


def kubernetes_task(runbook: str, name_starts: str) -> dict[str, Any]:
    """The one top-level task of runbooks/kubernetes/RUNBOOK.yml whose name starts so."""
    (task,) = [task for task in top_level_tasks(runbook) if task["name"].startswith(name_starts)]
    return task
