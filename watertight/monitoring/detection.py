"""What the drill does with monitoring: start each experiment with Alertmanager quiet, keep the
load on after the rollback until every alert of the run resolved (bounded), judge detection
(watertight.verdicts.detection) and mark the alerts on the report's timeline.

Owns: the waits around an experiment and the alert marks. Never: wait without a bound, or judge
anything itself.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from watertight import verdicts
from watertight.monitoring.receiver import AlertReceiver
from watertight.runtime.local import http_json

QUIET_TIMEOUT_S = 90.0
POLL_S = 1.0
# Alertmanager delivers a resolution within its group interval (5 s) of Prometheus resolving it
RESOLVED_DELIVERY_S = 10.0
ALERT_COLOUR = "#e80"

Progress = Callable[[str], None]


def active_alerts(alertmanager_url: str) -> list[str] | None:
    """The names of the alerts Alertmanager holds active now; None when it does not answer."""
    status, body = http_json(
        f"{alertmanager_url}/api/v2/alerts?active=true&silenced=false&inhibited=false", 2.0
    )
    if status != 200 or not isinstance(body, list):
        return None
    return sorted(str((alert.get("labels") or {}).get("alertname", "?")) for alert in body)


def wait_quiet(alertmanager_url: str, progress: Progress, timeout_s: float = QUIET_TIMEOUT_S) -> list[str]:
    """Wait until no alert is active (what an earlier experiment left resolves once the topology is
    whole), at most ``timeout_s``. Returns the alerts still active then (the steady part of the run
    will count them as false alarms)."""
    deadline = time.monotonic() + timeout_s
    said = False
    while True:
        active = active_alerts(alertmanager_url)
        if active == []:
            return []
        if time.monotonic() > deadline:
            progress(
                f"monitoring: still active after {timeout_s:.0f} s: {', '.join(active or ['Alertmanager silent'])}"
            )
            return active or []
        if not said:
            progress(
                f"monitoring: waiting for {', '.join(active or ['Alertmanager'])} to resolve before the load starts"
            )
            said = True
        time.sleep(POLL_S)


def open_alerts(receiver: AlertReceiver, since: float) -> list[str]:
    """Alerts delivered since ``since`` whose resolution has not been delivered."""
    return sorted(
        {
            e["alertname"]
            for e in verdicts.alert_episodes(receiver.records())
            if e["ends_at"] is None and e["delivered_at"] >= since
        }
    )


def tail(
    receiver: AlertReceiver | None, since: float, recovered_at: float, tail_s: float, progress: Progress
) -> None:
    """Keep the load on ``tail_s`` after the rollback, and longer while an alert of this run is
    open, up to the resolution bound (plus the delivery of the last resolution)."""
    time.sleep(tail_s)
    if receiver is None:
        return
    deadline = recovered_at + verdicts.RESOLVE_SECONDS_MAX + RESOLVED_DELIVERY_S
    said = False
    while time.time() < deadline:
        still = open_alerts(receiver, since)
        if not still:
            return
        if not said:
            progress(
                f"monitoring: load goes on until {', '.join(still)} resolve (at most {deadline - time.time():.0f} s)"
            )
            said = True
        time.sleep(POLL_S)


def judge(
    receiver: AlertReceiver | None, fault_kind: str, steady_from: float, fault_at: float, recovered_at: float
) -> tuple[dict[str, Any] | None, list[str]]:
    """The report's ``detection`` and its reasons to fail (None, [] without monitoring)."""
    if receiver is None:
        return None, []
    return verdicts.detection(
        receiver.records(),
        steady_from=steady_from,
        fault_at=fault_at,
        recovered_at=recovered_at,
        detection_required=fault_kind in verdicts.DETECTION_REQUIRED,
    )


def marks(detection: dict[str, Any] | None, cells: list[int]) -> dict[str, list[tuple[float, str, str]]]:
    """The first delivery of each alert, as a mark on its cell's timeline (every cell's when the
    alert names none), in seconds after the fault."""
    found: dict[str, list[tuple[float, str, str]]] = {f"cell-{cell}": [] for cell in cells}
    seen: set[tuple[str, str]] = set()
    for alert in (detection or {}).get("alerts", []):
        keys = [f"cell-{alert['cell']}"] if alert.get("cell") else list(found)
        for key in keys:
            if key in found and (key, alert["alert"]) not in seen:
                seen.add((key, alert["alert"]))
                found[key].append((float(alert["delivered_s"]), f"alert {alert['alert']}", ALERT_COLOUR))
    return found
