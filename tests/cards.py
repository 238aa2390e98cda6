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
    result["id_number"] = body["applicant"]["id_number"]  # the test's own record, not the answer's
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
    if body["channel"] == "online" and "cvv2" not in body and card.get("cvv2"):
        body["cvv2"] = card["cvv2"]  # card not present: the CVV2 printed on the card
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


def customers_in_each_cell(client: httpx.Client, cells: int = 2) -> dict[int, dict[str, Any]]:
    """One opened account (active card) per cell, keyed by cell: applicants are hashed to cells."""
    found: dict[int, dict[str, Any]] = {}
    for _ in range(40):
        opened = open_account(client)
        found.setdefault(opened["cell"], opened)
        if len(found) == cells:
            return found
    raise AssertionError(f"applicants landed only in cells {sorted(found)}")


WRITTEN_TABLES = (
    "customers",
    "accounts",
    "cards",
    "lines",
    "temporary_raises",
    "authorizations",
    "journal_entries",
    "postings",
    "balances",
    "transactions",
    "idempotency",
    "installment_plans",
    "statements",
    "cycle_runs",
    "business_clock",
    "tag_definitions",
    "customer_tags",
    "pricing_rules",
)


def database_fingerprint(stack: Any) -> dict[int, dict[str, str]]:
    """Per cell and table, a digest of every row: equal fingerprints mean nothing was written.

    ``stack`` is a ``tests.fixtures_core.CoreStack``; the cells are read concurrently."""
    import asyncio

    import asyncpg

    query = " UNION ALL ".join(
        f"SELECT '{table}', md5(coalesce(string_agg(t::text, '|' ORDER BY t::text), '')) FROM {table} t"
        for table in WRITTEN_TABLES
    )

    async def one(cell: int) -> dict[str, str]:
        conn = await asyncpg.connect(stack.postgres.dsn(stack.databases[cell]))
        try:
            return {row[0]: row[1] for row in await conn.fetch(query)}
        finally:
            await conn.close()

    async def every() -> dict[int, dict[str, str]]:
        cells = range(1, stack.cell_count + 1)
        return dict(zip(cells, await asyncio.gather(*(one(cell) for cell in cells)), strict=True))

    return asyncio.run(every())


def reverse(client: httpx.Client, auth_id: str, amount: int | None = None) -> httpx.Response:
    """Reverse all (``amount`` None) or part of a hold."""
    body: dict[str, Any] = {"idempotency_key": key()}
    if amount is not None:
        body["amount"] = amount
    return client.post(f"/v1/authorizations/{auth_id}/reversal", json=body)


def book_installment(
    client: httpx.Client, account_id: str, transaction_id: str, terms: int
) -> httpx.Response:
    return client.post(
        "/v1/installments",
        json={
            "idempotency_key": key(),
            "account_id": account_id,
            "transaction_id": transaction_id,
            "terms": terms,
        },
    )


def assert_books_balance(client: httpx.Client, cells: tuple[int, ...] = (1, 2)) -> None:
    """Every journal entry balances, balances match postings and line holds match open holds."""
    for cell in cells:
        books = trial_balance(client, cell)
        assert books["cell"] == cell, books
        assert books["balanced"] is True, books
        assert books["debits"] == books["credits"], books
        assert books["entries_unbalanced"] == 0, books
        assert books["balances_match_postings"] is True, books
        assert books["holds_match_lines"] is True, books
