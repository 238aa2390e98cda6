"""Clients that write through the entry while a fault or a runbook runs: one thread per cell
posting repayments, recording every answer (the success timeline), every acknowledged
transaction (optionally appended to an ack log as Locust's would be) and every failure; with
``read_back``, each acknowledged repayment is read back at once (the account's newest
transactions) and both go into ``history`` as the load's history would have them, for
``verdicts.stale_reads``."""

from __future__ import annotations

import json
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
from watertight_load.ack_log import now_rfc3339
from watertight_load.history import READ_PAGE_SIZE, epoch_seconds

from watertight import verdicts


class Writers:
    def __init__(
        self,
        entry: str,
        accounts: dict[int, str],
        pause_s: float = 0.02,
        ack_log: Path | None = None,
        read_back: bool = False,
    ) -> None:
        self.entry = entry
        self.accounts = accounts
        self.pause_s = pause_s
        self.ack_log = ack_log
        self.timeline: list[verdicts.Sample] = []  # (wall clock, cell, ok)
        self.acked: list[dict[str, Any]] = []  # ack-log entries
        self.failed: dict[int, list[tuple[float, Any]]] = {cell: [] for cell in accounts}
        self.read_back = read_back
        self.history: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self._write, args=(cell,), daemon=True) for cell in accounts]

    def _write(self, cell: int) -> None:
        with httpx.Client(base_url=self.entry, timeout=10.0) as client:
            while not self.stopping.is_set():
                body = {"idempotency_key": uuid.uuid4().hex, "account_id": self.accounts[cell], "amount": 1}
                answer: httpx.Response | None = None
                sent = time.time()
                try:
                    answer = client.post("/v1/repayments", json=body)
                    failure: Any = None if answer.status_code == 200 else answer.status_code
                except httpx.HTTPError as error:
                    failure = repr(error)
                with self.lock:
                    self.timeline.append((time.time(), cell, failure is None))
                    if failure is not None or answer is None:
                        self.failed[cell].append((time.monotonic(), failure))
                    else:
                        entry = {
                            **body,
                            "cell": cell,
                            "endpoint": "/v1/repayments",
                            "transaction_id": answer.json()["transaction_id"],
                            "time": now_rfc3339(),
                        }
                        self.acked.append(entry)
                        self.history.append(
                            {"op": "write", "account": self.accounts[cell], "cell": cell, "sent": sent,
                             "done": time.time(), "transaction_id": entry["transaction_id"]}
                        )  # fmt: skip
                        if self.ack_log is not None:
                            with open(self.ack_log, "a") as handle:
                                handle.write(json.dumps(entry) + "\n")
                if self.read_back and failure is None:
                    self._read(client, cell)
                time.sleep(self.pause_s)

    def _read(self, client: httpx.Client, cell: int) -> None:
        account = self.accounts[cell]
        sent = time.time()
        try:
            answer = client.get(f"/v1/accounts/{account}/transactions", params={"limit": READ_PAGE_SIZE})
        except httpx.HTTPError:
            return
        if answer.status_code != 200:
            return
        listed = answer.json()["transactions"]
        with self.lock:
            self.history.append(
                {"op": "read", "account": account, "cell": cell, "sent": sent, "done": time.time(),
                 "transactions": [[t["transaction_id"], epoch_seconds(t["created_at"])] for t in listed],
                 "full": len(listed) >= READ_PAGE_SIZE}
            )  # fmt: skip

    def acked_ids(self, cell: int) -> list[str]:
        with self.lock:
            return [e["transaction_id"] for e in self.acked if e["cell"] == cell]

    def __enter__(self) -> Writers:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(timeout=15)


def ledger_transactions(client: httpx.Client, account_id: str) -> set[str]:
    """Every transaction id an account's ledger holds, page by page."""
    found: set[str] = set()
    cursor = None
    for _ in range(1000):
        params: dict[str, Any] = {"limit": 200, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/v1/accounts/{account_id}/transactions", params=params).json()
        found |= {t["transaction_id"] for t in page["transactions"]}
        cursor = page["next_cursor"]
        if not cursor:
            return found
    raise AssertionError("more pages than expected")
