"""How the gateway routes each request: its path template (the metrics label) and its routing kind.

Owns: the map from method + path to a ``Route`` (kind, template, path id). The cell itself is computed in
``app.py`` from the id (no JSON decode) or from a small body decode. Never: return a raw path as a
template (metric labels must stay bounded).
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from cardcore.common import ids


class Kind(IntEnum):
    ANY = 0  # no cell: any healthy upstream (catalogue reads, unknown paths: the app answers)
    PATH_ID = 1  # the cell is in an id in the path
    BODY_PAN = 2  # POST /v1/authorizations
    BODY_AUTH_ID = 3  # POST /v1/clearing
    BODY_ACCOUNT_ID = 4  # repayments, installment quotes and bookings
    BODY_APPLICANT = 5  # POST /v1/applications
    PRICING_RULE = 6  # POST /v1/pricing/rules: account layer -> one cell, else every cell
    FANOUT_FIRST = 7  # every cell; answer: the first cell's answer
    FANOUT_TAG_CUSTOMERS = 8  # every cell; merge "customers"
    FANOUT_RULES = 9  # every cell; merge "rules" by rule_id
    FANOUT_CYCLE = 10  # every cell; {"business_date", "cells": {...}}
    CELL_QUERY = 11  # the cell named by ?cell=N (trial balance, the key ring of a cell)
    ROUTING_CUSTOMER = 12
    ROUTING_CARD = 13
    HEALTHZ = 14
    READYZ = 15
    METRICS = 16
    BODY_PAN_REFUND = 17  # POST /v1/refunds: the card's cell, answered as any financial request
    REVERSAL_BY_KEY = 18  # POST /v1/authorizations/reversal: the card's cell, else every cell
    FANOUT_DEFINE = 19  # POST /v1/tags: every cell checked for a conflict, then every cell written


# resource -> (id prefix, template of the id segment, known sub-paths)
_ID_RESOURCES: dict[str, tuple[str, str, frozenset[str]]] = {
    "customers": (
        ids.PREFIX_CUSTOMER,
        "{customer_id}",
        frozenset({"", "limits", "limits/temporary", "tags", "tags/{tag}"}),
    ),
    "cards": (ids.PREFIX_CARD, "{card_id}", frozenset({"", "activate", "status", "replace"})),
    "accounts": (
        ids.PREFIX_ACCOUNT,
        "{account_id}",
        frozenset({"", "balance", "transactions", "statements", "statements/{statement_id}", "installments"}),
    ),
    "authorizations": (ids.PREFIX_AUTHORIZATION, "{auth_id}", frozenset({"reversal", "increment"})),
    "installments": (ids.PREFIX_PLAN, "{plan_id}", frozenset({"payoff"})),
}

_FIXED: dict[tuple[str, str], tuple[Kind, str]] = {
    ("POST", "/v1/authorizations"): (Kind.BODY_PAN, "/v1/authorizations"),
    ("POST", "/v1/authorizations/reversal"): (Kind.REVERSAL_BY_KEY, "/v1/authorizations/reversal"),
    ("POST", "/v1/refunds"): (Kind.BODY_PAN_REFUND, "/v1/refunds"),
    ("POST", "/v1/clearing"): (Kind.BODY_AUTH_ID, "/v1/clearing"),
    ("POST", "/v1/repayments"): (Kind.BODY_ACCOUNT_ID, "/v1/repayments"),
    ("POST", "/v1/installments/quote"): (Kind.BODY_ACCOUNT_ID, "/v1/installments/quote"),
    ("POST", "/v1/installments"): (Kind.BODY_ACCOUNT_ID, "/v1/installments"),
    ("POST", "/v1/applications"): (Kind.BODY_APPLICANT, "/v1/applications"),
    ("POST", "/v1/tags"): (Kind.FANOUT_DEFINE, "/v1/tags"),
    ("POST", "/v1/pricing/rules"): (Kind.PRICING_RULE, "/v1/pricing/rules"),
    ("GET", "/v1/pricing/rules"): (Kind.FANOUT_RULES, "/v1/pricing/rules"),
    ("POST", "/v1/admin/cycle"): (Kind.FANOUT_CYCLE, "/v1/admin/cycle"),
    ("GET", "/v1/admin/trial-balance"): (Kind.CELL_QUERY, "/v1/admin/trial-balance"),
    ("GET", "/v1/admin/keys"): (Kind.CELL_QUERY, "/v1/admin/keys"),
    ("POST", "/v1/admin/keys/rewrap"): (Kind.CELL_QUERY, "/v1/admin/keys/rewrap"),
    ("GET", "/v1/products"): (Kind.ANY, "/v1/products"),
    ("GET", "/openapi.json"): (Kind.ANY, "/openapi.json"),
    ("GET", "/healthz"): (Kind.HEALTHZ, "/healthz"),
    ("GET", "/readyz"): (Kind.READYZ, "/readyz"),
    ("GET", "/metrics"): (Kind.METRICS, "/metrics"),
    ("HEAD", "/healthz"): (Kind.HEALTHZ, "/healthz"),
}

UNMATCHED = "unmatched"


class Route(NamedTuple):
    kind: Kind
    template: str  # the metrics label
    key: str = ""  # the id (or tag) from the path
    prefix: str = ""  # the id prefix expected in ``key`` for PATH_ID


_FIXED_ROUTES = {key: Route(kind, template) for key, (kind, template) in _FIXED.items()}
_UNMATCHED_ROUTE = Route(Kind.ANY, UNMATCHED)


def classify(method: str, path: str) -> Route:
    """The route of a request. Unknown paths go to any upstream (which answers 404 or 405)."""
    fixed = _FIXED_ROUTES.get((method, path))
    if fixed is not None:
        return fixed
    parts = path.split("/")  # parts[0] is "" for an absolute path, parts[1] the version
    if len(parts) >= 4 and parts[0] == "" and parts[1] == "v1":
        resource = parts[2]
        spec = _ID_RESOURCES.get(resource)
        if spec is not None and parts[3] and parts[3] != "quote":
            prefix, id_template, known = spec
            rest = parts[4:]
            if resource == "customers" and len(rest) == 2 and rest[0] == "tags":
                sub = "tags/{tag}"
            elif resource == "accounts" and len(rest) == 2 and rest[0] == "statements":
                sub = "statements/{statement_id}"
            else:
                sub = "/".join(rest)
                if sub not in known:
                    sub = "*"
            template = f"/v1/{resource}/{id_template}" + (f"/{sub}" if sub else "")
            return Route(Kind.PATH_ID, template, parts[3], prefix)
        if resource == "tags" and len(parts) == 5 and parts[4] == "customers" and method == "GET":
            return Route(Kind.FANOUT_TAG_CUSTOMERS, "/v1/tags/{tag}/customers", parts[3])
        if resource == "routing" and len(parts) == 5 and method == "GET":
            if parts[3] == "customers":
                return Route(Kind.ROUTING_CUSTOMER, "/v1/routing/customers/{customer_id}", parts[4])
            if parts[3] == "cards":
                return Route(Kind.ROUTING_CARD, "/v1/routing/cards/{card_id}", parts[4])
    return _UNMATCHED_ROUTE
