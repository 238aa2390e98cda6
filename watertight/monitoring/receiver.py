"""The drill's webhook receiver: every notification Alertmanager delivers (firing and resolved),
recorded with the moment it arrived, so the drill can say how long a fault went unnoticed.

Owns: an HTTP listener on the topology's ``monitoring.receiver_port`` for the length of a drill,
and the list of what it received. Never: judge (watertight.verdicts does), keep more than
``NOTIFICATIONS_MAX`` records, or answer anything but the webhook's POST.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("watertight.monitoring.receiver")

NOTIFICATIONS_MAX = 100_000
BODY_BYTES_MAX = 4 * 1024 * 1024
_FRACTION = re.compile(r"\.(\d{6})\d+")


def parse_time(text: str | None) -> float | None:
    """Alertmanager's RFC 3339 time (nanoseconds, ``Z``) as epoch seconds; None for its zero
    time (``0001-01-01T00:00:00Z``: not resolved)."""
    if not text or text.startswith("0001-"):
        return None
    return datetime.fromisoformat(_FRACTION.sub(r".\1", text).replace("Z", "+00:00")).timestamp()


def records_of(payload: dict[str, Any], received_at: float) -> list[dict[str, Any]]:
    """One record per alert of an Alertmanager webhook payload (version 4)."""
    records = []
    for alert in payload.get("alerts") or []:
        labels = {str(k): str(v) for k, v in (alert.get("labels") or {}).items()}
        records.append(
            {
                "received_at": received_at,
                "status": str(alert.get("status", payload.get("status", ""))),
                "alertname": labels.get("alertname", "?"),
                "labels": labels,
                "starts_at": parse_time(alert.get("startsAt")),
                "ends_at": parse_time(alert.get("endsAt")),
                "fingerprint": str(alert.get("fingerprint") or json.dumps(labels, sort_keys=True)),
            }
        )
    return records


class AlertReceiver:
    """Listens at ``url`` (the topology's ``alert_receiver_url``) until ``stop``."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.path = parts.path or "/"
        self._lock = threading.Lock()
        self._records: list[dict[str, Any]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                if self.path != receiver.path or not 0 < length <= BODY_BYTES_MAX:
                    self.send_error(404 if self.path != receiver.path else 400)
                    return
                try:
                    payload = json.loads(self.rfile.read(length))
                except ValueError:
                    self.send_error(400, "not JSON")
                    return
                receiver.add(records_of(payload, time.time()))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass  # one line per notification would drown the drill's own log

        try:
            self._server = ThreadingHTTPServer((parts.hostname or "127.0.0.1", parts.port or 80), Handler)
        except OSError as error:
            raise OSError(
                f"the alert receiver cannot listen on {url}: {error.strerror}; is another drill running "
                "on this topology?"
            ) from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True, name="alert-receiver")

    def add(self, records: list[dict[str, Any]]) -> None:
        with self._lock:
            room = NOTIFICATIONS_MAX - len(self._records)
            if room < len(records):
                log.warning(
                    "alert receiver full (%d records): %d dropped", NOTIFICATIONS_MAX, len(records) - room
                )
            self._records.extend(records[: max(room, 0)])

    def records(self, since: float | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(r) for r in self._records if since is None or r["received_at"] >= since]

    def start(self) -> AlertReceiver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
