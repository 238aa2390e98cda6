"""Run a playbook of runbooks/ through ansible-runner against the local target, print each step
with its duration as it ends, and return a machine-readable summary from ansible-runner's events
and artifacts.

Owns: the list of runbooks, the extra variables (``KEY=VALUE``, checked before anything runs),
the private data directory of each run (``<run dir>/runbooks/<time>-<name>/``, where ansible-runner
keeps its artifacts and where ``summary.json`` goes), and the summary: rc, status, step timings.
Never: run a playbook that is not in runbooks/, or run without a bound (``RUNBOOK_TIMEOUT_S``).
"""

from __future__ import annotations

import datetime
import json
import os
import re
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

from watertight.runbooks import kube
from watertight.runtime.local import RUN_DIR_DEFAULT, LocalRuntime, RuntimeError_

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RUNBOOKS_DIR = REPO_ROOT / "runbooks"
RUNBOOK_TIMEOUT_S = 900
_EXTRA_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED = {
    "watertight_run_dir": "it is the run directory",
    "run_dir": "it is the run directory",
    "watertight_target": "choose the target with --target",
}
_DONE_EVENTS = {
    "runner_on_ok": "ok",
    "runner_on_failed": "failed",
    "runner_on_skipped": "skipped",
    "runner_on_unreachable": "unreachable",
}

Progress = Callable[[str], None]


class RunbookError(ValueError):
    """The runbook or its arguments are wrong; nothing ran. The message says what is wrong."""


def names() -> list[str]:
    return sorted(path.stem for path in RUNBOOKS_DIR.glob("*.yml"))


def parse_extras(pairs: list[str]) -> dict[str, str]:
    """``KEY=VALUE`` strings into extra variables; a malformed or reserved one is an error."""
    extras: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not _EXTRA_KEY.match(key):
            raise RunbookError(f"--extra {pair!r}: expected KEY=VALUE with KEY a variable name")
        if key in _RESERVED:
            raise RunbookError(f"--extra {key}: set by watertight itself ({_RESERVED[key]})")
        extras[key] = value
    return extras


