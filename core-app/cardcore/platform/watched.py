"""A configuration file a server reads at start and again whenever it changes.

Owns: the polling (``os.stat`` every ``poll_s``: modification time, size and inode, so an atomic
replace is seen), parsing the new content with the owner's parser and handing it over; a bad
new file is logged and the last good value kept. Used for the API tokens and the key ring, which
operators rotate without restarting anything.
Never: fail a running server over a bad rewrite, log the file's content, or block a request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Generic, TypeVar

log = logging.getLogger("cardcore.watched")

T = TypeVar("T")


class WatchedFile(Generic[T]):
    """``value``: the last good parse of ``path``. The first read happens here: an error then
    (the parser's exception) stops the server from starting."""

    def __init__(self, path: str, parse: Callable[[bytes], T], what: str, poll_s: float = 1.0) -> None:
        self.path = path
        self.what = what
        self.poll_s = poll_s
        self._parse = parse
        self._seen = self._stat()
        self.value: T = parse(self._read())
        self._task: asyncio.Task[None] | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return (stat.st_mtime_ns, stat.st_size, stat.st_ino)

    def _read(self) -> bytes:
        with open(self.path, "rb") as handle:
            return handle.read()

    def refresh(self) -> bool:
        """Read the file again if it changed; True when the value changed."""
        seen = self._stat()
        if seen == self._seen:
            return False
        self._seen = seen
        try:
            value = self._parse(self._read())
        except (OSError, ValueError) as error:
            log.error("%s: %s ignored, keeping the last good one: %s", self.path, self.what, error)
            return False
        self.value = value
        log.info("%s: %s read again", self.path, self.what)
        return True

    async def start(self) -> None:
        self.refresh()
        if self._task is None:
            self._task = asyncio.create_task(self._poll_loop(), name=f"watch {self.what}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _poll_loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_s)
            self.refresh()
