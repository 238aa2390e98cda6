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
            ["COMPONENT", "SITE", "ROLE", "PID", "STATE", "RSS"],
            [
                [
                    c["name"],
                    c["site"] or "-",
                    c["role"],
                    str(c["pid"] or "-"),
                    (
                        "frozen"
                        if c["frozen"]
                        else (
                            "healthy"
                            if c["healthy"]
                            else ("unhealthy" if c["healthy"] is False else "running")
                        )
                    )
                    if c["alive"]
                    else "stopped",
                    human_bytes(c["rss_bytes"]),
                ]
                for c in status["components"]
            ],
        )
    )
    parts.append("")
    parts.append(
        f"total RSS of the topology: {human_bytes(status['rss_total_bytes'])}; logs in {status['logs']}"
    )
    return "\n".join(parts)
