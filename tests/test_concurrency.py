"""Parallel traffic: the group commit never approves beyond a line, and the books stay balanced."""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    authorize,
    customers_in_each_cell,
    key,
    lines,
    open_account,
    purchase,
)
from tests.fixtures_core import CoreStack, in_parallel, new_stack
from watertight.pg import PostgresServer

LIMIT = 9_000_000
CASH_LIMIT = LIMIT // 2
THREADS = 32


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def answers_of(responses: list[httpx.Response]) -> list[dict[str, Any]]:
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return [r.json() for r in responses]


def assert_within_every_line(view: dict[str, dict[str, int]]) -> None:
    for line, row in view.items():
        assert row["available"] >= 0, view
        assert row["held"] + row["used"] <= row["limit"] + row["temporary"], (line, view)
    for child in ("purchase", "cash", "installment"):
        assert view[child]["available"] <= view["total"]["available"], view


def test_two_hundred_parallel_purchases_approve_exactly_what_the_line_holds(core: CoreStack) -> None:
    opened = open_account(core.client)
    calls = [lambda c: authorize(c, opened, 100_000) for _ in range(200)]
    answers = answers_of(in_parallel(core, calls))
    granted = [a for a in answers if a["approved"]]
    assert len(granted) == LIMIT // 100_000
    assert {a["response_code"] for a in answers if not a["approved"]} == {"51"}
    assert len({a["auth_id"] for a in answers}) == 200
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == LIMIT
    assert view["total"]["available"] == 0
    assert_within_every_line(view)
    held = core.psql(
        opened["cell"],
        "SELECT count(*), coalesce(sum(hold_fen), 0)::bigint FROM authorizations WHERE account_id = $1 AND status = 'open'",
        opened["account_id"],
    )[0]
    assert (held[0], held[1]) == (90, LIMIT)


def test_parallel_cash_and_purchases_respect_the_cash_line_and_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    calls = [lambda c: authorize(c, opened, 100_000, kind="cash", channel="atm", mcc="6011")] * 100
    calls += [lambda c: authorize(c, opened, 100_000)] * 100
    random.Random(7).shuffle(calls)
    answers = answers_of(in_parallel(core, calls))
    view = lines(core.client, opened["customer_id"])
    granted = sum(a["approved"] for a in answers)
    assert granted == LIMIT // 100_000
    assert view["cash"]["held"] <= CASH_LIMIT
    assert view["cash"]["held"] + view["purchase"]["held"] == LIMIT
    assert_within_every_line(view)


def test_parallel_clearings_reversals_and_new_holds_on_one_account_stay_within_the_line(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    holds = [approved(core.client, opened, 100_000)["auth_id"] for _ in range(60)]

    def clear(client: httpx.Client, auth_id: str) -> httpx.Response:
        return client.post(
            "/v1/clearing", json={"idempotency_key": key(), "auth_id": auth_id, "amount": 100_000}
        )

    def reverse(client: httpx.Client, auth_id: str) -> httpx.Response:
        return client.post(f"/v1/authorizations/{auth_id}/reversal", json={"idempotency_key": key()})

    calls: list[Any] = [lambda c, a=a: clear(c, a) for a in holds[:30]]
    calls += [lambda c, a=a: reverse(c, a) for a in holds[30:]]
    calls += [lambda c: authorize(c, opened, 100_000)] * 60
    random.Random(11).shuffle(calls)
    responses = in_parallel(core, calls)
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    new = [r.json() for r in responses if "approved" in r.json()]
    assert len(new) == 60
    granted = sum(a["approved"] for a in new)
    assert {a["response_code"] for a in new if not a["approved"]} <= {"51"}
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["used"] == 3_000_000
    assert view["purchase"]["held"] == granted * 100_000
    assert view["total"]["available"] == LIMIT - 3_000_000 - granted * 100_000
    assert_within_every_line(view)


def test_parallel_traffic_on_many_accounts_in_both_cells_is_all_approved_and_counted(core: CoreStack) -> None:
    accounts = list(customers_in_each_cell(core.client).values())
    accounts += [open_account(core.client) for _ in range(8)]
    calls = [lambda c, o=o: authorize(c, o, 50_000) for o in accounts for _ in range(10)]
    random.Random(3).shuffle(calls)
    answers = answers_of(in_parallel(core, calls))
    assert all(a["approved"] for a in answers)
    for opened in accounts:
        view = lines(core.client, opened["customer_id"])
        assert view["purchase"]["held"] == 500_000
        assert view["total"]["available"] == LIMIT - 500_000


# ---- two app servers writing the same cells -----------------------------------------------------


@pytest.fixture(scope="module")
def two_apps(postgres: PostgresServer) -> Iterator[CoreStack]:
    """Two app servers serving both cells behind one gateway (round-robin between them)."""
    stack = new_stack(postgres)
    try:
        first = stack.start_app([1, 2])
        second = stack.start_app([1, 2])
        stack.start_gateway({1: [first.url, second.url], 2: [first.url, second.url]})
        yield stack
    finally:
        stack.close()


def test_two_app_servers_never_approve_beyond_the_line_of_one_account(two_apps: CoreStack) -> None:
    opened = open_account(two_apps.client)
    calls = [lambda c: authorize(c, opened, 100_000) for _ in range(150)]
    answers = answers_of(in_parallel(two_apps, calls))
    assert sum(a["approved"] for a in answers) == LIMIT // 100_000
    view = lines(two_apps.client, opened["customer_id"])
    assert view["purchase"]["held"] == LIMIT
    assert_within_every_line(view)
    assert_books_balance(two_apps.client)


def test_retries_of_one_authorization_through_two_app_servers_get_one_answer_and_hold_once(
    two_apps: CoreStack,
) -> None:
    opened = open_account(two_apps.client)
    for _ in range(5):
        body = {
            "idempotency_key": key(),
            "pan": opened["pan"],
            "expiry": opened["expiry"],
            "amount": 10_000,
            "currency": "CNY",
            "mcc": "5411",
            "merchant_id": "M-0001",
            "channel": "pos",
            "kind": "purchase",
        }
        calls = [lambda c, body=body: c.post("/v1/authorizations", json=body)] * 16
        answers = answers_of(in_parallel(two_apps, calls, threads=16))
        assert all(a == answers[0] for a in answers), answers
        assert answers[0]["approved"] is True
    view = lines(two_apps.client, opened["customer_id"])
    assert view["purchase"]["held"] == 5 * 10_000
    assert_books_balance(two_apps.client)


def test_retries_of_one_repayment_through_two_app_servers_get_one_answer_and_post_once(
    two_apps: CoreStack,
) -> None:
    opened = open_account(two_apps.client)
    purchase(two_apps.client, opened, 1_000_000)
    for _ in range(5):
        body = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 10_000}
        calls = [lambda c, body=body: c.post("/v1/repayments", json=body)] * 16
        responses = in_parallel(two_apps, calls, threads=16)
        assert {r.status_code for r in responses} == {200}, [
            r.text for r in responses if r.status_code != 200
        ]
        assert len({r.content for r in responses}) == 1
    assert lines(two_apps.client, opened["customer_id"])["purchase"]["used"] == 1_000_000 - 5 * 10_000
    assert_books_balance(two_apps.client)
