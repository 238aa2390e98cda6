"""Authenticated clients: every request but the three public probes carries the bearer token of
its client kind (acquirer, channel, operator); no token or a bad one is 401, the wrong kind 403,
and neither writes anything, at the gateway and at an app server reached directly. Tokens rotate
without a restart (two accepted per kind during the change) and never reach a log."""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import pytest
from cardcore.common import ids
from cardcore.platform import auth

from tests import api_auth
from tests.api_auth import ANONYMOUS, write_tokens_file
from tests.cards import database_fingerprint, key, open_account
from tests.fixtures_core import CoreStack
from tests.test_operations import CONTRACT_ENDPOINTS

PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json")}

# CONTRACT: acquirer (authorizations, reversals, clearing, refunds), operator (/v1/admin/*,
# pricing rules, setting limits, tag definitions, /metrics), channel (the rest)
EXPECTED_KIND = {
    ("POST", "/v1/authorizations"): "acquirer",
    ("POST", "/v1/authorizations/{auth_id}/reversal"): "acquirer",
    ("POST", "/v1/authorizations/reversal"): "acquirer",
    ("POST", "/v1/authorizations/{auth_id}/increment"): "acquirer",
    ("POST", "/v1/clearing"): "acquirer",
    ("POST", "/v1/refunds"): "acquirer",
    ("POST", "/v1/admin/cycle"): "operator",
    ("GET", "/v1/admin/trial-balance"): "operator",
    ("POST", "/v1/pricing/rules"): "operator",
    ("GET", "/v1/pricing/rules"): "operator",
    ("POST", "/v1/customers/{customer_id}/limits"): "operator",
    ("POST", "/v1/customers/{customer_id}/limits/temporary"): "operator",
    ("POST", "/v1/tags"): "operator",
    ("GET", "/metrics"): "operator",
}


def concrete(template: str) -> str:
    """A path for a template, with ids of cell 1."""
    values = {
        "{card_id}": ids.new_id(ids.PREFIX_CARD, 1),
        "{customer_id}": ids.new_id(ids.PREFIX_CUSTOMER, 1),
        "{account_id}": ids.new_id(ids.PREFIX_ACCOUNT, 1),
        "{auth_id}": ids.new_id(ids.PREFIX_AUTHORIZATION, 1),
        "{plan_id}": ids.new_id(ids.PREFIX_PLAN, 1),
        "{tag}": "vip",
    }
    for name, value in values.items():
        template = template.replace(name, value)
    return template


def test_every_route_of_the_contract_needs_the_token_of_its_client_kind() -> None:
    for method, template in CONTRACT_ENDPOINTS:
        wanted = None if (method, template) in PUBLIC else EXPECTED_KIND.get((method, template), "channel")
        assert auth.required_kind(method, concrete(template)) == wanted, (method, template)
    for (method, template), kind in EXPECTED_KIND.items():
        assert auth.required_kind(method, concrete(template)) == kind, (method, template)
    # a path no route has still needs a token (then 404), and so does a probe with another method
    assert auth.required_kind("GET", "/nothing/here") == auth.ANY
    assert auth.required_kind("POST", "/healthz") == auth.ANY


def assert_refused(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.request.method, response.request.url, response.text)
    error = response.json()["error"]
    assert error["code"] == ("unauthorized" if status == 401 else "forbidden")
    assert error["field"] == "authorization" and error["message"]
    if status == 401:
        assert response.headers["www-authenticate"].startswith("Bearer")


