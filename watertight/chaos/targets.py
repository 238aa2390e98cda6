"""Where a chaos activity acts: the run directory of a local topology, or Kubernetes clusters.

Owns: turning the ``target`` and ``run_dir`` arguments every activity takes into a runtime, the
same way each time (explicit argument, else $WATERTIGHT_RUN_DIR, else run/ of the repository).
Never: keep anything between calls; every activity finds its topology again.
"""

from __future__ import annotations

import os
from pathlib import Path

from watertight.chaos import network
from watertight.runtime.local import RUN_DIR_DEFAULT, LocalRuntime

TARGETS = ("local", "kubernetes")
RUN_DIR_ENV = "WATERTIGHT_RUN_DIR"
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


def site_network(runtime: LocalRuntime) -> network.SiteNetwork:
    """The sites' addresses and the PIDs of each site's processes, for network faults."""
    return network.SiteNetwork(
        runtime.run_dir,
        {name: site.address for name, site in runtime.topology.sites.items()},
        {name: runtime.pids(site=name) for name in runtime.topology.sites},
    )
