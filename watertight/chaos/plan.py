"""A dry run of an experiment: what each of its actions would hit on the current topology, and
what its rollbacks would do, without changing anything.

Owns: turning an experiment's actions (the extension's functions, with their arguments as the
experiment gives them) into the processes, components, cell members, addresses and existing
connections each would hit now, read from the runtime's status and /proc. Never: signal a
process, start one, write a rule or a file of the topology (the test compares every PID before
and after).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watertight import render
from watertight.chaos import network, targets
from watertight.runtime.local import LocalRuntime

VARIABLE = re.compile(r"^\$\{(\w+)\}$")


def configuration_of(experiment: Mapping[str, Any]) -> dict[str, Any]:
    """The experiment's configuration as Chaos Toolkit would resolve it (env keys, defaults)."""
    resolved: dict[str, Any] = {}
    for key, value in (experiment.get("configuration") or {}).items():
        if isinstance(value, Mapping) and value.get("type") == "env":
            resolved[key] = os.environ.get(str(value["key"]), value.get("default"))
        else:
            resolved[key] = value
    return resolved


def _arguments(activity: Mapping[str, Any], configuration: Mapping[str, Any]) -> dict[str, Any]:
    arguments = dict((activity.get("provider") or {}).get("arguments") or {})
    for name, value in list(arguments.items()):
        match = VARIABLE.match(value) if isinstance(value, str) else None
        if match:
            arguments[name] = configuration.get(match.group(1))
    return arguments


class Planner:
    """What the extension's actions would hit on one local topology."""

    def __init__(self, runtime: LocalRuntime) -> None:
        self.runtime = runtime
        self.status = runtime.status()
        self.by_name = {c["name"]: c for c in self.status["components"]}

    # ---- what a selection is made of ---------------------------------------------------------

    def components(self, **selection: Any) -> list[dict[str, Any]]:
        """Each component the selection names, with every PID it has and the addresses it holds."""
        chosen = self.runtime.select(**selection)
        return [self.component(c.name) for c in chosen]

    def component(self, name: str) -> dict[str, Any]:
        shown = self.by_name[name]
        rendered = self.runtime.component(name)
        return {
            "component": name,
            "running": shown["alive"],
            "pids": [p["pid"] for p in shown.get("processes", [])],
            "roles": {str(p["pid"]): p["role"] for p in shown.get("processes", [])},
            "addresses": [f"{host}:{port}" for host, port in rendered.listens],
            "member_of_cell": rendered.cell if rendered.kind == "patroni" else None,
            "member_role": shown["role"] if rendered.kind == "patroni" else None,
        }

    def leader_member(self, cell: int) -> str | None:
        site = self.status["cells"][str(cell)]["leader_site"]
        return render.pg_name(cell, site) if site else None

    def connections_between(self, pairs: set[frozenset[str]]) -> int:
        net = self.runtime.site_network()
        crossing = network.crossing_connections(network.tcp_sockets(), network.socket_owners(net.pids), pairs)
        return len(crossing) // 2

    # ---- one action ----------------------------------------------------------------------------

    def plan(self, func: str, arguments: Mapping[str, Any]) -> dict[str, Any]:
        site = str(arguments["site"]) if arguments.get("site") is not None else None
        cell = int(arguments["cell"]) if arguments.get("cell") is not None else None
        if func in ("kill_site", "freeze_site"):
            verb = "SIGKILL" if func == "kill_site" else "SIGSTOP"
            return {"would": f"{verb} every process of site {site}", "hits": self.components(site=site)}
        if func == "kill_listed_pids":
            every = bool(arguments.get("every_process"))
            listed = [c for c in self.status["components"] if c["site"] == site and c["pid"]]
            pids = [
                pid for c in listed for pid in ([p["pid"] for p in c["processes"]] if every else [c["pid"]])
            ]
            return {
                "would": f"SIGKILL the PIDs status lists for site {site}",
                "pids": pids,
                "hits": [self.component(c["name"]) for c in listed],
            }
        if func in ("kill_cell_primary", "kill_leader_patroni", "kill_leader_postgres"):
            assert cell is not None, f"{func} takes a cell"
            member = self.leader_member(cell)
            if member is None:
                return {"would": f"fail: cell {cell} has no leader now"}
            described = self.component(member)
            role = {"kill_leader_patroni": "patroni", "kill_leader_postgres": "postgres"}.get(func)
            if role is not None:
                described["pids"] = [int(pid) for pid, r in described["roles"].items() if r == role]
            return {
                "would": f"SIGKILL {role or 'every process'} of {member}, the leader of cell {cell}",
                "hits": [described],
            }
        if func == "kill_cell":
            members = [c for c in self.components(cell=cell) if c["member_of_cell"] is not None]
            if not arguments.get("include_dr"):
                members = [c for c in members if not c["component"].endswith(f"-{render.DR_SITE}")]
            return {"would": f"SIGKILL every member of cell {cell}", "hits": members}
        if func in ("kill_component", "kill_app_mid_batch", "kill_etcd_member"):
            name = arguments.get("component") or (
                render.app_name(str(site)) if func == "kill_app_mid_batch" else render.etcd_name(str(site))
            )
            return {"would": f"SIGKILL {name}", "hits": [self.component(str(name))]}
        if func in (
            "restart_site",
            "restart_cell",
            "restart_component",
            "restart_etcd_member",
            "thaw_site",
            "heal_everything",
        ):
            selection: dict[str, Any] = {}
            if site is not None and func != "restart_etcd_member":
                selection["site"] = site
            if cell is not None:
                selection["cell"] = cell
            if func == "restart_component":
                selection["component"] = arguments.get("component")
            if func == "restart_etcd_member":
                selection["component"] = render.etcd_name(str(site))
            chosen = self.components(**selection)
            frozen = [c["component"] for c in chosen if self.by_name[c["component"]]["frozen"]]
            down = [
                c["component"]
                for c in chosen
                if not c["running"] and self.by_name[c["component"]]["expected"]
            ]
            wait = arguments.get("wait_s")
            return {
                "would": f"thaw what is frozen and start what is not running of {', '.join(c['component'] for c in chosen)}"
                + (f", then wait up to {wait} s for the steady state" if wait else ""),
                "thaw_now": frozen,
                "start_now": down,
            }
        if func == "partition_site":
            others = [s for s in self.runtime.topology.sites if s != site]
            return {
                "would": f"drop every packet between site {site} and {', '.join(others)}, new and existing connections",
                "addresses_cut": {s: self.runtime.topology.address(s) for s in [str(site), *others]},
                "existing_connections_cut": self.connections_between(
                    network.pairs_for_partition(self.runtime.site_network(), str(site))
                ),
                "hits": self.components(site=site),
            }
        if func == "add_latency":
            sites = arguments.get("sites") or list(self.runtime.topology.sites)
            pairs = network.pairs_between(sites)
            return {
                "would": f"delay every packet between {', '.join(sorted(sites))} by {arguments.get('delay_ms')} ms one way",
                "pairs": sorted(sorted(p) for p in pairs),
                "existing_connections_delayed": self.connections_between(pairs),
            }
        if func in ("heal_partition", "remove_latency"):
            return {
                "would": "remove the network fault",
                "in_force_now": network.read_state(self.runtime.run_dir),
            }
        if func == "run_runbook":
            return {"would": f"run the runbook {arguments.get('name')} with {arguments.get('extras') or {}}"}
        if func == "wait_until_steady":
            return {
                "would": f"wait up to {arguments.get('timeout_s')} s for the steady state; changes nothing"
            }
        return {"would": f"run {func}: no dry-run description for it; read the experiment"}


