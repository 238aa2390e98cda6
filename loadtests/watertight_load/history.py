"""The client's history: what the load saw, for the Jepsen-style verdicts of a drill.

Owns: appending one JSON line per observation, with the client's own clock at send and at answer:

- ``{"op": "write", "account", "cell", "sent", "done", "transaction_id", "key"}``: a financial
  request the core acknowledged that created a transaction (a clearing, a repayment);
- ``{"op": "read", "account", "cell", "sent", "done", "transactions": [[id, created_at], ...],
  "full"}``: a read of the account's newest transactions (``full``: the page had as many as
  asked, so older ones may be beyond it; ``created_at`` in seconds since the epoch, the
  database's clock);
- ``{"op": "indeterminate", "key", "endpoint", "cell", "account", "sent", "done", "answer"}``:
  a financial request whose outcome the client cannot know (no answer, a 5xx, a decline 91
  after the core may have committed it): resolved against the ledgers after the run.

Lines go out as the ack log's do (one ``write(2)`` each, O_APPEND, one file per process), so
they survive the load generator being killed. ``watertight.verdicts`` judges them.
Never: hold a card number (accounts and ids only).
"""

from __future__ import annotations

import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from watertight_load.ack_log import AckLog, read_ack_log

READ_PAGE_SIZE = 20

Entry = dict[str, Any]


class History:
    """One process's part of the history file."""

    def __init__(self, path: str | Path, read_back_ratio: float) -> None:
        assert 0.0 <= read_back_ratio <= 1.0, read_back_ratio
        self.log = AckLog(path)
        self.read_back_ratio = read_back_ratio

    @property
    def path(self) -> Path:
        return self.log.path

    def wants_read_back(self) -> bool:
        return self.read_back_ratio >= 1.0 or random.random() < self.read_back_ratio

    def write(self, account: str, cell: int, sent: float, transaction_id: str, key: str) -> None:
        self.log.append(
            {
                "op": "write",
                "account": account,
                "cell": cell,
                "sent": sent,
                "done": time.time(),
                "transaction_id": transaction_id,
                "key": key,
            }
        )

    def read(self, account: str, cell: int, sent: float, page: dict[str, Any], limit: int) -> None:
        listed = page.get("transactions") or []
        self.log.append(
            {
                "op": "read",
                "account": account,
                "cell": cell,
                "sent": sent,
                "done": time.time(),
                "transactions": [[t["transaction_id"], epoch_seconds(t.get("created_at"))] for t in listed],
                "full": len(listed) >= limit,
            }
        )

    def indeterminate(
        self, key: str, endpoint: str, account: str, cell: int, sent: float, answer: str
    ) -> None:
        self.log.append(
            {
                "op": "indeterminate",
                "key": key,
                "endpoint": endpoint,
                "account": account,
                "cell": cell,
                "sent": sent,
                "done": time.time(),
                "answer": answer,
            }
        )

    def close(self) -> None:
        self.log.close()


def epoch_seconds(value: Any) -> float | None:
    """An RFC 3339 time as seconds since the epoch (None when absent or not a time)."""
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def read_history(path: str | Path) -> list[Entry]:
    """Every line of PATH and its worker files, ordered by when each request was sent."""
    entries = read_ack_log(path)
    entries.sort(key=lambda entry: float(entry.get("sent", 0.0)))
    return entries
