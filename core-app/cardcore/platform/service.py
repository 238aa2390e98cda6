"""The app server's view of its cells: which engine serves a request, and the shared helpers
every module's API uses. Never: serve a request of a cell this server was not given.
"""

from __future__ import annotations

from typing import Any

from cardcore.common import ids
from cardcore.common.crypto import PanVault
from cardcore.common.routing import Router
from cardcore.platform.engine import CellEngine
from cardcore.platform.http import ApiError, not_found
from cardcore.platform.settings import AppSettings, parse_key_ring
from cardcore.platform.watched import WatchedFile


class KeyRing:
    """The app server's keys (``vault``): from the key ring file, read again when it changes (a
    rotation), or the one key of ``pan_key_hex``."""

    def __init__(self, settings: AppSettings) -> None:
        self._file: WatchedFile[PanVault] | None = None
        if settings.keys_file is not None:
            path = settings.keys_file
            self._file = WatchedFile(path, lambda data: parse_key_ring(data, path), "key ring")
            self._fixed = self._file.value
        else:
            self._fixed = PanVault.single(settings.pan_key())

    @property
    def vault(self) -> PanVault:
        return self._file.value if self._file is not None else self._fixed

    async def start(self) -> None:
        if self._file is not None:
            await self._file.start()

    async def stop(self) -> None:
        if self._file is not None:
            await self._file.stop()


class CoreService:
    def __init__(self, settings: AppSettings) -> None:
        self.settings = settings
        self.router = Router(settings.cell_count, settings.slot_overrides)
        self.keys = KeyRing(settings)
        self.engines: dict[int, CellEngine] = {
            cell: CellEngine(cell, settings.cells[str(cell)], settings, self.keys)
            for cell in settings.cell_numbers()
        }

    @property
    def vault(self) -> PanVault:
        """The keys as they are now (a rotation changes them while the server runs)."""
        return self.keys.vault

    def engine_for_cell(self, cell: int) -> CellEngine:
        engine = self.engines.get(cell)
        if engine is None:
            raise ApiError(503, "cell_unavailable", f"cell {cell} is not served by this app server", None)
        return engine

    def engine_for_id(self, value: str, prefix: str, field: str) -> CellEngine:
        cell = self.router.cell_for_id(value, prefix)
        if cell is None:
            raise not_found(field, f"{field} {value!r} not found")
        return self.engine_for_cell(cell)

    def any_engine(self) -> CellEngine:
        """A ready cell, for catalogue reads (the catalogue is the same in every cell)."""
        for engine in self.engines.values():
            if engine.ready:
                return engine
        raise ApiError(503, "cell_unavailable", "no cell of this app server is ready", None)

    def readiness(self) -> dict[str, Any]:
        cells = {
            str(cell): {
                "ready": engine.ready,
                "leader_site": engine.leader_site if engine.ready else None,
                "error": engine.last_error or None,
            }
            for cell, engine in self.engines.items()
        }
        vault = self.vault
        return {
            "ready": any(c["ready"] for c in cells.values()),
            "site": self.settings.site,
            "cells": cells,
            # versions only, never keys: a key rotation waits until every app server knows the new one
            "keys": {"current": vault.current, "versions": sorted(vault.versions)},
        }


def cell_param(service: CoreService, query: dict[str, str], required: bool = True) -> list[CellEngine]:
    """``?cell=N``: that cell's engine; absent and not required: every engine of this server."""
    raw = query.get("cell")
    if raw is None:
        if required:
            raise ApiError(400, "invalid", "query parameter cell is required (a cell number)", "cell")
        return list(service.engines.values())
    if not raw.isdigit() or not 1 <= int(raw) <= service.settings.cell_count:
        raise ApiError(
            400, "invalid", f"cell must be a cell number in 1..{service.settings.cell_count}", "cell"
        )
    return [service.engine_for_cell(int(raw))]


def mask_name(name: str) -> str:
    return name[0] + "*" * (len(name) - 1) if name else name


def is_customer_id(value: str) -> bool:
    return ids.is_id(value, ids.PREFIX_CUSTOMER)
