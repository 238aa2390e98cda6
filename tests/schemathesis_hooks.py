"""Schemathesis auth and hooks for the suite's run against a real stack (tests/test_openapi_fuzzing.py):
every request it generates carries the bearer token its route needs, from the tokens file the
run names in $WATERTIGHT_API_TOKENS. As an auth provider (not a hook), so schemathesis knows the
credentials are its own and its checks can take them away or spoil them (401 expected)."""

from __future__ import annotations

import json
import os
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import schemathesis
from cardcore.platform.auth import ClientTokens


@schemathesis.auth()
class RouteToken:
    def get(self, case: Any, ctx: Any) -> ClientTokens:
        return ClientTokens.from_secrets(json.loads(Path(os.environ["WATERTIGHT_API_TOKENS"]).read_text()))

    def set(self, case: Any, data: ClientTokens, ctx: Any) -> None:
        value = data.header_value(case.method.upper(), case.formatted_path)
        if value is not None:
            case.headers = {**(case.headers or {}), "Authorization": value}


# -- what no JSON Schema can say, made true of the bodies schemathesis sends ----------------------
#
# The server refuses these with 400, rightly, and the OpenAPI description says so in the fields'
# descriptions: a card number whose last digit is not its Luhn check digit, a temporary raise
# that expires in the past (or more than a year ahead), a birth date not in the past, a pricing
# rule valid to before it is valid from, a reversal naming its own key as the original. Each
# hook below changes only a value that is well formed for its field (a 16-digit PAN, a time with
# an offset), so a request meant to be malformed stays malformed; schemathesis re-validates the
# body after a before_call hook, so what it expects of the answer follows what is sent.

TEMPORARY_DAYS_AHEAD = 30  # well inside the server's 365 days
ADULT_BIRTH_DATE = "1990-01-01"


def luhn_completed(pan: str) -> str:
    """``pan`` with its last digit replaced by the Luhn check digit of the others."""
    total = 0
    for position, char in enumerate(reversed(pan[:-1])):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return pan[:-1] + str((10 - total % 10) % 10)


def _moment(value: Any) -> datetime | None:
    """An RFC 3339 time with an offset, or None (absent, malformed, or without an offset)."""
    if not isinstance(value, str):
        return None
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else None


def _day(value: Any) -> date | None:
    if not isinstance(value, str):
        return None
    try:
        return date.fromisoformat(value)
    except ValueError:
        return None


def true_of_the_body(path: str, body: dict[str, Any]) -> dict[str, Any]:
    """``body`` with what the schema cannot say made true (a new dict; the same when nothing is)."""
    fixed = dict(body)
    pan = fixed.get("pan")
    if isinstance(pan, str) and len(pan) == 16 and pan.isascii() and pan.isdigit():
        fixed["pan"] = luhn_completed(pan)
    now = datetime.now(UTC)
    expires_at = _moment(fixed.get("expires_at"))
    if expires_at is not None and not now < expires_at < now + timedelta(days=TEMPORARY_DAYS_AHEAD * 12):
        fixed["expires_at"] = (now + timedelta(days=TEMPORARY_DAYS_AHEAD)).isoformat()
    applicant = fixed.get("applicant")
    if isinstance(applicant, dict):
        born = _day(applicant.get("birth_date"))
        if born is not None and born >= now.date():
            fixed["applicant"] = {**applicant, "birth_date": ADULT_BIRTH_DATE}
    valid_from, valid_to = _moment(fixed.get("valid_from")), _moment(fixed.get("valid_to"))
    if valid_from is not None and valid_to is not None and valid_to <= valid_from:
        if valid_from < datetime.max.replace(tzinfo=valid_from.tzinfo) - timedelta(days=1):
            fixed["valid_to"] = (valid_from + timedelta(days=1)).isoformat()
        else:
            del fixed["valid_to"]
    key, original = fixed.get("idempotency_key"), fixed.get("original_idempotency_key")
    if path == "/v1/authorizations/reversal" and isinstance(key, str) and key and key == original:
        fixed["original_idempotency_key"] = key[:-1] + ("b" if key[-1] == "a" else "a")
    return fixed if fixed != body else body


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    body = case.body
    if isinstance(body, dict):
        fixed = true_of_the_body(case.path, body)
        if fixed is not body:
            case.body = fixed
