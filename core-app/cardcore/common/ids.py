"""Identifiers that carry their cell, so the router needs no remote lookup.

Owns: the format of customer, account, card, authorization, transaction and plan ids, and of
PANs (Luhn-valid, the cell in fixed digits after the BIN). Never: look anything up remotely.

Formats (cell in two decimal digits, 1..99):
- ids: ``<prefix><cell:02d><16 chars of base32>``, e.g. ``CU01K3Z...``; prefixes below.
- PAN: 16 digits: BIN (6) + cell (2) + serial (7, random: see issuing) + Luhn check digit.
"""

from __future__ import annotations

import base64
import os
import re

CELL_MAX = 99
BIN = "625977"  # a made-up BIN for the model issuer
SERIAL_MAX = 10_000_000  # serials are 0 .. SERIAL_MAX - 1, drawn at random by issuing

PREFIX_CUSTOMER = "CU"
PREFIX_ACCOUNT = "AC"
PREFIX_CARD = "CD"
PREFIX_AUTHORIZATION = "AU"
PREFIX_TRANSACTION = "TX"
PREFIX_PLAN = "IP"
PREFIX_STATEMENT = "ST"
PREFIXES = (
    PREFIX_CUSTOMER,
    PREFIX_ACCOUNT,
    PREFIX_CARD,
    PREFIX_AUTHORIZATION,
    PREFIX_TRANSACTION,
    PREFIX_PLAN,
    PREFIX_STATEMENT,
)

_ID_RE = re.compile(r"^(CU|AC|CD|AU|TX|IP|ST)(\d{2})[A-Z2-7]{16}$")
_PAN_RE = re.compile(r"^\d{16}$")


def new_id(prefix: str, cell: int) -> str:
    """A fresh random id of the given kind in the given cell."""
    assert prefix in PREFIXES, prefix
    assert 1 <= cell <= CELL_MAX, cell
    tail = base64.b32encode(os.urandom(10)).decode("ascii")  # 16 chars, no padding
    return f"{prefix}{cell:02d}{tail}"


def cell_of_id(value: str, prefix: str | None = None) -> int | None:
    """The cell encoded in an id, or None when it is not an id of ours (or not of ``prefix``)."""
    match = _ID_RE.match(value)
    if match is None:
        return None
    if prefix is not None and match.group(1) != prefix:
        return None
    cell = int(match.group(2))
    return cell if cell >= 1 else None


def is_id(value: str, prefix: str) -> bool:
    return cell_of_id(value, prefix) is not None


def luhn_check_digit(digits: str) -> str:
    """The check digit that makes ``digits + check`` Luhn-valid."""
    total = 0
    for index, char in enumerate(reversed(digits)):
        digit = int(char)
        if index % 2 == 0:  # doubled: these sit at odd positions once the check digit is appended
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def luhn_valid(pan: str) -> bool:
    return len(pan) >= 2 and pan.isdigit() and luhn_check_digit(pan[:-1]) == pan[-1]


def new_pan(cell: int, serial: int) -> str:
    assert 1 <= cell <= CELL_MAX, cell
    assert 0 <= serial < SERIAL_MAX, serial
    body = f"{BIN}{cell:02d}{serial:07d}"
    return body + luhn_check_digit(body)


def pan_well_formed(pan: str) -> bool:
    return _PAN_RE.match(pan) is not None and luhn_valid(pan)


def cell_of_pan(pan: str) -> int | None:
    """The cell of a well-formed PAN of our BIN, else None."""
    if not pan_well_formed(pan) or not pan.startswith(BIN):
        return None
    cell = int(pan[6:8])
    return cell if cell >= 1 else None


def mask_pan(pan: str) -> str:
    """First six and last four digits, as card receipts print them."""
    return pan[:6] + "*" * (len(pan) - 10) + pan[-4:]