def test_requests_without_a_token_are_refused_with_401_and_write_nothing(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    bodies: dict[str, Any] = {
        "/v1/applications": {
            "applicant": {
                "name": "李四",
                "id_number": "110101199001019999",
                "mobile": "13800138000",
                "birth_date": "1990-01-01",
                "annual_income": 30_000_000,
            }
        },
        "/v1/authorizations": {
            "idempotency_key": key(),
            "pan": opened["pan"],
            "expiry": opened["expiry"],
            "amount": 100,
            "currency": "CNY",
            "mcc": "5411",
            "merchant_id": "M1",
            "channel": "pos",
            "kind": "purchase",
        },
        "/v1/repayments": {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 100},
        "/v1/admin/cycle": {"business_date": "2030-01-01"},
        "/v1/tags": {"tag": "intruder", "description": "should not exist"},
        "/v1/pricing/rules": {"layer": "product", "product_code": "STD", "name": "x", "param": "apr"},
    }
    with core.anonymous_client() as anonymous:
        for method, template in CONTRACT_ENDPOINTS:
            if (method, template) in PUBLIC:
                continue
            path = concrete(template)
            body = bodies.get(template, {}) if method in ("POST", "PUT") else None
            assert_refused(anonymous.request(method, path, json=body), 401)
        # an unknown route too: nothing says whether it exists
        assert_refused(anonymous.get("/v1/no-such-thing"), 401)
        # a malformed header, a token that is not one, another scheme, two headers
        for value in ("Bearer", "Basic dXNlcjpwYXNz", f"Bearer {api_auth.bad_token()}", "bearer x y"):
            response = anonymous.post(
                "/v1/repayments", json=bodies["/v1/repayments"], headers={"authorization": value}
            )
            assert_refused(response, 401)
        doubled = anonymous.post(
            "/v1/repayments",
            json=bodies["/v1/repayments"],
            headers=[("authorization", f"Bearer {core.api_tokens['channel']}")] * 2,
        )
        assert_refused(doubled, 401)
        # the probes answer anyone
        for method, path in PUBLIC:
            assert anonymous.request(method, path).status_code == 200, path
    assert database_fingerprint(core) == before


def test_a_token_of_the_wrong_kind_is_refused_with_403_and_writes_nothing(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    tokens = core.api_tokens

    def send(kind: str, method: str, path: str, body: Any = None) -> httpx.Response:
        headers = {"authorization": f"Bearer {tokens[kind]}"}
        return core.client.request(method, path, json=body, headers=headers)

    authorization = {
        "idempotency_key": key(),
        "pan": opened["pan"],
        "expiry": opened["expiry"],
        "amount": 100,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "M1",
        "channel": "pos",
        "kind": "purchase",
    }
    repayment = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 100}
    cases = [
        ("channel", "POST", "/v1/authorizations", authorization),  # a mobile app cannot authorize
        ("operator", "POST", "/v1/authorizations", authorization),
        ("acquirer", "POST", "/v1/repayments", repayment),  # an acquirer cannot move a customer's money
        ("channel", "POST", "/v1/admin/cycle", {"business_date": "2030-01-01"}),
        ("acquirer", "POST", "/v1/tags", {"tag": "intruder", "description": "no"}),
        ("channel", "POST", f"/v1/customers/{opened['customer_id']}/limits", {"line": "total", "limit": 1}),
        ("channel", "GET", "/metrics", None),
        ("acquirer", "GET", f"/v1/cards/{opened['card_id']}", None),
        ("operator", "POST", f"/v1/cards/{opened['card_id']}/status", {"status": "lost"}),
    ]
    for kind, method, path, body in cases:
        assert_refused(send(kind, method, path, body), 403)
    assert database_fingerprint(core) == before
    # and each of them works with the right one
    assert send("acquirer", "POST", "/v1/authorizations", authorization).json()["approved"] is True
    assert send("operator", "GET", "/metrics", None).status_code == 200


def test_an_app_server_reached_directly_checks_the_token_too(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    app = core.apps[0].url
    body = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 100}
    with httpx.Client(base_url=app, timeout=10.0, auth=ANONYMOUS) as direct:
        assert_refused(direct.post("/v1/repayments", json=body), 401)
        wrong = {"authorization": f"Bearer {core.api_tokens['acquirer']}"}
        assert_refused(direct.post("/v1/repayments", json=body, headers=wrong), 403)
        assert direct.get("/readyz").status_code == 200
    assert database_fingerprint(core) == before


def test_tokens_rotate_without_a_restart_two_accepted_during_the_change(core_factory: Any) -> None:
    stack: CoreStack = core_factory()
    app = stack.start_app([1, 2])
    stack.start_gateway({1: [app.url], 2: [app.url]})
    old = dict(stack.api_tokens)
    new = api_auth.new_tokens()
    pids = [app.process.pid, stack.gateway.process.pid] if stack.gateway else []

    def status_with(token: str) -> int:
        with httpx.Client(base_url=stack.url, timeout=10.0, auth=ANONYMOUS) as client:
            return client.get("/v1/products", headers={"authorization": f"Bearer {token}"}).status_code

    def eventually(check: Any, what: str, timeout_s: float = 10.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not check():
            assert time.monotonic() < deadline, what
            time.sleep(0.2)

    assert status_with(old["channel"]) == 200 and status_with(new["channel"]) == 401
    # the change begins: both accepted
    write_tokens_file(stack.tokens_file, {kind: [new[kind], old[kind]] for kind in auth.KINDS})
    eventually(lambda: status_with(new["channel"]) == 200, "the new token was not accepted")
    assert status_with(old["channel"]) == 200
    # clients moved over: the old one is retired
    write_tokens_file(stack.tokens_file, {kind: [new[kind]] for kind in auth.KINDS})
    eventually(lambda: status_with(old["channel"]) == 401, "the old token was still accepted")
    assert status_with(new["channel"]) == 200
    # a broken file keeps the last good set rather than opening or closing the door
    stack.tokens_file.write_text("{not json")
    time.sleep(2.5)
    assert status_with(new["channel"]) == 200 and status_with(old["channel"]) == 401
    assert [app.process.pid, stack.gateway.process.pid if stack.gateway else None] == pids
    assert all(server.process.poll() is None for server in (app, stack.gateway) if server)
    # tokens never reach a log
    logs = app.log() + (stack.gateway.log() if stack.gateway else "")
    for token in (*old.values(), *new.values()):
        assert token not in logs


def test_servers_refuse_to_start_without_a_readable_tokens_file(core_factory: Any) -> None:
    stack: CoreStack = core_factory()
    config = stack.app_config([1], api_tokens_file=str(stack.workdir / "missing.json"))
    path = stack.workdir / "app-no-tokens.json"
    path.write_text(json.dumps(config))
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "cardcore", "--config", str(path)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode != 0 and "missing.json" in result.stderr


@pytest.mark.parametrize("kind", auth.KINDS)
def test_a_token_is_accepted_as_its_own_kind_only(kind: str) -> None:
    tokens = api_auth.new_tokens()
    ring = auth.TokenRing(auth.TokensFile(**auth.digests_document({k: [v] for k, v in tokens.items()})))
    assert ring.kind_of(tokens[kind].encode()) == kind
    assert ring.kind_of(tokens[kind].encode() + b"x") is None
    assert ring.kind_of(b"") is None
