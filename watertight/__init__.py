"""Watertight: stand up, load and break a three-site, cell-based credit-card core, then judge it.

The toolkit's parts, each visible by name: the topology (sites, cells, sizes, ports, SLOs), the
runtimes that render it into processes (local) or clusters (kubernetes), load (Locust), chaos
(Chaos Toolkit experiments and their target), runbooks, the drill report, and the `watertight` CLI.
The core under test lives in core-app/ (package `cardcore`) and imports nothing from here.
"""

from typing import Any

__version__ = "0.1.0"


def discover(discover_system: bool = True) -> dict[str, Any]:
    """Chaos Toolkit's entry point (``chaos discover --no-install watertight``): the activities of
    the chaos extension, watertight.chaos."""
    from watertight.chaos import discover as discover_chaos

    return discover_chaos(discover_system)
