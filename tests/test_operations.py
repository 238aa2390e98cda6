"""Operations: liveness, readiness, Prometheus metrics and the OpenAPI description."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from jsonschema import Draft202012Validator
from openapi_spec_validator import validate

from tests.cards import approved, authorize, open_account
from tests.fixtures_core import CoreStack, spawn_server
from watertight.pg import free_port

CONTRACT_ENDPOINTS = [
    ("GET", "/v1/products"),
    ("POST", "/v1/applications"),
    ("GET", "/v1/cards/{card_id}"),
    ("POST", "/v1/cards/{card_id}/activate"),
    ("POST", "/v1/cards/{card_id}/status"),
    ("POST", "/v1/cards/{card_id}/replace"),
    ("GET", "/v1/customers/{customer_id}"),
    ("GET", "/v1/customers/{customer_id}/limits"),
    ("POST", "/v1/customers/{customer_id}/limits/temporary"),
    ("POST", "/v1/customers/{customer_id}/limits"),
    ("POST", "/v1/authorizations"),
    ("POST", "/v1/authorizations/{auth_id}/reversal"),
    ("POST", "/v1/clearing"),
    ("POST", "/v1/authorizations/reversal"),
    ("POST", "/v1/authorizations/{auth_id}/increment"),
    ("POST", "/v1/refunds"),
    ("POST", "/v1/repayments"),
    ("POST", "/v1/installments/quote"),
    ("POST", "/v1/installments"),
    ("GET", "/v1/accounts/{account_id}/installments"),
    ("POST", "/v1/installments/{plan_id}/payoff"),
    ("GET", "/v1/accounts/{account_id}/balance"),
    ("GET", "/v1/accounts/{account_id}/transactions"),
    ("GET", "/v1/accounts/{account_id}/statements"),
    ("POST", "/v1/admin/cycle"),
    ("GET", "/v1/admin/trial-balance"),
    ("GET", "/v1/customers/{customer_id}/tags"),
    ("PUT", "/v1/customers/{customer_id}/tags/{tag}"),
    ("DELETE", "/v1/customers/{customer_id}/tags/{tag}"),
    ("POST", "/v1/tags"),
    ("GET", "/v1/tags/{tag}/customers"),
    ("POST", "/v1/pricing/rules"),
    ("GET", "/v1/pricing/rules"),
    ("GET", "/v1/routing/customers/{customer_id}"),
    ("GET", "/v1/routing/cards/{card_id}"),
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
]

# the fields the contract names in each request body
CONTRACT_BODIES = {
    ("POST", "/v1/applications"): {"applicant", "product_code"},
    ("POST", "/v1/cards/{card_id}/status"): {"status"},
    ("POST", "/v1/customers/{customer_id}/limits/temporary"): {"line", "amount", "expires_at"},
    ("POST", "/v1/customers/{customer_id}/limits"): {"line", "limit"},
    ("POST", "/v1/authorizations"): {
        "idempotency_key",
        "pan",
        "expiry",
        "amount",
        "currency",
        "mcc",
        "merchant_id",
        "channel",
        "kind",
    },
    ("POST", "/v1/authorizations/{auth_id}/reversal"): {"idempotency_key", "amount"},
    ("POST", "/v1/clearing"): {"idempotency_key", "auth_id", "amount"},
    ("POST", "/v1/authorizations/reversal"): {"idempotency_key", "original_idempotency_key", "amount"},
    ("POST", "/v1/authorizations/{auth_id}/increment"): {"idempotency_key", "amount"},
    ("POST", "/v1/refunds"): {
        "idempotency_key",
        "pan",
        "expiry",
        "amount",
        "merchant_id",
        "original_transaction_id",
    },
    ("POST", "/v1/repayments"): {"idempotency_key", "account_id", "amount"},
    ("POST", "/v1/installments/quote"): {"account_id", "amount", "terms"},
    ("POST", "/v1/installments"): {"idempotency_key", "account_id", "transaction_id", "terms"},
    ("POST", "/v1/installments/{plan_id}/payoff"): {"idempotency_key"},
    ("POST", "/v1/admin/cycle"): {"business_date"},
    ("POST", "/v1/tags"): {"tag", "description", "rule"},
    ("POST", "/v1/pricing/rules"): {"layer"},
}

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)$")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def samples(text: str) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample in a Prometheus text exposition."""
    found = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        match = _SAMPLE.match(line)
        assert match, f"not a Prometheus sample: {line!r}"
        name, labels, value = match.groups()
        found.append((name, dict(_LABEL.findall(labels or "")), float(value)))
    return found


def total(text: str, name: str, **labels: str) -> float:
    return sum(
        value
        for sample, found, value in samples(text)
        if sample == name and all(found.get(k) == v for k, v in labels.items())
    )


def scrape(url: str) -> str:
    response = httpx.get(url + "/metrics", timeout=10)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    return response.text


# ---- liveness and readiness ---------------------------------------------------------------------


