"""Where a chaos activity acts: the run directory of a local topology, or Kubernetes clusters.

Owns: turning the ``target``, ``run_dir`` and ``configuration`` arguments every activity takes
into a runtime of ``watertight.runtime.target.Target``, the same way each time (the run directory:
explicit argument, else $WATERTIGHT_RUN_DIR, else run/ of the repository; the clusters: the
configuration's ``kube_contexts``..., else the local cluster of ``watertight cluster``). This is
the one place that knows which runtime implements which target.
Never: keep anything between calls; every activity finds its topology again.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watertight.runtime.local import RUN_DIR_DEFAULT, LocalRuntime
from watertight.runtime.target import Target

TARGETS = ("local", "kubernetes")
RUN_DIR_ENV = "WATERTIGHT_RUN_DIR"
TARGET_ENV = "WATERTIGHT_TARGET"
LOCAL = "local"
KUBERNETES = "kubernetes"


class TargetError(ValueError):
    """An activity was asked for a target or a name that does not exist; the message says which exist."""


def check_target(target: str) -> str:
    if target not in TARGETS:
        raise TargetError(f"target must be one of {', '.join(TARGETS)}; got {target!r}")
    return target


def run_dir_of(run_dir: str | None) -> Path:
    """The run directory: the argument when given (an empty string counts as not given, so an
    experiment can pass an unset configuration key), else $WATERTIGHT_RUN_DIR, else run/."""
    if run_dir:
        return Path(run_dir)
    from_env = os.environ.get(RUN_DIR_ENV)
    return Path(from_env) if from_env else RUN_DIR_DEFAULT


def local_runtime(run_dir: str | None) -> LocalRuntime:
    """The topology that runs from the run directory (raises, naming the directory, when none)."""
    return LocalRuntime(run_dir_of(run_dir))


def runtime(
    target: str = LOCAL, run_dir: str | None = None, configuration: Mapping[str, Any] | None = None
) -> Target:
    """The runtime of ``target``: the local topology of the run directory, or the Kubernetes
    clusters the configuration names (the local cluster when it names none)."""
    if check_target(target) == KUBERNETES:
        from watertight.runtime.kubernetes import KubernetesRuntime

        return KubernetesRuntime.from_configuration(configuration, run_dir_of(run_dir))
    return local_runtime(run_dir)
