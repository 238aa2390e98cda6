"""The drill report: ``report.json`` for machines (CONTRACT.md names its keys) and
``report.html`` for people, with a timeline per cell (successes and errors per second, the
fault and each cell's recovery marked) drawn as inline SVG, so the file opens anywhere.

Never: write a card number; claim a pass the verdict did not give.
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

Series = dict[str, list[tuple[float, float, float]]]  # cell -> [(seconds since start, ok/s, errors/s)]

WIDTH = 760
HEIGHT = 180
MARGIN = 36


def write_json(report: dict[str, Any], directory: Path) -> Path:
    path = directory / "report.json"
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def _svg_timeline(
    cell: str, points: list[tuple[float, float, float]], marks: list[tuple[float, str, str]]
) -> str:
    if not points:
        return f"<p>no traffic was recorded for {html.escape(cell)}</p>"
    t_max = max(max(p[0] for p in points), max((m[0] for m in marks), default=0.0), 1.0)
    y_max = max(max(p[1] + p[2] for p in points), 1.0)

    def x(t: float) -> float:
        return MARGIN + (WIDTH - 2 * MARGIN) * t / t_max

    def y(v: float) -> float:
        return HEIGHT - MARGIN + 0.0 - (HEIGHT - 2 * MARGIN) * v / y_max

    ok_path = " ".join(f"{x(t):.1f},{y(ok):.1f}" for t, ok, _ in points)
    err_path = " ".join(f"{x(t):.1f},{y(err):.1f}" for t, _, err in points)
    parts = [
        f'<svg width="{WIDTH}" height="{HEIGHT}" role="img" aria-label="timeline of {html.escape(cell)}">',
        f'<line x1="{MARGIN}" y1="{HEIGHT - MARGIN}" x2="{WIDTH - MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
        f'<line x1="{MARGIN}" y1="{MARGIN}" x2="{MARGIN}" y2="{HEIGHT - MARGIN}" stroke="#888"/>',
        f'<text x="4" y="{MARGIN}" font-size="10">{y_max:.0f}/s</text>',
        f'<text x="{WIDTH - MARGIN - 20}" y="{HEIGHT - 8}" font-size="10">{t_max:.0f} s</text>',
        f'<polyline fill="none" stroke="#2a7" stroke-width="1.5" points="{ok_path}"/>',
        f'<polyline fill="none" stroke="#d33" stroke-width="1.5" points="{err_path}"/>',
    ]
    for t, label, colour in marks:
        parts.append(
            f'<line x1="{x(t):.1f}" y1="{MARGIN - 10}" x2="{x(t):.1f}" y2="{HEIGHT - MARGIN}" stroke="{colour}" stroke-dasharray="4 3"/>'
        )
        parts.append(
            f'<text x="{x(t) + 3:.1f}" y="{MARGIN - 12}" font-size="10" fill="{colour}">{html.escape(label)}</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _trend(runs: list[dict[str, Any]]) -> str:
    """The experiment's last runs from the drill history: RTO per cell, detection, TPS."""
    if len(runs) < 2:
        return ""
    rows = "".join(
        "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>".format(
            html.escape(str(run.get("finished_at", ""))[:19]),
            "passed" if run.get("passed") else "FAILED",
            html.escape(
                ", ".join(f"{c} {s} s" for c, s in sorted((run.get("rto_seconds") or {}).items())) or "-"
            ),
            html.escape(str(run.get("seconds_to_detect", "-"))),
            html.escape(f"{run.get('financial_tps', '-')} + {run.get('nonfinancial_tps', '-')}"),
        )
        for run in runs[-10:]
    )
    return (
        "<h2>Trend over the last runs</h2><table><tr><th>finished</th><th>verdict</th><th>RTO</th>"
        f"<th>detection (s)</th><th>TPS (financial + non-financial)</th></tr>{rows}</table>"
    )


def write_html(
    report: dict[str, Any],
    series: Series,
    marks: dict[str, list[tuple[float, str, str]]],
    directory: Path,
    runs: list[dict[str, Any]] | None = None,
) -> Path:
    verdict = "PASSED" if report.get("passed") else "FAILED"
    colour = "#2a7" if report.get("passed") else "#d33"
    rows = "".join(
        f"<tr><th>{html.escape(str(key))}</th><td><code>{html.escape(json.dumps(value, default=str))}</code></td></tr>"
        for key, value in report.items()
        if key not in ("html",)
    )
    reasons = "".join(f"<li>{html.escape(reason)}</li>" for reason in report.get("reasons", []))
    charts = "".join(
        f"<h3>{html.escape(cell)}</h3>{_svg_timeline(cell, points, marks.get(cell, []))}"
        for cell, points in sorted(series.items())
    )
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Drill {html.escape(str(report.get("experiment")))}</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:60em}} td,th{{text-align:left;padding:2px 8px;vertical-align:top}}
code{{font-size:90%;word-break:break-all}} .verdict{{color:{colour};font-weight:bold}}</style></head>
<body>
<h1>Drill: {html.escape(str(report.get("experiment")))} — <span class="verdict">{verdict}</span></h1>
<ul>{reasons}</ul>
<h2>Timeline per cell</h2>
<p>Green: successful requests per second; red: errors per second; dashed: the fault, each cell's recovery and (orange) the first delivery of each alert Alertmanager sent.</p>
{charts}
{_trend(runs or [])}
<h2>Figures</h2>
<table>{rows}</table>
</body></html>
"""
    path = directory / "report.html"
    path.write_text(page)
    return path
