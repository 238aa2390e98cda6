"""What a request is: its traffic class, its cell, its name in the statistics, and its verdict.

Owns: naming every request ``<route> [cell N]`` so one cell's trouble shows in the console, the
CSV and the HTML report; telling financial from non-financial routes; judging an answer (a
decline is a success, HTTP errors, no answer and response code 91 are failures) and telling
which failures may hide a commit (indeterminate: the acquirer reverses them); masking PANs.
Never: put an id or a card number into a request name or a failure message (they would make the
statistics unbounded and leak card data).
"""

from __future__ import annotations

import re
from typing import Any

FINANCIAL = "financial"
NONFINANCIAL = "nonfinancial"
TRAFFIC_CLASSES = (FINANCIAL, NONFINANCIAL)

# the routes that move money or credit (DESIGN.md): everything else is non-financial
FINANCIAL_ROUTES = frozenset(
    {
        ("POST", "/v1/authorizations"),
        ("POST", "/v1/authorizations/{auth_id}/reversal"),
        ("POST", "/v1/authorizations/reversal"),
        ("POST", "/v1/authorizations/{auth_id}/increment"),
        ("POST", "/v1/clearing"),
        ("POST", "/v1/refunds"),
        ("POST", "/v1/repayments"),
        ("POST", "/v1/installments"),
        ("POST", "/v1/installments/{plan_id}/payoff"),
    }
)

ISSUER_UNAVAILABLE = "91"
_NAME = re.compile(r"^(?P<route>\S+) \[cell (?P<cell>\d+)\]$")


def request_name(route: str, cell: int) -> str:
    """``/v1/clearing [cell 2]``: the route template (no ids) tagged with the cell."""
    return f"{route} [cell {cell}]"


def parse_request_name(name: str) -> tuple[str, int | None]:
    """The route and cell of a request name; cell None for names not made by ``request_name``."""
    match = _NAME.match(name)
    if match is None:
        return name, None
    return match["route"], int(match["cell"])


def traffic_class(method: str, name: str) -> str:
    route, _ = parse_request_name(name)
    return FINANCIAL if (method, route) in FINANCIAL_ROUTES else NONFINANCIAL


def indeterminate(route: str, status_code: int | None, body: Any) -> bool:
    """A failed answer after which the request may still have been committed: no answer (a
    timeout, a reset), a 5xx, or an authorization declined 91 (the cell could not answer, maybe
    after its commit). A 4xx wrote nothing; an answer is an answer."""
    if failure_reason(route, status_code, body) is None:
        return False
    return not status_code or status_code >= 500 or status_code == 200


def cell_of_customer_id(customer_id: str) -> int:
    """Ids carry their cell: ``CU02…`` is a customer of cell 2."""
    return int(customer_id[2:4])


def cell_of_pan(pan: str) -> int:
    """PAN ``625977`` + two cell digits + serial + Luhn digit."""
    return int(pan[6:8])


def mask_pan(pan: str) -> str:
    return f"{pan[:6]}******{pan[-4:]}" if len(pan) >= 10 else "******"


# what the core may rightly refuse in the load's own mix, which cannot know it beforehand: a
# purchase the customer's repayments already paid off, or one the installment line cannot carry,
# is not turned into installments (the customer is told so). A business answer, not a failure;
# nothing was committed, so nothing goes to the ack log.
BUSINESS_REFUSALS = frozenset(
    {
        ("/v1/installments", 422, "already_repaid"),
        ("/v1/installments", 422, "insufficient_installment_line"),
    }
)


def business_refusal(route: str, status_code: int | None, body: Any) -> bool:
    """True for a refusal in ``BUSINESS_REFUSALS``."""
    if not isinstance(body, dict) or not isinstance(body.get("error"), dict):
        return False
    return (route, status_code, body["error"].get("code")) in BUSINESS_REFUSALS


def failure_reason(route: str, status_code: int | None, body: Any) -> str | None:
    """Why an answer counts as a failure, or None when it is a success.

    A decline (200, ``approved: false``) is a business answer, not a failure; an authorization
    declined with 91 means the issuer's cell could not answer, so it is one."""
    if not status_code:
        return "no answer (connection refused, reset or timed out)"
    if status_code >= 400:
        if business_refusal(route, status_code, body):
            return None
        code = None
        if isinstance(body, dict) and isinstance(body.get("error"), dict):
            code = body["error"].get("code")
        return f"HTTP {status_code} {code or ''}".rstrip()
    if route == "/v1/authorizations":
        if not isinstance(body, dict) or "response_code" not in body:
            return f"HTTP {status_code} without a response_code"
        if body["response_code"] == ISSUER_UNAVAILABLE:
            return "declined 91: issuer (cell) unavailable"
    return None