def test_healthz_says_the_process_is_alive(core: CoreStack) -> None:
    response = core.client.get("/healthz")
    assert response.status_code == 200, response.text
    for app in core.apps:
        assert httpx.get(app.url + "/healthz").status_code == 200


def test_readyz_says_which_cells_can_be_served(core: CoreStack) -> None:
    response = core.client.get("/readyz")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True
    assert {cell: value["ready"] for cell, value in body["cells"].items()} == {"1": True, "2": True}
    app = httpx.get(core.apps[0].url + "/readyz").json()
    assert app["ready"] is True
    assert set(app["cells"]) == {"1", "2"}


def test_readyz_is_503_while_no_cell_can_be_served_and_healthz_stays_200(
    core_factory: Callable[[], CoreStack],
) -> None:
    stack = core_factory()
    config = stack.app_config([1, 2])
    for cell in config["cells"].values():  # a database nobody listens for
        cell["dsn"] = f"postgresql://nobody@127.0.0.1:{free_port()}/nothing"
    app = spawn_server("app-without-database", "cardcore", config, stack.workdir, "/healthz")
    stack.apps.append(app)
    response = httpx.get(app.url + "/readyz", timeout=5)
    assert response.status_code == 503, response.text
    assert response.json()["ready"] is False
    assert httpx.get(app.url + "/healthz", timeout=5).status_code == 200


# ---- metrics ------------------------------------------------------------------------------------


def test_metrics_count_requests_by_route_cell_site_and_outcome(core: CoreStack) -> None:
    opened = open_account(core.client)
    cell = str(opened["cell"])
    before = scrape(core.url)
    approved(core.client, opened, 1_000)
    core.client.get(f"/v1/cards/{opened['card_id']}")
    assert core.client.get("/v1/cards/" + opened["card_id"][:4] + "A" * 16).status_code == 404
    after = scrape(core.url)
    name = "watertight_requests_total"
    for route, outcome in [
        ("/v1/authorizations", "2xx"),
        ("/v1/cards/{card_id}", "2xx"),
        ("/v1/cards/{card_id}", "4xx"),
    ]:
        labels = {"route": route, "cell": cell, "site": "prod", "outcome": outcome}
        assert total(after, name, **labels) - total(before, name, **labels) == 1, (route, outcome)
    assert any(s == "watertight_request_seconds_bucket" for s, _, _ in samples(after)), "latency histogram"
    assert opened["pan"] not in after