def dry_run(experiment_path: Path, runtime: LocalRuntime) -> dict[str, Any]:
    """What each action of the experiment (method, then rollbacks) would hit now."""
    experiment = json.loads(experiment_path.read_text())
    configuration = configuration_of(experiment)
    planner = Planner(runtime)
    steps = []
    for part in ("method", "rollbacks"):
        for activity in experiment.get(part) or []:
            provider = activity.get("provider") or {}
            if activity.get("type") != "action" or provider.get("type") != "python":
                steps.append(
                    {
                        "part": part,
                        "name": activity.get("name"),
                        "type": activity.get("type"),
                        "would": "read only",
                    }
                )
                continue
            func = str(provider.get("func"))
            arguments = _arguments(activity, configuration)
            steps.append(
                {
                    "part": part,
                    "name": activity.get("name"),
                    "func": func,
                    "arguments": arguments,
                    **planner.plan(func, arguments),
                }
            )
    return {
        "experiment": experiment_path.stem,
        "target": configuration.get("target") or targets.LOCAL,
        "steps": steps,
    }


def text(plan: Mapping[str, Any]) -> str:
    """The dry run for people."""
    lines = [f"{plan['experiment']} (target {plan['target']}): nothing is changed by this dry run"]
    for step in plan["steps"]:
        lines.append(f"  [{step['part']}] {step['name']}: {step['would']}")
        for hit in step.get("hits", []):
            pids = ", ".join(f"{pid} ({step_role(hit, pid)})" for pid in hit["pids"]) or "none running"
            lines.append(
                f"      {hit['component']}: PIDs {pids}; listens on {', '.join(hit['addresses']) or '-'}"
            )
        for key in (
            "pids",
            "thaw",
            "start",
            "addresses_cut",
            "existing_connections_cut",
            "pairs",
            "existing_connections_delayed",
        ):
            if key in step:
                lines.append(f"      {key.replace('_', ' ')}: {step[key]}")
    return "\n".join(lines)


def step_role(hit: Mapping[str, Any], pid: int) -> str:
    return str(hit["roles"].get(str(pid), "?"))
