"""Plain-text rendering of ``LocalRuntime.status()`` for people (the JSON is for machines)."""

from __future__ import annotations

from typing import Any


def human_bytes(value: int) -> str:
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows, strict=True)]
    lines = [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


def _state(component: dict[str, Any]) -> str:
    if not component["alive"]:
        return "ORPHANED" if component.get("orphans") else "stopped"
    if component["frozen"]:
        return "frozen"
    if component["healthy"]:
        return "healthy"
    return "unhealthy" if component["healthy"] is False else "running"


def _processes(described: list[dict[str, Any]]) -> str:
    """``guard 101, keeper 102, patroni 103, postgres 140 (+7)``: every process by role."""
    parts = []
    children = sum(1 for p in described if p["role"] == "postgres-child")
    for process in described:
        if process["role"] == "postgres-child":
            continue
        text = f"{process['role']} {process['pid']}"
        if process.get("state") in ("T", "t"):
            text += " (stopped)"
        if process["role"] == "postgres" and children:
            text += f" (+{children})"
        parts.append(text)
    return ", ".join(parts) or "-"


def status_table(status: dict[str, Any]) -> str:
    parts = [f"{status['name']}  entry {status['entry']}  run dir {status['run_dir']}", ""]
    parts.append(
        _table(
            ["SITE", "ROLE", "STATE", "ADDRESS", "GATEWAY", "ALIVE"],
            [
                [
                    name,
                    site["role"],
                    "up" if site["up"] else "DOWN",
                    site["address"],
                    site["gateway"] or "-",
                    f"{site['components_alive']}/{site['components']}",
                ]
                for name, site in status["sites"].items()
            ],
        )
    )
    parts.append("")
    rows = []
    for cell, view in status["cells"].items():
        dr = view["dr_copy"] or {}
        rows.append(
            [
                f"cell-{cell}",
                view["leader_site"] or "NONE",
                view["sync_standby"] or "NONE",
                f"{dr.get('role', 'NONE')}/{dr.get('state', '-')}" if dr else "NONE",
                str(view["replication_lag_bytes"] if view["replication_lag_bytes"] is not None else "-"),
                str(view["timeline"] or "-"),
            ]
        )
    parts.append(_table(["CELL", "LEADER", "SYNC STANDBY", "DR COPY", "LAG (B)", "TIMELINE"], rows))
    parts.append("")
    parts.append(
        _table(
            ["COMPONENT", "SITE", "ROLE", "PID", "STATE", "RSS", "PROCESSES"],
            [
                [
                    c["name"],
                    c["site"] or "-",
                    c["role"],
                    str(c["pid"] or "-"),
                    _state(c),
                    human_bytes(c["rss_bytes"]),
                    _processes(c.get("processes", [])),
                ]
                for c in status["components"]
            ],
        )
    )
    orphans = [(c["name"], c["orphans"]) for c in status["components"] if c.get("orphans")]
    for name, pids in orphans:
        parts.append(f"ORPHANS of {name}: PIDs {', '.join(map(str, pids))} run while its PID is gone")
    monitoring = status.get("monitoring")
    if monitoring:
        targets = monitoring.get("targets")
        if targets is None:
            scraped = "Prometheus does not answer"
        else:
            down = [t for t in targets if t["health"] != "up" and t["expected"]]
            idle = sum(1 for t in targets if not t["expected"])
            scraped = f"{monitoring['targets_up']}/{len(targets)} targets up" + (
                f" ({idle} idle until dr is activated)" if idle else ""
            )
            scraped += "".join(f"; DOWN: {t['job']} {t['component']} ({t['url']})" for t in down)
        parts.append("")
        parts.append(
            f"monitoring: Prometheus {monitoring['prometheus']}  Alertmanager {monitoring['alertmanager']}  {scraped}"
        )
    parts.append("")
    parts.append(
        f"total RSS of the topology: {human_bytes(status['rss_total_bytes'])}; logs in {status['logs']}"
    )
    return "\n".join(parts)
