"""What an experiment breaks, as the drill and the safeguards need to know it: the kind of fault,
its site or cell, which cells it must interrupt (judged on RTO) and which it must not touch
(judged on isolation), and what their recovery is measured from.

Owns: ``Fault`` and the catalogue's faults (``FAULTS``, for experiment files that do not say
what they break in ``configuration.watertight_fault``). Never: read a file or ask the topology;
the callers pass who leads each cell.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# kinds of fault no standby can take over from: the cell serves again only once the rollback heals it
HEALED_ONLY_BY_ROLLBACK = frozenset({"cell-loss"})
# kinds that interrupt every cell: both centers lost; an app server gone with requests of any
# cell in flight on it
EVERY_CELL = frozenset({"dr-activation", "app-crash"})
# kinds that interrupt the cells led from their site
LED_FROM_SITE = frozenset({"site-loss", "site-freeze", "partition"})


@dataclass(frozen=True)
class Fault:
    """What an experiment breaks, read from its ``configuration.watertight_fault``."""

    kind: str
    site: str | None = None
    cell: int | None = None

    @classmethod
    def from_configuration(cls, raw: Mapping[str, Any]) -> Fault:
        return cls(str(raw["kind"]), raw.get("site"), raw.get("cell"))

    @property
    def target(self) -> str:
        return self.site or (f"cell-{self.cell}" if self.cell is not None else "topology")

    def affected_cells(self, leaders: Mapping[int, str | None]) -> list[int]:
        """Cells whose service the fault interrupts (judged on RTO); the rest must not notice."""
        if self.cell is not None:
            return [self.cell]
        if self.kind in EVERY_CELL:
            return sorted(leaders)
        if self.kind in LED_FROM_SITE and self.site is not None:
            return [cell for cell, site in leaders.items() if site == self.site]
        return []

    @property
    def recovery_from(self) -> str:
        """What the affected cells' RTO is measured from: the fault, when the topology is meant to
        heal itself (a standby takes over); the rollback, when nothing can take over until the
        rollback brings the members back (a whole cell lost: both of its centers' members)."""
        return "rollback" if self.kind in HEALED_ONLY_BY_ROLLBACK else "fault"


# what each experiment breaks; an experiment file may say it itself in configuration.watertight_fault
FAULTS = {
    "site-loss-prod": Fault("site-loss", site="prod"),
    "site-loss-samecity": Fault("site-loss", site="samecity"),
    "site-pids-kill-prod": Fault("site-loss", site="prod"),
    "site-freeze-prod": Fault("site-freeze", site="prod"),
    "partition-prod": Fault("partition", site="prod"),
    "cell-loss": Fault("cell-loss", cell=1),
    "cell-primary-kill": Fault("cell-primary-kill", cell=1),
    "patroni-crash": Fault("patroni-crash", cell=1),
    "postgres-crash": Fault("postgres-crash", cell=1),
    "app-crash-mid-batch": Fault("app-crash", site="prod"),
    "etcd-member-loss": Fault("etcd-member-loss", site="prod"),
    "inter-site-latency": Fault("latency"),
    "dr-activation": Fault("dr-activation"),
}