def _envvars(private: Path) -> dict[str, str]:
    collections = kube.collection_path()
    return {
        # kubernetes.core for the kubernetes target, where `make venv` put it, then Ansible's own paths
        **(
            {
                "ANSIBLE_COLLECTIONS_PATH": f"{collections}:~/.ansible/collections:/usr/share/ansible/collections"
            }
            if collections
            else {}
        ),
        # our modules (watertight_step), also for a playbook outside runbooks/ (the syntax check's)
        "ANSIBLE_LIBRARY": str(RUNBOOKS_DIR / "library"),
        "LC_ALL": "C.UTF-8",
        "LANG": "C.UTF-8",
        "ANSIBLE_NOCOLOR": "1",
        "ANSIBLE_RETRY_FILES_ENABLED": "0",
        "ANSIBLE_LOCAL_TEMP": str(private / "tmp"),
        "ANSIBLE_HOME": str(private / "ansible"),
        # ansible-playbook is beside the interpreter that runs watertight (the virtual environment)
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _inventory() -> dict[str, Any]:
    local = {"ansible_connection": "local", "ansible_python_interpreter": sys.executable}
    return {"all": {"hosts": {"localhost": local}}}


def syntax_check(name: str) -> tuple[int, str]:
    """``ansible-playbook --syntax-check`` of one runbook and of its kubernetes task file (included
    only when the target is kubernetes, so checked through a playbook that imports it; its
    kubernetes.core modules must resolve): (rc, what it printed)."""
    import ansible_runner

    if name not in names():
        raise RunbookError(f"no runbook named {name!r}; runbooks are {', '.join(names())}")
    outputs, rc = [], 0
    with tempfile.TemporaryDirectory(prefix="watertight-syntax-") as private:
        playbooks = [f"{name}.yml"]
        tasks = RUNBOOKS_DIR / "kubernetes" / f"{name}.yml"
        if tasks.exists():
            wrapper = Path(private) / "project" / f"{name}-kubernetes.yml"
            wrapper.parent.mkdir()
            wrapper.write_text(
                f"- hosts: localhost\n  gather_facts: false\n  tasks:\n"
                f"    - ansible.builtin.import_tasks: {tasks}\n"
            )
            playbooks.append(str(wrapper))
        for playbook in playbooks:
            runner = ansible_runner.run(
                private_data_dir=private,
                project_dir=str(RUNBOOKS_DIR),
                playbook=playbook,
                inventory=_inventory(),
                extravars={"watertight_run_dir": private},
                cmdline="--syntax-check",
                envvars=_envvars(Path(private)),
                quiet=True,
                timeout=RUNBOOK_TIMEOUT_S,
            )
            rc = rc or int(runner.rc)
            outputs.append(f"{playbook}:\n{runner.stdout.read()}")
    return rc, "\n".join(outputs)


def _seconds(event_data: Mapping[str, Any]) -> float | None:
    duration = event_data.get("duration")
    if isinstance(duration, int | float):
        return round(float(duration), 2)
    try:
        start = datetime.datetime.fromisoformat(str(event_data["start"]))
        end = datetime.datetime.fromisoformat(str(event_data["end"]))
    except (KeyError, ValueError):
        return None
    return round((end - start).total_seconds(), 2)


def _message(result: Mapping[str, Any]) -> str:
    if isinstance(result.get("results"), list):
        parts = [str(item.get("msg", "")) for item in result["results"] if isinstance(item, dict)]
        return "; ".join(p for p in parts if p)
    return str(result.get("msg", ""))


def step_of(event: Mapping[str, Any]) -> dict[str, Any] | None:
    """One finished task of an ansible-runner event, or None for other events."""
    status = _DONE_EVENTS.get(str(event.get("event")))
    if status is None:
        return None
    data = event.get("event_data") or {}
    result = data.get("res") or {}
    return {
        "task": data.get("task", ""),
        "status": status,
        "changed": bool(result.get("changed", False)),
        "seconds": _seconds(data),
        "msg": _message(result),
        "result": {k: v for k, v in result.items() if not k.startswith("_") and k not in ("invocation",)},
    }


def _kubernetes_ready(target: kube.KubeTarget) -> dict[str, Any]:
    """The kubernetes target's extra variables, once its collection and client are there."""
    try:
        return target.runbook_vars()
    except kube.KubeTargetError as error:
        raise RunbookError(str(error)) from None


class RunbookTarget(Protocol):
    def runbook_vars(self) -> dict[str, Any]: ...


def run(
    name: str,
    extras: Mapping[str, str] | None = None,
    run_dir: Path | None = None,
    check: bool = False,
    progress: Progress = print,
    target: RunbookTarget | None = None,
) -> dict[str, Any]:
    """Run runbook ``name``; returns the summary (also written to ``summary.json`` beside the
    artifacts). ``check`` runs it in Ansible's check mode: every step says what it would do.
    ``target`` None is the local topology of ``run_dir``; otherwise any target (a runtime of
    ``watertight.runtime.target``, or a KubeTarget: the three clusters) gives the runbook its
    variables, and the artifacts go under ``run_dir`` (or the runtime's own)."""
    import ansible_runner

    if name not in names():
        raise RunbookError(f"no runbook named {name!r}; runbooks are {', '.join(names())}")
    if target is None:
        try:
            target = LocalRuntime(run_dir) if run_dir is not None else LocalRuntime()
        except RuntimeError_ as error:
            raise RunbookError(str(error)) from None
    try:
        target_vars = target.runbook_vars()
    except (kube.KubeTargetError, RuntimeError) as error:
        raise RunbookError(str(error)) from None
    own_dir = getattr(target, "run_dir", None)
    base = Path(own_dir) if own_dir is not None else (run_dir or RUN_DIR_DEFAULT).resolve()
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S%fZ")
    private = base / "runbooks" / f"{stamp}-{name}"
    private.mkdir(parents=True)
    steps: list[dict[str, Any]] = []

    def on_event(event: dict[str, Any]) -> bool:
        step = step_of(event)
        if step is not None:
            steps.append(step)
            took = f"{step['seconds']:.1f} s" if step["seconds"] is not None else "-"
            flag = " changed" if step["changed"] else ""
            progress(f"  {step['status']:<8}{took:>9}  {step['task']}{flag}: {step['msg']}".rstrip(": "))
        return True  # keep the event in the artifacts too

    progress(f"runbook {name}{' (check mode: nothing changes)' if check else ''}: {private}")
    started = datetime.datetime.now(datetime.UTC)
    runner = ansible_runner.run(
        private_data_dir=str(private),
        project_dir=str(RUNBOOKS_DIR),
        playbook=f"{name}.yml",
        inventory=_inventory(),
        extravars={**(extras or {}), **target_vars, "watertight_run_dir": str(base)},
        cmdline="--check" if check else None,
        envvars={
            **_envvars(private),
            # the kubeconfig of the runtime's clusters, for kubernetes.core's client
            **(
                {"K8S_AUTH_KUBECONFIG": target_vars["kube_kubeconfig"]}
                if "kube_kubeconfig" in target_vars
                else {}
            ),
        },
        event_handler=on_event,
        quiet=True,
        timeout=RUNBOOK_TIMEOUT_S,
    )
    seconds = round((datetime.datetime.now(datetime.UTC) - started).total_seconds(), 2)
    failed = [s for s in steps if s["status"] in ("failed", "unreachable")]
    summary = {
        "runbook": name,
        "target": target_vars["watertight_target"],
        "check": check,
        "extras": dict(extras or {}),
        "rc": runner.rc,
        "status": runner.status,
        "seconds": seconds,
        "changed": sum(1 for s in steps if s["changed"]),
        "steps": steps,
        "failed_step": failed[0]["task"] if failed else None,
        "artifacts": str(Path(runner.config.artifact_dir)),
    }
    if runner.status == "timeout":
        summary["error"] = f"the runbook did not finish within {RUNBOOK_TIMEOUT_S} s"
    elif failed:
        summary["error"] = failed[0]["msg"]
    elif runner.rc != 0:
        summary["error"] = f"ansible-playbook exited {runner.rc}; read {summary['artifacts']}/stdout"
    (private / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    verdict = "ok" if runner.rc == 0 else f"FAILED: {summary.get('error')}"
    progress(f"runbook {name}: {runner.status} in {seconds:.1f} s, {summary['changed']} changed; {verdict}")
    return summary
