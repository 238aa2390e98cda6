"""Idempotency keys: a retried financial request returns its first answer and changes nothing."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    key,
    lines,
    open_account,
    purchase,
)
from tests.fixtures_core import CoreStack, in_parallel


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def authorization_body(
    opened: dict[str, Any], amount: int, idempotency_key: str, **extra: Any
) -> dict[str, Any]:
    return {
        "idempotency_key": idempotency_key,
        "pan": opened["pan"],
        "expiry": opened["expiry"],
        "amount": amount,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "M-0001",
        "channel": "pos",
        "kind": "purchase",
        **extra,
    }


def count(core: CoreStack, opened: dict[str, Any], table: str) -> int:
    """Rows of the account in ``authorizations`` or ``postings`` (through their journal entries)."""
    if table == "postings":
        sql = (
            "SELECT count(*) FROM postings p JOIN journal_entries e USING (entry_id) WHERE e.account_id = $1"
        )
    else:
        sql = f"SELECT count(*) FROM {table} WHERE account_id = $1"
    return int(core.psql(opened["cell"], sql, opened["account_id"])[0][0])


def reused(response: httpx.Response) -> None:
    assert response.status_code == 409, response.text
    assert response.json()["error"]["field"] == "idempotency_key"


def twice(post: Callable[[], httpx.Response]) -> httpx.Response:
    first, second = post(), post()
    assert second.status_code == first.status_code
    assert second.json() == first.json()
    return first


# ---- the same key and body: the first answer again ----------------------------------------------


def test_a_retried_authorization_returns_the_same_answer_and_holds_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    body = authorization_body(opened, 123_400, key())
    first = twice(lambda: core.client.post("/v1/authorizations", json=body))
    assert first.json()["approved"] is True
    assert count(core, opened, "authorizations") == 1
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 123_400


def test_a_retried_decline_is_replayed_even_after_the_card_was_activated(core: CoreStack) -> None:
    opened = open_account(core.client, activate=False)
    body = authorization_body(opened, 10_000, key())
    first = core.client.post("/v1/authorizations", json=body)
    assert first.json()["response_code"] == "05"
    assert core.client.post(f"/v1/cards/{opened['card_id']}/activate").status_code == 200
    again = core.client.post("/v1/authorizations", json=body)
    assert again.json() == first.json()
    assert count(core, opened, "authorizations") == 1
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 0


def test_a_retried_clearing_posts_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 200_000)
    body = {"idempotency_key": key(), "auth_id": auth["auth_id"], "amount": 200_000}
    twice(lambda: core.client.post("/v1/clearing", json=body))
    assert count(core, opened, "postings") == 2
    assert lines(core.client, opened["customer_id"])["purchase"]["used"] == 200_000


def test_a_retried_cash_clearing_charges_its_fee_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 200_000, kind="cash", channel="atm", mcc="6011")
    body = {"idempotency_key": key(), "auth_id": auth["auth_id"], "amount": 200_000}
    twice(lambda: core.client.post("/v1/clearing", json=body))
    assert lines(core.client, opened["customer_id"])["total"]["used"] == 202_000


def test_a_retried_repayment_is_allocated_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 300_000)
    postings = count(core, opened, "postings")
    body = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 100_000}
    first = twice(lambda: core.client.post("/v1/repayments", json=body))
    assert first.status_code == 200, first.text
    assert count(core, opened, "postings") == postings + 2
    assert lines(core.client, opened["customer_id"])["purchase"]["used"] == 200_000


def test_a_retried_partial_reversal_releases_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    body = {"idempotency_key": key(), "amount": 100_000}
    first = twice(lambda: core.client.post(f"/v1/authorizations/{auth['auth_id']}/reversal", json=body))
    assert first.status_code == 200, first.text
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 200_000


def test_a_retried_full_reversal_answers_as_the_first_time_not_as_a_conflict(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    body = {"idempotency_key": key()}
    first = twice(lambda: core.client.post(f"/v1/authorizations/{auth['auth_id']}/reversal", json=body))
    assert first.status_code == 200, first.text


def test_a_retried_installment_booking_books_one_plan(core: CoreStack) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    body = {
        "idempotency_key": key(),
        "account_id": opened["account_id"],
        "transaction_id": cleared["transaction_id"],
        "terms": 6,
    }
    first = twice(lambda: core.client.post("/v1/installments", json=body))
    assert first.status_code == 201, first.text
    assert count(core, opened, "installment_plans") == 1
    assert lines(core.client, opened["customer_id"])["installment"]["used"] == 600_000


def test_a_retried_payoff_answers_as_the_first_time_not_as_a_conflict(core: CoreStack) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    booked = core.client.post(
        "/v1/installments",
        json={
            "idempotency_key": key(),
            "account_id": opened["account_id"],
            "transaction_id": cleared["transaction_id"],
            "terms": 3,
        },
    ).json()
    body = {"idempotency_key": key()}
    first = twice(lambda: core.client.post(f"/v1/installments/{booked['plan_id']}/payoff", json=body))
    assert first.status_code == 200, first.text


# ---- the same key with another body: 409 --------------------------------------------------------


def test_an_authorization_key_reused_for_another_amount_is_refused_and_changes_nothing(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    the_key = key()
    first = core.client.post("/v1/authorizations", json=authorization_body(opened, 100_000, the_key))
    assert first.json()["approved"] is True
    reused(core.client.post("/v1/authorizations", json=authorization_body(opened, 100_001, the_key)))
    reused(
        core.client.post(
            "/v1/authorizations", json=authorization_body(opened, 100_000, the_key, merchant_id="M-0002")
        )
    )
    assert count(core, opened, "authorizations") == 1
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 100_000
    # the first request is still answered as before
    again = core.client.post("/v1/authorizations", json=authorization_body(opened, 100_000, the_key))
    assert again.json() == first.json()


def test_a_clearing_key_reused_for_another_amount_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 200_000)
    the_key = key()
    body = {"idempotency_key": the_key, "auth_id": auth["auth_id"], "amount": 200_000}
    assert core.client.post("/v1/clearing", json=body).status_code == 200
    reused(core.client.post("/v1/clearing", json={**body, "amount": 150_000}))
    assert count(core, opened, "postings") == 2


def test_a_repayment_key_reused_for_another_amount_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 300_000)
    body = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 100_000}
    assert core.client.post("/v1/repayments", json=body).status_code == 200
    postings = count(core, opened, "postings")
    reused(core.client.post("/v1/repayments", json={**body, "amount": 100_001}))
    assert count(core, opened, "postings") == postings


def test_a_key_reused_for_another_kind_of_request_in_the_same_cell_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    the_key = key()
    assert core.client.post("/v1/authorizations", json=authorization_body(opened, 100_000, the_key)).json()[
        "approved"
    ]
    postings = count(core, opened, "postings")
    reused(
        core.client.post(
            "/v1/repayments",
            json={"idempotency_key": the_key, "account_id": opened["account_id"], "amount": 100_000},
        )
    )
    assert count(core, opened, "postings") == postings


def test_a_reversal_key_reused_on_another_authorization_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    first, second = approved(core.client, opened, 100_000), approved(core.client, opened, 200_000)
    body = {"idempotency_key": key()}
    assert core.client.post(f"/v1/authorizations/{first['auth_id']}/reversal", json=body).status_code == 200
    reused(core.client.post(f"/v1/authorizations/{second['auth_id']}/reversal", json=body))
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 200_000


# ---- rejected requests write nothing ------------------------------------------------------------


def test_a_rejected_request_records_nothing_so_its_key_can_carry_the_corrected_request(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 100_000)
    the_key = key()
    too_much = {"idempotency_key": the_key, "amount": 100_001}
    for _ in range(2):
        response = core.client.post(f"/v1/authorizations/{auth['auth_id']}/reversal", json=too_much)
        assert response.status_code == 422, response.text
    assert core.psql(opened["cell"], "SELECT count(*) FROM idempotency WHERE key = $1", the_key)[0][0] == 0
    corrected = core.client.post(
        f"/v1/authorizations/{auth['auth_id']}/reversal", json={"idempotency_key": the_key, "amount": 100_000}
    )
    assert corrected.status_code == 200, corrected.text
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 0


# ---- the same key at the same time --------------------------------------------------------------


def test_concurrent_retries_of_one_authorization_hold_once_and_get_one_answer(core: CoreStack) -> None:
    opened = open_account(core.client)
    body = authorization_body(opened, 70_000, key())
    responses = in_parallel(core, [lambda c: c.post("/v1/authorizations", json=body)] * 32, threads=16)
    assert {r.status_code for r in responses} == {200}
    answers = [r.json() for r in responses]
    assert all(a == answers[0] for a in answers), answers
    assert answers[0]["approved"] is True
    assert count(core, opened, "authorizations") == 1
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 70_000


def test_concurrent_repayments_with_one_key_post_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 300_000)
    postings = count(core, opened, "postings")
    body = {"idempotency_key": key(), "account_id": opened["account_id"], "amount": 50_000}
    responses = in_parallel(core, [lambda c: c.post("/v1/repayments", json=body)] * 32, threads=16)
    assert {r.status_code for r in responses} == {200}
    assert len({r.content for r in responses}) == 1
    assert count(core, opened, "postings") == postings + 2
    assert lines(core.client, opened["customer_id"])["purchase"]["used"] == 250_000


def test_concurrent_requests_with_one_key_and_different_bodies_let_exactly_one_through(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    the_key = key()
    bodies = [authorization_body(opened, 10_000 + n, the_key) for n in range(24)]
    responses = in_parallel(
        core, [lambda c, body=body: c.post("/v1/authorizations", json=body) for body in bodies], threads=24
    )
    winners = [r for r in responses if r.status_code == 200]
    assert len(winners) == 1, [r.text for r in responses]
    for response in responses:
        if response.status_code != 200:
            reused(response)
    assert count(core, opened, "authorizations") == 1
    held = lines(core.client, opened["customer_id"])["purchase"]["held"]
    assert held + winners[0].json()["available"] == 9_000_000
