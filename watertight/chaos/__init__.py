"""Chaos: the watertight extension of Chaos Toolkit.

Owns: the actions (faults and their heals), probes (steady state, leaders, writable primaries,
the load timeline) and controls (marks on the timeline) that experiments in chaos/experiments/
call, for the local target (processes, nftables) and the kubernetes target (chaostoolkit-
kubernetes). Never: keep state between calls beyond what it writes in the run directory.

``discover`` is what ``chaos discover --no-install watertight`` calls (through
``watertight.discover``).
"""

from __future__ import annotations

from typing import Any

import watertight

ACTIONS_MODULE = "watertight.chaos.actions"
PROBES_MODULE = "watertight.chaos.probes"
CONTROLS_MODULE = "watertight.chaos.controls"


def discover(discover_system: bool = True) -> dict[str, Any]:
    """The activities of this extension, in Chaos Toolkit's discovery format."""
    from chaoslib.discovery.discover import (
        discover_actions,
        discover_activities,
        discover_probes,
        initialize_discovery_result,
    )

    discovery: dict[str, Any] = initialize_discovery_result(
        "watertight", watertight.__version__, "watertight"
    )
    discovery["activities"].extend(discover_actions(ACTIONS_MODULE))
    discovery["activities"].extend(discover_probes(PROBES_MODULE))
    discovery["activities"].extend(discover_activities(CONTROLS_MODULE, "control"))
    return discovery
