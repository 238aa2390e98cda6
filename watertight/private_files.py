"""Files that hold secrets: created with mode 0600 before a byte is written, replaced atomically.

Owns: ``write_private`` (a temporary file made with O_EXCL and mode 0600 beside the target,
written, fsynced, renamed over it, so a reader sees the old file or the new one, never a
half-written or briefly world-readable one) and ``read_json``.
Never: chmod after writing (the window in which another user could read it), follow a symlink
planted at the temporary name, or print what it writes.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MODE = 0o600


def write_private(path: Path, text: str | bytes, owner: tuple[int, int] | None = None) -> None:
    """Write ``text`` to ``path``, readable by its owner only from the first byte on.
    ``owner`` (uid, gid): give the file to that account (e.g. PostgreSQL's service user)."""
    path = Path(path)
    data = text.encode("utf-8") if isinstance(text, str) else text
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.unlink()
    except FileNotFoundError:
        pass
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, MODE)
    try:
        os.fchmod(fd, MODE)  # whatever the umask took away, and nothing more
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temporary.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temporary, path)


def write_private_json(path: Path, document: Any) -> None:
    write_private(path, json.dumps(document, indent=1) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(Path(path).read_text())
