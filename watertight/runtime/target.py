"""The fault-control interface every target implements (local processes now, Kubernetes later).

Chaos actions, the drill and runbooks call these with topology names (site, cell, component),
never with PIDs or pod names, so nothing above this layer branches on where the topology runs.
"""

from __future__ import annotations

from typing import Protocol


class Target(Protocol):
    def pids(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[int]:
        """The processes (or pods) the selection names, as far as the target can tell."""
        ...

    def kill(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """SIGKILL (the machine is gone). Returns the components hit."""
        ...

    def stop(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Graceful stop."""
        ...

    def freeze(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """SIGSTOP: alive but silent (a gray failure)."""
        ...

    def thaw(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """SIGCONT: undo freeze."""
        ...

    def restart(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        """Start again what the selection names (stopping it first if it runs)."""
        ...
