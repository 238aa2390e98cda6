"""App server settings, read from a JSON file (rendered by the topology) or built in tests.

Never: print ``pan_key``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

Positive = Annotated[int, msgspec.Meta(ge=1)]


class CellSettings(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str
    # host:port of each database member -> its site, so readyz can say where the leader is
    member_sites: dict[str, str] = {}
    leader_site: str | None = None
    # host:port of each database member -> the base URL of its Patroni REST API: when given, the
    # app server serves only from the member holding the leader lock (see cardcore.platform.engine)
    patroni_urls: dict[str, str] = {}


class AppSettings(msgspec.Struct, forbid_unknown_fields=True):
    site: str
    cells: dict[str, CellSettings]
    cell_count: Positive
    pan_key_hex: str
    host: str = "127.0.0.1"
    port: int = 8100
    slot_overrides: dict[int, int] = {}
    hold_ttl_seconds: Positive = 7 * 24 * 3600
    batch_size_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    batch_wait_ms_max: Annotated[float, msgspec.Meta(ge=0, le=50)] = 1.0
    queue_depth_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 8192
    pool_size_max: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    statement_timeout_ms: Positive = 5000
    connect_timeout_ms: Positive = 2000
    probe_interval_ms: Positive = 500
    catalogue_refresh_ms: Positive = 1000

    def cell_numbers(self) -> list[int]:
        numbers = []
        for key in self.cells:
            if not key.isdigit() or not 1 <= int(key) <= self.cell_count:
                raise ValueError(f"cells: key {key!r} is not a cell number in 1..{self.cell_count}")
            numbers.append(int(key))
        return sorted(numbers)

    def pan_key(self) -> bytes:
        try:
            key = bytes.fromhex(self.pan_key_hex)
        except ValueError:
            raise ValueError("pan_key_hex: not hexadecimal") from None
        if len(key) != 32:
            raise ValueError("pan_key_hex: must be 64 hex characters (32 bytes)")
        return key


def load(path: str | Path) -> AppSettings:
    data = Path(path).read_bytes()
    try:
        settings = msgspec.json.decode(data, type=AppSettings)
    except msgspec.ValidationError as error:
        raise ValueError(f"{path}: {error}") from None
    settings.cell_numbers()
    settings.pan_key()
    return settings
