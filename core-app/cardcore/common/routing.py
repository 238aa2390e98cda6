"""Cell routing: which cell serves a request, computed locally.

Owns: slots for new applicants (a stable hash of the national id into ``SLOT_COUNT`` slots,
slots mapped to cells, with an override table) and the cell of every id the cells issue.
Never: call another process; a cell that is down never stops routing for the others.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from cardcore.common import ids

SLOT_COUNT = 1024


def slot_of_id_number(id_number: str) -> int:
    digest = hashlib.sha256(id_number.strip().upper().encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "big") % SLOT_COUNT


class Router:
    """Maps ids and applicants to cells. Immutable after construction."""

    def __init__(self, cell_count: int, slot_overrides: Mapping[int, int] | None = None) -> None:
        if not 1 <= cell_count <= ids.CELL_MAX:
            raise ValueError(f"cell_count must be 1..{ids.CELL_MAX}, got {cell_count}")
        self.cell_count = cell_count
        self.cells = tuple(range(1, cell_count + 1))
        overrides = dict(slot_overrides or {})
        for slot, cell in overrides.items():
            if not 0 <= slot < SLOT_COUNT:
                raise ValueError(f"slot_overrides: slot {slot} is outside 0..{SLOT_COUNT - 1}")
            if cell not in self.cells:
                raise ValueError(f"slot_overrides: slot {slot} maps to unknown cell {cell}")
        self._slot_to_cell = tuple(overrides.get(slot, slot % cell_count + 1) for slot in range(SLOT_COUNT))

    def cell_for_applicant(self, id_number: str) -> int:
        return self._slot_to_cell[slot_of_id_number(id_number)]

    def cell_for_id(self, value: str, prefix: str | None = None) -> int | None:
        cell = ids.cell_of_id(value, prefix)
        return cell if cell in self.cells else None

    def cell_for_pan(self, pan: str) -> int | None:
        cell = ids.cell_of_pan(pan)
        return cell if cell in self.cells else None
