"""Every endpoint of the contract refuses bad input with a 4xx that names the field, and writes nothing.

Each case starts from a valid request and breaks one thing: a wrong type, a zero, negative or huge
amount, a malformed PAN or expiry, an unknown field, an id that does not exist.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.cards import approved, database_fingerprint, key, new_id_number, open_account, purchase
from tests.fixtures_core import CoreStack

HUGE = 10**15  # far above any amount a card core takes
DROP = object()  # remove the field


def fake(prefix: str, cell: int = 1) -> str:
    """A well-formed id of the given kind that no cell issued."""
    return f"{prefix}{cell:02d}" + "A" * 16


@dataclass
class World:
    customer_id: str
    account_id: str
    card_id: str
    pan: str
    expiry: str
    auth_id: str  # an open hold of 10,000 fen
    auth_key: str  # the idempotency key of its authorization
    transaction_id: str  # a posted purchase of 100,000 fen, not converted
    plan_id: str


Body = Callable[[World], Any]


@dataclass
class Case:
    name: str
    method: str
    path: str  # formatted with the World's fields
    body: Body | None
    status: int | tuple[int, ...]
    field: str | None


def edit(base: Body, path: str, value: Any) -> Body:
    """``base`` with the dotted ``path`` set to ``value`` (or removed with DROP)."""

    def body(world: World) -> Any:
        data = copy.deepcopy(base(world))
        *parents, last = path.split(".")
        node = data
        for part in parents:
            node = node[part]
        if value is DROP:
            node.pop(last, None)
        else:
            node[last] = value(world) if callable(value) else value
        return data

    return body


def raw(data: bytes) -> Body:
    return lambda world: data


# ---- valid bodies -------------------------------------------------------------------------------


def application(world: World) -> dict[str, Any]:
    return {
        "applicant": {
            "name": "王五",
            "id_number": new_id_number(),
            "mobile": "13900139000",
            "birth_date": "1985-06-15",
            "annual_income": 20_000_000,
        }
    }


def temporary_raise(world: World) -> dict[str, Any]:
    return {
        "line": "total",
        "amount": 100_000,
        "expires_at": (datetime.now(UTC) + timedelta(days=7)).isoformat(),
    }


def permanent_limit(world: World) -> dict[str, Any]:
    return {"line": "purchase", "limit": 5_000_000}


def card_status(world: World) -> dict[str, Any]:
    return {"status": "locked"}


def tag_definition(world: World) -> dict[str, Any]:
    return {"tag": "bad_input_tag", "description": "never defined: every case breaks it"}


def account_rule(world: World) -> dict[str, Any]:
    return {
        "layer": "account",
        "name": "bad input rule",
        "account_id": world.account_id,
        "price": {"item": "installment_fee_rate", "terms": 12, "value": 0.004},
    }


def product_rule(world: World) -> dict[str, Any]:
    return {
        "layer": "product",
        "name": "bad input rule",
        "product_code": "STD",
        "price": {"item": "apr", "value": 0.15},
    }


def campaign(world: World) -> dict[str, Any]:
    return {
        "layer": "transaction",
        "name": "bad input campaign",
        "price": {"item": "installment_fee_rate", "multiplier": 0.5},
        "conditions": {"min_amount_fen": 100_000},
    }


def authorization(world: World) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "pan": world.pan,
        "expiry": world.expiry,
        "amount": 1_000,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "M-0001",
        "channel": "pos",
        "kind": "purchase",
    }


def reversal(world: World) -> dict[str, Any]:
    return {"idempotency_key": key(), "amount": 1_000}


def reversal_by_key(world: World) -> dict[str, Any]:
    return {"idempotency_key": key(), "original_idempotency_key": world.auth_key, "amount": 1_000}


def increment(world: World) -> dict[str, Any]:
    return {"idempotency_key": key(), "amount": 1_000}


def refund(world: World) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "pan": world.pan,
        "expiry": world.expiry,
        "amount": 1_000,
        "merchant_id": "M-0001",
        "original_transaction_id": world.transaction_id,
    }


def clearing(world: World) -> dict[str, Any]:
    return {"idempotency_key": key(), "auth_id": world.auth_id, "amount": 1_000}


def repayment(world: World) -> dict[str, Any]:
    return {"idempotency_key": key(), "account_id": world.account_id, "amount": 1_000}


def installment_quote(world: World) -> dict[str, Any]:
    return {"account_id": world.account_id, "amount": 100_000, "terms": [3, 6]}


def booking(world: World) -> dict[str, Any]:
    return {
        "idempotency_key": key(),
        "account_id": world.account_id,
        "transaction_id": world.transaction_id,
        "terms": 3,
    }


def payoff(world: World) -> dict[str, Any]:
    return {"idempotency_key": key()}


def cycle(world: World) -> dict[str, Any]:
    return {"business_date": "2024-01-31"}


# ---- the table ----------------------------------------------------------------------------------


def body_cases(
    prefix: str, method: str, path: str, base: Body, bad: list[tuple[str, Any, str]]
) -> list[Case]:
    """One 400 case per (field path, bad value, named field), plus the format errors every body has."""
    cases = [
        Case(f"{prefix}-{field_path}={value!r}"[:90], method, path, edit(base, field_path, value), 400, named)
        for field_path, value, named in bad
    ]
    cases += [
        Case(f"{prefix}-unknown-field", method, path, edit(base, "surprise", 1), 400, "surprise"),
        Case(f"{prefix}-malformed-json", method, path, raw(b"{]"), 400, "body"),
        Case(f"{prefix}-not-an-object", method, path, raw(b"[1, 2]"), 400, "body"),
        Case(f"{prefix}-empty-body", method, path, raw(b""), 400, "body"),
    ]
    return cases


AMOUNT_ERRORS = [0, -1, HUGE, "1000", 10.5, None, True]


def amount_cases(field: str = "amount") -> list[tuple[str, Any, str]]:
    return [(field, value, field) for value in AMOUNT_ERRORS] + [(field, DROP, field)]


def key_cases() -> list[tuple[str, Any, str]]:
    return [
        ("idempotency_key", DROP, "idempotency_key"),
        ("idempotency_key", "", "idempotency_key"),
        ("idempotency_key", "k" * 65, "idempotency_key"),
        ("idempotency_key", 12345, "idempotency_key"),
    ]


CASES: list[Case] = [
    # -- issuing
    *body_cases(
        "application",
        "POST",
        "/v1/applications",
        application,
        [
            ("applicant", DROP, "applicant"),
            ("applicant", "王五", "applicant"),
            ("applicant.name", DROP, "applicant.name"),
            ("applicant.name", "", "applicant.name"),
            ("applicant.name", 42, "applicant.name"),
            ("applicant.id_number", DROP, "applicant.id_number"),
            ("applicant.id_number", "", "applicant.id_number"),
            ("applicant.id_number", "11010119900101123?", "applicant.id_number"),
            ("applicant.mobile", "call me", "applicant.mobile"),
            ("applicant.birth_date", DROP, "applicant.birth_date"),
            ("applicant.birth_date", "1990-13-01", "applicant.birth_date"),
            ("applicant.birth_date", "15/06/1985", "applicant.birth_date"),
            ("applicant.birth_date", 19850615, "applicant.birth_date"),
            ("applicant.birth_date", "2999-01-01", "applicant.birth_date"),
            ("applicant.annual_income", DROP, "applicant.annual_income"),
            ("applicant.annual_income", -1, "applicant.annual_income"),
            ("applicant.annual_income", "20000000", "applicant.annual_income"),
            ("applicant.annual_income", 25_000_000.5, "applicant.annual_income"),  # (2.5e7 is an integer)
            ("applicant.annual_income", HUGE * 1000, "applicant.annual_income"),
            ("applicant.salary", 1, "applicant.salary"),
            ("product_code", 7, "product_code"),
        ],
    ),
    Case(
        "application-unknown-product",
        "POST",
        "/v1/applications",
        edit(application, "product_code", "PLATINUM"),
        404,
        "product_code",
    ),
    Case("card-unknown", "GET", "/v1/cards/" + fake("CD"), None, 404, "card_id"),
    Case("card-unknown-cell-2", "GET", "/v1/cards/" + fake("CD", 2), None, 404, "card_id"),
    Case("card-no-such-cell", "GET", "/v1/cards/" + fake("CD", 9), None, 404, "card_id"),
    Case("card-not-an-id", "GET", "/v1/cards/nope", None, 404, "card_id"),
    Case("card-id-of-a-customer", "GET", "/v1/cards/{customer_id}", None, 404, "card_id"),
    Case("activate-unknown", "POST", "/v1/cards/" + fake("CD") + "/activate", None, 404, "card_id"),
    Case(
        "activate-unknown-field",
        "POST",
        "/v1/cards/{card_id}/activate",
        lambda w: {"force": True},
        400,
        "force",
    ),
    *body_cases(
        "card-status",
        "POST",
        "/v1/cards/{card_id}/status",
        card_status,
        [
            ("status", DROP, "status"),
            ("status", "frozen", "status"),
            ("status", "inactive", "status"),
            ("status", "LOCKED", "status"),
            ("status", 1, "status"),
        ],
    ),
    Case("card-status-unknown", "POST", "/v1/cards/" + fake("CD") + "/status", card_status, 404, "card_id"),
    Case("replace-unknown", "POST", "/v1/cards/" + fake("CD") + "/replace", None, 404, "card_id"),
    Case(
        "replace-unknown-field",
        "POST",
        "/v1/cards/{card_id}/replace",
        lambda w: {"reason": "lost"},
        400,
        "reason",
    ),
    Case("customer-unknown", "GET", "/v1/customers/" + fake("CU"), None, 404, "customer_id"),
    Case("customer-not-an-id", "GET", "/v1/customers/nobody", None, 404, "customer_id"),
    Case("customer-id-of-an-account", "GET", "/v1/customers/{account_id}", None, 404, "customer_id"),
    # -- limits
    Case("limits-unknown", "GET", "/v1/customers/" + fake("CU") + "/limits", None, 404, "customer_id"),
    *body_cases(
        "temporary",
        "POST",
        "/v1/customers/{customer_id}/limits/temporary",
        temporary_raise,
        [
            ("line", DROP, "line"),
            ("line", "gold", "line"),
            ("line", 1, "line"),
            *amount_cases(),
            ("expires_at", DROP, "expires_at"),
            ("expires_at", 1_900_000_000, "expires_at"),
            ("expires_at", "2020-01-01T00:00:00+00:00", "expires_at"),
            ("expires_at", "2099-01-01T00:00:00", "expires_at"),
        ],
    ),
    Case(
        "temporary-unknown-customer",
        "POST",
        "/v1/customers/" + fake("CU", 2) + "/limits/temporary",
        temporary_raise,
        404,
        "customer_id",
    ),
    *body_cases(
        "limit",
        "POST",
        "/v1/customers/{customer_id}/limits",
        permanent_limit,
        [
            ("line", DROP, "line"),
            ("line", "everything", "line"),
            ("limit", DROP, "limit"),
            ("limit", -1, "limit"),
            ("limit", HUGE, "limit"),
            ("limit", "5000000", "limit"),
            ("limit", 1.5, "limit"),
            ("limit", None, "limit"),
        ],
    ),
    Case(
        "limit-unknown-customer",
        "POST",
        "/v1/customers/" + fake("CU") + "/limits",
        permanent_limit,
        404,
        "customer_id",
    ),
    Case(
        "limit-child-above-total",
        "POST",
        "/v1/customers/{customer_id}/limits",
        lambda w: {"line": "cash", "limit": 100_000_000},
        422,
        "limit",
    ),
    Case(
        "limit-below-used",
        "POST",
        "/v1/customers/{customer_id}/limits",
        lambda w: {"line": "purchase", "limit": 1_000},
        422,
        "limit",
    ),
    # -- tags
    Case("tags-unknown-customer", "GET", "/v1/customers/" + fake("CU") + "/tags", None, 404, "customer_id"),
    Case(
        "tag-put-unknown-customer",
        "PUT",
        "/v1/customers/" + fake("CU") + "/tags/vip",
        None,
        404,
        "customer_id",
    ),
    Case(
        "tag-delete-unknown-customer",
        "DELETE",
        "/v1/customers/" + fake("CU") + "/tags/vip",
        None,
        404,
        "customer_id",
    ),
    Case("tag-put-undefined", "PUT", "/v1/customers/{customer_id}/tags/no_such_tag", None, 404, "tag"),
    Case("tag-delete-not-carried", "DELETE", "/v1/customers/{customer_id}/tags/vip", None, 404, "tag"),
    Case("tag-put-rule-tag", "PUT", "/v1/customers/{customer_id}/tags/high_spender", None, 409, "tag"),
    *body_cases(
        "tag-definition",
        "POST",
        "/v1/tags",
        tag_definition,
        [
            ("tag", DROP, "tag"),
            ("tag", "Bad Tag", "tag"),
            ("tag", "9lives", "tag"),
            ("tag", "x" * 64, "tag"),
            ("tag", 5, "tag"),
            ("description", DROP, "description"),
            ("description", "", "description"),
            ("description", "nul \u0000 inside", "description"),  # PostgreSQL stores no U+0000
            ("rule", "total_spend_fen >= 1", "rule"),
            ("rule", {"any": []}, "rule.any"),
            ("rule", {"all": [{"metric": "salary", "op": ">=", "value": 1}]}, "rule.all[0].metric"),
            ("rule", {"all": [{"metric": "age", "op": "=>", "value": 1}]}, "rule.all[0].op"),
            ("rule", {"all": [{"metric": "age", "op": ">=", "value": "18"}]}, "rule.all[0].value"),
            ("rule", {"all": [{"metric": "age", "op": ">="}]}, "rule.all[0].value"),
        ],
    ),
    Case("tag-customers-undefined", "GET", "/v1/tags/no_such_tag/customers", None, 404, "tag"),
    # -- pricing rules
    *body_cases(
        "account-rule",
        "POST",
        "/v1/pricing/rules",
        account_rule,
        [
            ("layer", "global", "layer"),
            ("layer", DROP, "layer"),
            ("name", DROP, "name"),
            ("name", 3, "name"),
            ("price", DROP, "price"),
            ("price.item", "late_fee", "price.item"),
            ("price.value", "0.004", "price.value"),
            ("price.value", -0.1, "price.value"),
            ("price.value", 11, "price.value"),
            ("price.terms", 5, "price.terms"),
            ("price.terms", "12", "price.terms"),
            ("price.multiplier", 0.5, "price"),
            ("price.bonus", 1, "price.bonus"),
            ("account_id", DROP, "account_id"),
            ("conditions", {"min_amount_fen": 1}, "conditions"),
            ("valid_from", "yesterday", "valid_from"),
            ("valid_from", "2020-01-01T00:00:00", "valid_from"),  # no offset: not comparable with now
            ("valid_to", "2099-01-01T00:00:00", "valid_to"),
        ],
    ),
    Case(
        "account-rule-ends-before-it-starts",
        "POST",
        "/v1/pricing/rules",
        lambda w: {
            **account_rule(w),
            "valid_from": "2030-01-01T00:00:00Z",
            "valid_to": "2029-12-31T00:00:00Z",
        },
        400,
        "valid_to",
    ),
    Case(
        "account-rule-unknown-account",
        "POST",
        "/v1/pricing/rules",
        edit(account_rule, "account_id", fake("AC")),
        404,
        "account_id",
    ),
    *body_cases(
        "product-rule",
        "POST",
        "/v1/pricing/rules",
        product_rule,
        [
            ("product_code", DROP, "product_code"),
            ("price.value", DROP, "price"),
            ("price.multiplier", 11.0, "price"),
        ],
    ),
    Case(
        "product-rule-unknown-product",
        "POST",
        "/v1/pricing/rules",
        edit(product_rule, "product_code", "PLATINUM"),
        404,
        "product_code",
    ),
    *body_cases(
        "campaign",
        "POST",
        "/v1/pricing/rules",
        campaign,
        [
            ("price.multiplier", -1, "price.multiplier"),
            ("conditions.min_amount_fen", "big", "conditions.min_amount_fen"),
            ("conditions.kind", "refund", "conditions.kind"),
            ("conditions.tags_all", "vip", "conditions.tags_all"),
            ("conditions.first_installment", "yes", "conditions.first_installment"),
            ("conditions.weekday", "monday", "conditions.weekday"),
        ],
    ),
    Case("rules-unknown-layer", "GET", "/v1/pricing/rules?layer=global", None, 400, "layer"),
    Case("rules-blank-layer", "GET", "/v1/pricing/rules?layer=", None, 400, "layer"),
    Case("tag-customers-blank-cell", "GET", "/v1/tags/vip/customers?cell=", None, 400, "cell"),
    # -- authorization, reversal, clearing
    *body_cases(
        "authorization",
        "POST",
        "/v1/authorizations",
        authorization,
        [
            *key_cases(),
            ("pan", DROP, "pan"),
            ("pan", "1234", "pan"),
            ("pan", "6259770100000O0", "pan"),
            ("pan", 6259770100000000, "pan"),
            ("pan", lambda w: w.pan[:-1] + str((int(w.pan[-1]) + 1) % 10), "pan"),  # Luhn fails
            ("pan", lambda w: w.pan + "0", "pan"),  # 17 digits
            ("pan", lambda w: w.pan[:4] + " " + w.pan[4:8] + " " + w.pan[8:12] + " " + w.pan[12:], "pan"),
            ("expiry", DROP, "expiry"),
            ("expiry", "13/30", "expiry"),
            ("expiry", "00/30", "expiry"),
            ("expiry", "1/30", "expiry"),
            ("expiry", "2030-01", "expiry"),
            ("expiry", "01/2030", "expiry"),
            ("expiry", 130, "expiry"),
            *amount_cases(),
            ("currency", "cny", "currency"),
            ("currency", "USD", "currency"),
            ("currency", "RMB1", "currency"),
            ("mcc", DROP, "mcc"),
            ("mcc", "54A1", "mcc"),
            ("mcc", 5411, "mcc"),
            ("mcc", "541", "mcc"),
            ("merchant_id", DROP, "merchant_id"),
            ("merchant_id", "", "merchant_id"),
            ("merchant_id", "m" * 65, "merchant_id"),
            ("merchant_id", "m\u0000", "merchant_id"),
            ("channel", DROP, "channel"),
            ("channel", "phone", "channel"),
            ("kind", "refund", "kind"),
            ("cvv", "123", "cvv"),
        ],
    ),
    *body_cases(
        "reversal",
        "POST",
        "/v1/authorizations/{auth_id}/reversal",
        reversal,
        [*key_cases(), *[("amount", v, "amount") for v in AMOUNT_ERRORS if v is not None]],
    ),
    Case(
        "reversal-unknown-authorization",
        "POST",
        "/v1/authorizations/" + fake("AU") + "/reversal",
        reversal,
        404,
        "auth_id",
    ),
    Case(
        "reversal-more-than-the-hold",
        "POST",
        "/v1/authorizations/{auth_id}/reversal",
        edit(reversal, "amount", 10_001),
        422,
        "amount",
    ),
    *body_cases(
        "reversal-by-key",
        "POST",
        "/v1/authorizations/reversal",
        reversal_by_key,
        [
            *key_cases(),
            ("original_idempotency_key", DROP, "original_idempotency_key"),
            ("original_idempotency_key", "", "original_idempotency_key"),
            ("original_idempotency_key", "k" * 65, "original_idempotency_key"),
            ("original_idempotency_key", 7, "original_idempotency_key"),
            *[("amount", v, "amount") for v in AMOUNT_ERRORS if v is not None],
            ("pan", "1234", "pan"),
            ("pan", lambda w: w.pan[:-1] + str((int(w.pan[-1]) + 1) % 10), "pan"),  # Luhn fails
        ],
    ),
    Case(
        "reversal-by-key-card-of-another-issuer",
        "POST",
        "/v1/authorizations/reversal",
        edit(reversal_by_key, "pan", "4111111111111111"),
        404,
        "pan",
    ),
    Case(
        "reversal-by-key-more-than-the-hold",
        "POST",
        "/v1/authorizations/reversal",
        edit(reversal_by_key, "amount", 10_001),
        422,
        "amount",
    ),
    Case(
        "reversal-by-key-naming-itself",
        "POST",
        "/v1/authorizations/reversal",
        edit(reversal_by_key, "idempotency_key", lambda w: w.auth_key),
        400,
        "original_idempotency_key",
    ),
    *body_cases(
        "increment",
        "POST",
        "/v1/authorizations/{auth_id}/increment",
        increment,
        [*key_cases(), *amount_cases(), ("currency", "USD", "currency")],
    ),
    Case(
        "increment-unknown-authorization",
        "POST",
        "/v1/authorizations/" + fake("AU") + "/increment",
        increment,
        404,
        "auth_id",
    ),
    *body_cases(
        "refund",
        "POST",
        "/v1/refunds",
        refund,
        [
            *key_cases(),
            ("pan", DROP, "pan"),
            ("pan", "1234", "pan"),
            ("pan", lambda w: w.pan[:-1] + str((int(w.pan[-1]) + 1) % 10), "pan"),  # Luhn fails
            ("expiry", DROP, "expiry"),
            ("expiry", "13/30", "expiry"),
            *amount_cases(),
            ("merchant_id", DROP, "merchant_id"),
            ("merchant_id", "", "merchant_id"),
            ("original_transaction_id", 17, "original_transaction_id"),
            ("currency", "USD", "currency"),
        ],
    ),
    Case("refund-unknown-card", "POST", "/v1/refunds", edit(refund, "pan", "6259770199999999"), 404, "pan"),
    Case("refund-another-expiry", "POST", "/v1/refunds", edit(refund, "expiry", "01/99"), 422, "expiry"),
    Case(
        "refund-unknown-purchase",
        "POST",
        "/v1/refunds",
        edit(refund, "original_transaction_id", fake("TX")),
        404,
        "original_transaction_id",
    ),
    Case("refund-more-than-bought", "POST", "/v1/refunds", edit(refund, "amount", 100_001), 422, "amount"),
    *body_cases(
        "clearing",
        "POST",
        "/v1/clearing",
        clearing,
        [
            *key_cases(),
            ("auth_id", DROP, "auth_id"),
            ("auth_id", 17, "auth_id"),
            *amount_cases(),
            ("currency", "usd", "currency"),
            ("currency", "EUR", "currency"),
        ],
    ),
    Case(
        "clearing-unknown-authorization",
        "POST",
        "/v1/clearing",
        edit(clearing, "auth_id", fake("AU")),
        404,
        "auth_id",
    ),
    Case(
        "clearing-not-an-authorization",
        "POST",
        "/v1/clearing",
        edit(clearing, "auth_id", "AU-nope"),
        (400, 404),
        "auth_id",
    ),
    # -- repayments
    *body_cases(
        "repayment",
        "POST",
        "/v1/repayments",
        repayment,
        [
            *key_cases(),
            ("account_id", DROP, "account_id"),
            ("account_id", ["AC"], "account_id"),
            *amount_cases(),
            ("currency", "JPY", "currency"),
        ],
    ),
    Case(
        "repayment-unknown-account",
        "POST",
        "/v1/repayments",
        edit(repayment, "account_id", fake("AC", 2)),
        404,
        "account_id",
    ),
    Case(
        "repayment-not-an-account",
        "POST",
        "/v1/repayments",
        edit(repayment, "account_id", "{customer_id}"),
        404,
        "account_id",
    ),
    # -- installments
    *body_cases(
        "quote",
        "POST",
        "/v1/installments/quote",
        installment_quote,
        [
            ("account_id", DROP, "account_id"),
            *amount_cases(),
            ("terms", DROP, "terms"),
            ("terms", [], "terms"),
            ("terms", 12, "terms"),
            ("terms", [5], "terms"),
            ("terms", ["12"], "terms[0]"),
            ("terms", [0], "terms[0]"),
            ("terms", [3, -6], "terms[1]"),
        ],
    ),
    Case(
        "quote-unknown-account",
        "POST",
        "/v1/installments/quote",
        edit(installment_quote, "account_id", fake("AC")),
        404,
        "account_id",
    ),
    *body_cases(
        "booking",
        "POST",
        "/v1/installments",
        booking,
        [
            *key_cases(),
            ("account_id", DROP, "account_id"),
            ("transaction_id", DROP, "transaction_id"),
            ("terms", DROP, "terms"),
            ("terms", 0, "terms"),
            ("terms", 5, "terms"),
            ("terms", "3", "terms"),
            ("terms", 1000, "terms"),
        ],
    ),
    Case(
        "booking-unknown-account",
        "POST",
        "/v1/installments",
        edit(booking, "account_id", fake("AC")),
        404,
        "account_id",
    ),
    Case(
        "booking-unknown-transaction",
        "POST",
        "/v1/installments",
        edit(booking, "transaction_id", fake("TX")),
        404,
        "transaction_id",
    ),
    Case(
        "plans-unknown-account",
        "GET",
        "/v1/accounts/" + fake("AC") + "/installments",
        None,
        404,
        "account_id",
    ),
    *body_cases("payoff", "POST", "/v1/installments/{plan_id}/payoff", payoff, key_cases()),
    Case("payoff-unknown-plan", "POST", "/v1/installments/" + fake("IP") + "/payoff", payoff, 404, "plan_id"),
    # -- accounting
    Case(
        "balance-unknown-account", "GET", "/v1/accounts/" + fake("AC") + "/balance", None, 404, "account_id"
    ),
    Case("balance-not-an-account", "GET", "/v1/accounts/{card_id}/balance", None, 404, "account_id"),
    Case(
        "transactions-unknown-account",
        "GET",
        "/v1/accounts/" + fake("AC", 2) + "/transactions",
        None,
        404,
        "account_id",
    ),
    Case(
        "transactions-page-of-zero",
        "GET",
        "/v1/accounts/{account_id}/transactions?limit=0",
        None,
        400,
        "limit",
    ),
    Case(
        "transactions-page-too-big",
        "GET",
        "/v1/accounts/{account_id}/transactions?limit=100000",
        None,
        400,
        "limit",
    ),
    Case(
        "transactions-cursor-not-a-transaction-id",
        "GET",
        "/v1/accounts/{account_id}/transactions?cursor=%00",
        None,
        400,
        "cursor",
    ),
    Case(
        "transactions-cursor-of-no-transaction-here",
        "GET",
        "/v1/accounts/{account_id}/transactions?cursor=" + fake("TX"),
        None,
        404,
        "cursor",
    ),
    Case(
        "transactions-page-not-a-number",
        "GET",
        "/v1/accounts/{account_id}/transactions?limit=ten",
        None,
        400,
        "limit",
    ),
    Case(
        "statements-unknown-account",
        "GET",
        "/v1/accounts/" + fake("AC") + "/statements",
        None,
        404,
        "account_id",
    ),
    *body_cases(
        "cycle",
        "POST",
        "/v1/admin/cycle",
        cycle,
        [
            ("business_date", DROP, "business_date"),
            ("business_date", "2024-02-30", "business_date"),
            ("business_date", "31/01/2024", "business_date"),
            ("business_date", 20240131, "business_date"),
        ],
    ),
    Case("trial-balance-without-cell", "GET", "/v1/admin/trial-balance", None, 400, "cell"),
    Case("trial-balance-cell-zero", "GET", "/v1/admin/trial-balance?cell=0", None, 400, "cell"),
    Case("trial-balance-no-such-cell", "GET", "/v1/admin/trial-balance?cell=9", None, 400, "cell"),
    Case("trial-balance-cell-not-a-number", "GET", "/v1/admin/trial-balance?cell=one", None, 400, "cell"),
    # -- routing
    Case("routing-unknown-customer", "GET", "/v1/routing/customers/nobody", None, 404, "customer_id"),
    Case("routing-unknown-card", "GET", "/v1/routing/cards/nothing", None, 404, "card_id"),
    # -- no such endpoint, wrong method
    Case("no-such-endpoint", "GET", "/v1/nothing-here", None, 404, "path"),
    Case("wrong-method", "DELETE", "/v1/cards/{card_id}", None, 405, None),
]


@pytest.fixture(scope="module")
def world(core: CoreStack) -> World:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 100_000)
    planned = purchase(core.client, opened, 60_000)
    response = core.client.post(
        "/v1/installments",
        json={
            "idempotency_key": key(),
            "account_id": opened["account_id"],
            "transaction_id": planned["transaction_id"],
            "terms": 3,
        },
    )
    assert response.status_code in (200, 201), response.text
    hold_key = key()
    hold = approved(core.client, opened, 10_000, idempotency_key=hold_key)
    return World(
        customer_id=opened["customer_id"],
        account_id=opened["account_id"],
        card_id=opened["card_id"],
        pan=opened["pan"],
        expiry=opened["expiry"],
        auth_id=hold["auth_id"],
        auth_key=hold_key,
        transaction_id=cleared["transaction_id"],
        plan_id=response.json()["plan_id"],
    )


class Fingerprints:
    """The last database fingerprint seen: each case compares against the one before it."""

    def __init__(self, core: CoreStack) -> None:
        self.core = core
        self.last = database_fingerprint(core)

    def unchanged(self) -> bool:
        now = database_fingerprint(self.core)
        same = now == self.last
        self.last = now
        return same


@pytest.fixture(scope="module")
def fingerprints(core: CoreStack, world: World) -> Iterator[Fingerprints]:
    yield Fingerprints(core)


def fill(template: str, world: World) -> str:
    return template.format(**world.__dict__)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_bad_input_is_refused_naming_the_field_and_writes_nothing(
    core: CoreStack, world: World, fingerprints: Fingerprints, case: Case
) -> None:
    path = fill(case.path, world)
    kwargs: dict[str, Any] = {}
    if case.body is not None:
        body = case.body(world)
        if isinstance(body, bytes):
            kwargs = {"content": body, "headers": {"content-type": "application/json"}}
        else:
            if isinstance(body, dict):
                body = {
                    k: fill(v, world) if isinstance(v, str) and v.startswith("{") else v
                    for k, v in body.items()
                }
            kwargs = {"json": body}
    response = core.client.request(case.method, path, **kwargs)
    wrote = not fingerprints.unchanged()
    statuses = case.status if isinstance(case.status, tuple) else (case.status,)
    assert response.status_code in statuses, (
        f"{case.method} {path} {kwargs} -> {response.status_code} {response.text}"
    )
    error = response.json()["error"]
    assert set(error) >= {"code", "message", "field"}, error
    assert isinstance(error["code"], str) and error["code"], error
    assert isinstance(error["message"], str) and error["message"], error
    assert error["field"] == case.field, f"{case.method} {path} {kwargs} -> {response.text}"
    assert not wrote, f"{case.method} {path} answered {response.status_code} but wrote"


def test_a_full_pan_never_appears_in_an_error(core: CoreStack, world: World) -> None:
    body = authorization(world)
    body["expiry"] = "13/99"
    response = core.client.post("/v1/authorizations", json=body)
    assert response.status_code == 400
    assert world.pan not in response.text
    body = authorization(world)
    body["pan"] = world.pan[:-1] + str((int(world.pan[-1]) + 1) % 10)
    response = core.client.post("/v1/authorizations", json=body)
    assert response.status_code == 400
    assert body["pan"] not in response.text


def test_an_integer_written_with_a_fraction_of_zero_is_that_integer_and_nothing_else_is(
    core: CoreStack,
) -> None:
    """JSON Schema's integer is any number without a fractional part: 1500.0 and 1.5e3 are the
    amount 1500 (the same request under its idempotency key as 1500), while 1500.5, "1500" and
    true stay refused."""
    opened = open_account(core.client)
    idempotency_key = key()
    body = {
        "idempotency_key": idempotency_key,
        "pan": opened["pan"],
        "expiry": opened["expiry"],
        "amount": 1500,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "m-1",
        "channel": "pos",
    }
    raw = json.dumps({**body, "amount": "AMOUNT"}).replace('"AMOUNT"', "1500.0")
    first = core.client.post("/v1/authorizations", content=raw, headers={"content-type": "application/json"})
    assert first.status_code == 200, first.text
    assert first.json()["approved"] is True
    replayed = core.client.post("/v1/authorizations", json=body)
    assert replayed.status_code == 200 and replayed.json() == first.json()
    exponent = json.dumps({**body, "amount": "AMOUNT"}).replace('"AMOUNT"', "1.5e3")
    again = core.client.post(
        "/v1/authorizations", content=exponent, headers={"content-type": "application/json"}
    )
    assert again.json() == first.json()
    for wrong in (1500.5, "1500", True):
        before = database_fingerprint(core)
        refused = core.client.post(
            "/v1/authorizations", json={**body, "idempotency_key": key(), "amount": wrong}
        )
        assert refused.status_code == 400 and refused.json()["error"]["field"] == "amount", refused.text
        assert database_fingerprint(core) == before
