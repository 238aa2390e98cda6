"""Small steps of card traffic shared by the tests: open an account, authorize, clear, repay."""

from __future__ import annotations

import itertools
import random
import uuid
from typing import Any

import httpx

_id_numbers = itertools.count(random.randrange(10**6))


def key() -> str:
    return uuid.uuid4().hex


def new_id_number() -> str:
    """A fresh 18-character national id (digits), unique within the test session."""
    return f"1101011990{next(_id_numbers):08d}"


def apply(
    client: httpx.Client, annual_income: int = 30_000_000, birth_date: str = "1990-01-01", **extra: Any
) -> dict[str, Any]:
    body = {
        "applicant": {
            "name": "张三",
            "id_number": new_id_number(),
            "mobile": "13800138000",
            "birth_date": birth_date,
            "annual_income": annual_income,
        },
        **extra,
    }
    response = client.post("/v1/applications", json=body)
    assert response.status_code == 201, response.text
    result: dict[str, Any] = response.json()
    return result


def open_account(client: httpx.Client, activate: bool = True, **kwargs: Any) -> dict[str, Any]:
    """An approved customer with (by default) an active card; the answer of the application."""
    opened = apply(client, **kwargs)
    assert opened["decision"] == "approved", opened
    if activate:
        response = client.post(f"/v1/cards/{opened['card_id']}/activate")
        assert response.status_code == 200, response.text
    return opened


def authorize(client: httpx.Client, card: dict[str, Any], amount: int, **overrides: Any) -> httpx.Response:
    body = {
        "idempotency_key": key(),
        "pan": card["pan"],
        "expiry": card["expiry"],
        "amount": amount,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "M-0001",
        "channel": "pos",
        "kind": "purchase",
        **overrides,
    }
    return client.post("/v1/authorizations", json=body)


def approved(client: httpx.Client, card: dict[str, Any], amount: int, **overrides: Any) -> dict[str, Any]:
    response = authorize(client, card, amount, **overrides)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["approved"], answer
    return answer


def clear(client: httpx.Client, auth_id: str, amount: int) -> dict[str, Any]:
    response = client.post(
        "/v1/clearing", json={"idempotency_key": key(), "auth_id": auth_id, "amount": amount}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def purchase(client: httpx.Client, card: dict[str, Any], amount: int) -> dict[str, Any]:
    """Authorize and clear one purchase; the clearing answer."""
    return clear(client, approved(client, card, amount)["auth_id"], amount)


def repay(client: httpx.Client, account_id: str, amount: int) -> dict[str, Any]:
    response = client.post(
        "/v1/repayments", json={"idempotency_key": key(), "account_id": account_id, "amount": amount}
    )
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def lines(client: httpx.Client, customer_id: str) -> dict[str, dict[str, int]]:
    response = client.get(f"/v1/customers/{customer_id}/limits")
    assert response.status_code == 200, response.text
    return {line["line"]: line for line in response.json()["lines"]}


def trial_balance(client: httpx.Client, cell: int) -> dict[str, Any]:
    response = client.get(f"/v1/admin/trial-balance?cell={cell}")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result
