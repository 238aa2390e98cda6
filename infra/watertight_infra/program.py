"""The Pulumi program: the topology on three clusters, one per site, as the stack configures it.

Reads like the topology: three sites (each its own cluster through its own provider), then the
cells (a member in each site), then the optional load generator; the plan of pods and the
configuration the chaos kubernetes target and Locust need are stack outputs. Owns: that order and
the outputs. Never: read a secret outside Pulumi's secret config.
"""

from __future__ import annotations

from typing import Any

import pulumi

from watertight import render
from watertight.topology import CENTERS, SITE_NAMES
from watertight_infra import settings as settings_module
from watertight_infra import sizing
from watertight_infra.components import Cell, Context, LoadGenerator, Secrets, Site
from watertight_infra.settings import StackSettings


def endpoints_of(settings: StackSettings, topology: Any) -> render.KubernetesEndpoints:
    sites = settings.sites
    return render.KubernetesEndpoints(
        topology=topology,
        namespace=settings.namespace,
        site_namespaces={name: settings.namespace_of(name) for name in sites},
        service_domains={name: site.service_domain for name, site in sites.items()},
        site_networks={name: tuple(site.networks) for name, site in sites.items()},
        entry=settings.entry_url or "",
    )


def chaos_configuration(settings: StackSettings, endpoints: render.KubernetesEndpoints) -> dict[str, Any]:
    """The Chaos Toolkit ``configuration`` of the kubernetes target (watertight.runtime.kubernetes)."""
    return {
        "kube_contexts": {name: settings.sites[name].context for name in SITE_NAMES},
        "kube_namespace": settings.namespace,
        # where sites share a cluster, each has its own namespace (sites.<site>.namespace)
        "kube_namespaces": {name: settings.namespace_of(name) for name in SITE_NAMES},
        "site_cidrs": {name: list(settings.sites[name].networks) for name in SITE_NAMES},
        # without a global load balancer: the first center's gateway, as the sites resolve it
        "entry_url": settings.entry_url or endpoints.gateway_url(CENTERS[0]),
    }


def main() -> dict[str, Any]:
    """Declare everything; returns the stack outputs (also exported) for tests and snapshots."""
    config = pulumi.Config(settings_module.PROJECT)
    settings = settings_module.from_config(config.get)
    topology = settings_module.load_topology(settings)
    endpoints = endpoints_of(settings, topology)
    plan = sizing.plan(settings, topology)
    context = Context(
        settings=settings,
        topology=topology,
        endpoints=endpoints,
        plan=plan,
        secrets=Secrets(
            superuser_password=config.require_secret(settings_module.SECRET_SUPERUSER_PASSWORD),
            replication_password=config.require_secret(settings_module.SECRET_REPLICATION_PASSWORD),
            pan_key_hex=config.require_secret(settings_module.SECRET_PAN_KEY),
            api_tokens=config.require_secret(settings_module.SECRET_API_TOKENS),
            api_tokens_previous=config.get_secret(settings_module.SECRET_API_TOKENS_PREVIOUS),
        ),
    )
    pulumi.log.info(
        f"plan: {plan.pods['total']} pods for {plan.financial_tps:g} financial + {plan.nonfinancial_tps:g}"
        f" non-financial TPS ({plan.cores_total} cores); {plan.app_replicas_per_center} app servers and"
        f" {plan.gateway_replicas_per_center} gateways per center; {topology.cells} cells"
        f" ({plan.cells_needed} keep each primary within its pod)"
    )
    sites = {name: Site(name, context) for name in SITE_NAMES}
    cells = [Cell(cell, context, sites) for cell in topology.cell_numbers]
    if settings.locust.enabled:
        LoadGenerator(context, sites[settings.locust.site])
    outputs: dict[str, Any] = {
        "plan": plan.to_dict(),
        "chaos_configuration": chaos_configuration(settings, endpoints),
        "gateway_urls": {name: endpoints.gateway_url(name) for name in CENTERS},
        # idle (zero replicas) until the activate-dr runbook scales dr's app servers and gateway up
        "dr_gateway_url": endpoints.gateway_url(render.DR_SITE),
        "dr_app_url": endpoints.app_url(render.DR_SITE),
        "cells": {
            str(cell.cell): {
                "leader_site": cell.leader_site,
                "sync_standby_site": topology.standby_site(cell.cell),
                "dr_scope": render.dr_scope(cell.cell),
            }
            for cell in cells
        },
        "locust_host": (settings.entry_url or endpoints.gateway_url(settings.locust.site))
        if settings.locust.enabled
        else None,
    }
    for key, value in outputs.items():
        pulumi.export(key, value)
    return outputs
