"""The ack log: every financial transaction the core acknowledged, one JSON line each.

Owns: appending a line per acknowledged financial request (idempotency key, endpoint, cell,
amount, the id the core answered, status, time) and reading the lines of every process back as
one list. A later check looks each entry up in the ledgers: an entry missing there is an
acknowledged transaction that was lost.

Each line is one ``write(2)`` on a descriptor opened with ``O_APPEND``, issued right after the
answer: once the call returns the line belongs to the kernel, so it survives the Locust process
being killed (SIGKILL included); only the loss of the machine itself can lose it (no fsync).
Every process writes its own file: a stand-alone Locust writes PATH, each worker process
(``--processes N`` or distributed workers) PATH.worker-<host>-<pid>; ``read_ack_log(PATH)``
merges them.
Never: write a card number; hold lines in a user-space buffer.
"""

from __future__ import annotations

import glob
import json
import os
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

WORKER_SUFFIX = ".worker-"
LINE_BYTES_MAX = 4096

Entry = dict[str, Any]


def worker_path(path: str | Path, worker_id: str | None = None) -> Path:
    """The file of one worker process: PATH.worker-<host>-<pid> unless ``worker_id`` is given."""
    worker = worker_id or f"{socket.gethostname()}-{os.getpid()}"
    return Path(f"{path}{WORKER_SUFFIX}{worker}")


def now_rfc3339() -> str:
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class AckLog:
    """An append-only file of acknowledged financial transactions (one process's part)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        self.entries_written = 0

    def append(self, entry: Entry) -> None:
        data = (json.dumps(entry, ensure_ascii=False, separators=(",", ":")) + "\n").encode()
        assert len(data) <= LINE_BYTES_MAX, f"ack log line of {len(data)} bytes"
        assert self._fd is not None, f"ack log {self.path} is closed"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        self.entries_written += 1

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def ack_log_files(path: str | Path) -> list[Path]:
    """PATH (when it exists) and every PATH.worker-* file, in name order."""
    files = [Path(path)] if Path(path).exists() else []
    files += sorted(Path(p) for p in glob.glob(glob.escape(str(path)) + WORKER_SUFFIX + "*"))
    return files


def read_ack_log(path: str | Path) -> list[Entry]:
    """Every entry of PATH and its worker files, merged and ordered by time.

    A torn last line (a process killed in the middle of a write, or a full disk) is skipped:
    it was never a complete acknowledgement. A bad line anywhere else is an error."""
    entries: list[Entry] = []
    for file in ack_log_files(path):
        lines = file.read_bytes().split(b"\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except ValueError as error:
                if number == len(lines):  # no newline after it: torn by a kill
                    continue
                raise ValueError(f"{file}:{number}: not a JSON line: {error}") from error
    entries.sort(key=lambda entry: str(entry.get("time", "")))
    return entries