def test_metrics_count_authorization_decisions_by_response_code(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = scrape(core.url)
    approved(core.client, opened, 1_000)
    assert authorize(core.client, opened, 100_000_000).json()["response_code"] == "61"
    assert authorize(core.client, opened, 1_000, mcc="7995").json()["response_code"] == "57"
    after = scrape(core.url)
    for code in ("00", "61", "57"):
        grew = [
            value - total(before, name, **labels)
            for name, labels, value in samples(after)
            if labels.get("response_code") == code
        ]
        assert grew and max(grew) >= 1, f"no counter of decisions with response_code {code} grew"


def test_each_app_server_counts_requests_and_authorization_decisions(core: CoreStack) -> None:
    opened = open_account(core.client)
    cell = str(opened["cell"])
    app_url = core.apps[0].url
    before = scrape(app_url)
    approved(core.client, opened, 1_000)
    assert authorize(core.client, opened, 100_000_000).json()["response_code"] == "61"
    after = scrape(app_url)
    requests = {"route": "/v1/authorizations", "cell": cell, "site": "prod", "outcome": "2xx"}
    name = "watertight_requests_total"
    assert total(after, name, **requests) - total(before, name, **requests) == 2
    decisions = "watertight_authorizations_total"
    for code in ("00", "61"):
        labels = {"cell": cell, "site": "prod", "response_code": code}
        assert total(after, decisions, **labels) - total(before, decisions, **labels) == 1, code


# ---- OpenAPI ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def openapi(core: CoreStack) -> dict[str, Any]:
    response = core.client.get("/openapi.json")
    assert response.status_code == 200, response.text
    document: dict[str, Any] = response.json()
    return document


def test_openapi_is_a_valid_openapi_3_1_document(openapi: dict[str, Any]) -> None:
    assert openapi["openapi"].startswith("3.1")
    validate(openapi)


@pytest.mark.parametrize(
    ("method", "path"), CONTRACT_ENDPOINTS, ids=[f"{m} {p}" for m, p in CONTRACT_ENDPOINTS]
)
def test_openapi_describes_every_endpoint_of_the_contract(
    openapi: dict[str, Any], method: str, path: str
) -> None:
    assert path in openapi["paths"], f"{path} is not described"
    assert method.lower() in openapi["paths"][path], f"{method} {path} is not described"


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        *_, name = schema["$ref"].split("/")
        schema = document["components"]["schemas"][name]
    return schema


@pytest.mark.parametrize(
    ("method", "path"), list(CONTRACT_BODIES), ids=[f"{m} {p}" for m, p in CONTRACT_BODIES]
)
def test_openapi_names_the_contract_fields_of_each_request_body(
    openapi: dict[str, Any], method: str, path: str
) -> None:
    operation = openapi["paths"][path][method.lower()]
    schema = resolve(openapi, operation["requestBody"]["content"]["application/json"]["schema"])
    assert CONTRACT_BODIES[(method, path)] <= set(schema["properties"]), schema


def body_validator(document: dict[str, Any], method: str, path: str) -> Draft202012Validator:
    """A JSON Schema validator for the request body of one operation of ``document``."""
    schema = document["paths"][path][method.lower()]["requestBody"]["content"]["application/json"]["schema"]
    defs = json.loads(
        json.dumps(document["components"]["schemas"]).replace("#/components/schemas/", "#/$defs/")
    )
    return Draft202012Validator(
        {**json.loads(json.dumps(schema).replace("#/components/schemas/", "#/$defs/")), "$defs": defs},
        format_checker=Draft202012Validator.FORMAT_CHECKER,
    )


PRODUCT_RULE = {
    "layer": "product",
    "name": "n",
    "product_code": "STD",
    "price": {"item": "apr", "value": 0.15},
}
AUTHORIZATION = {
    "idempotency_key": "k",
    "pan": "6259770100000002",
    "expiry": "12/30",
    "amount": 100,
    "mcc": "5411",
    "merchant_id": "m",
    "channel": "pos",
}
# bodies the server refuses with 400 for what a JSON Schema can say: the description says it too
SCHEMA_REFUSES = [
    (
        "POST",
        "/v1/pricing/rules",
        {**PRODUCT_RULE, "price": {"item": "apr", "value": 0.1, "multiplier": 0.5}},
    ),
    (
        "POST",
        "/v1/pricing/rules",
        {**PRODUCT_RULE, "price": {"item": "apr", "value": None, "multiplier": None}},
    ),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "price": {"item": "apr", "value": 11}}),
    (
        "POST",
        "/v1/pricing/rules",
        {**PRODUCT_RULE, "price": {"item": "installment_fee_rate", "value": 0.1, "terms": 5}},
    ),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "product_code": None}),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "conditions": {}}),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "layer": "account"}),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "valid_from": "2030-01-01T00:00:00"}),
    ("POST", "/v1/authorizations", {**AUTHORIZATION, "pan": "625977010000002"}),
    ("POST", "/v1/authorizations", {**AUTHORIZATION, "channel": "online"}),
    ("POST", "/v1/authorizations", {**AUTHORIZATION, "currency": "USD"}),
    ("POST", "/v1/clearing", {"idempotency_key": "k", "auth_id": "AU-nope", "amount": 1}),
    (
        "POST",
        "/v1/refunds",
        {
            "idempotency_key": "k",
            "pan": "6259770100000002000",
            "expiry": "12/30",
            "amount": 1,
            "merchant_id": "m",
        },
    ),
]
SCHEMA_ACCEPTS = [
    ("POST", "/v1/pricing/rules", PRODUCT_RULE),
    (
        "POST",
        "/v1/pricing/rules",
        {**PRODUCT_RULE, "price": {"item": "apr", "value": None, "multiplier": 0.5}},
    ),
    ("POST", "/v1/pricing/rules", {**PRODUCT_RULE, "layer": "transaction", "conditions": {"kind": "cash"}}),
    ("POST", "/v1/authorizations", AUTHORIZATION),
    ("POST", "/v1/authorizations", {**AUTHORIZATION, "channel": "online", "cvv2": "123", "amount": 100.0}),
]


@pytest.mark.parametrize(("method", "path", "body"), SCHEMA_REFUSES, ids=[str(b) for *_, b in SCHEMA_REFUSES])
def test_openapi_says_what_the_server_refuses_where_a_schema_can_say_it(
    openapi: dict[str, Any], core: CoreStack, method: str, path: str, body: dict[str, Any]
) -> None:
    assert not body_validator(openapi, method, path).is_valid(body), body
    response = core.client.request(method, path, json=body)
    assert response.status_code in (400, 404), response.text  # (an id not of this core: 404)


@pytest.mark.parametrize(("method", "path", "body"), SCHEMA_ACCEPTS, ids=[str(b) for *_, b in SCHEMA_ACCEPTS])
def test_openapi_accepts_the_bodies_the_server_takes(
    openapi: dict[str, Any], method: str, path: str, body: dict[str, Any]
) -> None:
    errors = [error.message for error in body_validator(openapi, method, path).iter_errors(body)]
    assert errors == [], body


@pytest.mark.parametrize(
    ("component", "field", "words"),
    [
        ("AuthorizationRequest", "pan", "Luhn"),
        ("TemporaryRaiseRequest", "expires_at", "future"),
        ("Applicant", "birth_date", "past"),
        ("ReversalByKeyRequest", "original_idempotency_key", "idempotency_key"),
    ],
)
def test_openapi_describes_what_no_schema_can_say_in_the_field(
    openapi: dict[str, Any], component: str, field: str, words: str
) -> None:
    assert words in json.dumps(openapi["components"]["schemas"][component]["properties"][field])
