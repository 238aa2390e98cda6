"""How many pods the headline load needs: napkin math from the CPU cost per transaction.

cores(kind) = financial TPS x financial us x share(kind) + non-financial TPS x non-financial us x
share(kind), in cores (1e6 us of CPU per second). App servers and gateways are stateless and
scale out: pods per center = cores x the center's part / (pod CPU x target utilization). A center
carries everything when the other is lost (``eachCenterCarriesFullLoad``), so by default each is
sized for the whole load. PostgreSQL scales by cells: the plan says how many cells keep each
cell's database within its pod at the headline load. Owns: these numbers, stated as stack
outputs. Never: declare a resource.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from watertight.topology import Topology
from watertight_infra.settings import StackSettings, ceil_div

KINDS = ("app", "gateway", "postgres", "etcd")
US_PER_CORE_SECOND = 1e6
ETCD_MEMBERS = 3 + 1  # one per site, plus the dr copies' own single-member etcd at dr
MEMBERS_PER_CELL = 3  # one per center plus the dr copy
LOCUST_MASTERS = 1


@dataclass(frozen=True)
class Plan:
    """What the headline load needs, and what the stack declares for it."""

    financial_tps: float
    nonfinancial_tps: float
    cores_by_kind: dict[str, float]
    cores_total: float
    app_replicas_per_center: int
    gateway_replicas_per_center: int
    app_replicas_max_per_center: int
    gateway_replicas_max_per_center: int
    postgres_cores_per_cell: float
    cells: int
    cells_needed: int
    locust_workers: int
    pods: dict[str, int]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def cores_by_kind(settings: StackSettings) -> dict[str, float]:
    cost = settings.cpu_cost
    financial = cost.financial_share.normalized()
    nonfinancial = cost.nonfinancial_share.normalized()
    load = settings.load
    return {
        kind: (
            load.financial_tps * cost.financial_us * financial[kind]
            + load.nonfinancial_tps * cost.nonfinancial_us * nonfinancial[kind]
        )
        / US_PER_CORE_SECOND
        for kind in KINDS
    }


def replicas_for(cores: float, pod_cpu_millis: int, utilization: float, floor: int) -> int:
    """Pods of ``pod_cpu_millis`` each, used at ``utilization``, that carry ``cores``."""
    usable_cores = pod_cpu_millis / 1000 * utilization
    return max(floor, ceil_div(cores, usable_cores))


def plan(settings: StackSettings, topology: Topology) -> Plan:
    sizing = settings.sizing
    resources = settings.resources
    cores = cores_by_kind(settings)
    center_part = 1.0 if sizing.each_center_carries_full_load else 0.5
    utilization = sizing.target_cpu_utilization

    app = replicas_for(cores["app"] * center_part, resources.app.cpu_millis, utilization, sizing.replicas_min)
    gateway = replicas_for(
        cores["gateway"] * center_part, resources.gateway.cpu_millis, utilization, sizing.replicas_min
    )

    def autoscale_max(replicas: int) -> int:
        return max(replicas + 1, ceil_div(replicas * sizing.autoscale_max_factor, 1))

    # conservative: the whole PostgreSQL cost of a cell counted on its primary's pod
    cells_needed = max(1, replicas_for(cores["postgres"], resources.postgres.cpu_millis, utilization, 1))
    total_tps = settings.load.financial_tps + settings.load.nonfinancial_tps
    workers = 0
    if settings.locust.enabled:
        workers = min(
            settings.locust.workers_max,
            max(1, ceil_div(total_tps, settings.locust.requests_per_second_per_worker)),
        )
    pods = {
        "app": 2 * app,
        "gateway": 2 * gateway,
        "postgres": MEMBERS_PER_CELL * topology.cells,
        "etcd": ETCD_MEMBERS,
        "locust": workers + LOCUST_MASTERS if settings.locust.enabled else 0,
    }
    pods["total"] = sum(pods.values())
    return Plan(
        financial_tps=settings.load.financial_tps,
        nonfinancial_tps=settings.load.nonfinancial_tps,
        cores_by_kind={kind: round(value, 2) for kind, value in cores.items()},
        cores_total=round(sum(cores.values()), 2),
        app_replicas_per_center=app,
        gateway_replicas_per_center=gateway,
        app_replicas_max_per_center=autoscale_max(app),
        gateway_replicas_max_per_center=autoscale_max(gateway),
        postgres_cores_per_cell=round(cores["postgres"] / topology.cells, 2),
        cells=topology.cells,
        cells_needed=cells_needed,
        locust_workers=workers,
        pods=pods,
    )
