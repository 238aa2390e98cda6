"""What a failover leaves behind at the acquirer, and the other messages it sends about a hold.

- Reversal by the original request's key (``POST /v1/authorizations/reversal``), for an
  authorization whose answer was lost: the hold is released when the original was committed; a
  reversal that comes first is recorded, and the original, arriving late, is declined and holds
  nothing. With the card number it goes to the card's cell; without it, to every cell.
- Incremental authorizations on an open hold (``POST /v1/authorizations/{auth_id}/increment``).
- Refunds (``POST /v1/refunds``): a merchandise return credited to the account.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest
from cardcore.common import ids

from tests.cards import (
    approved,
    assert_books_balance,
    authorize,
    clear,
    customers_in_each_cell,
    database_fingerprint,
    key,
    lines,
    open_account,
    purchase,
    repay,
)
from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer

GATEWAY_SEES_IT_S = 10.0  # a gateway's health polls to find a restarted app server ready

LIMIT = 9_000_000
CASH = {"kind": "cash", "channel": "atm", "mcc": "6011"}


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def reverse_by_key(
    client: httpx.Client, original_key: str, pan: str | None = None, amount: int | None = None, **body: Any
) -> httpx.Response:
    request: dict[str, Any] = {
        "idempotency_key": body.pop("idempotency_key", key()),
        "original_idempotency_key": original_key,
    }
    if pan is not None:
        request["pan"] = pan
    if amount is not None:
        request["amount"] = amount
    return client.post("/v1/authorizations/reversal", json={**request, **body})


def answer_of(response: httpx.Response, status: int = 200) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body: dict[str, Any] = response.json()
    return body


def increment(client: httpx.Client, auth_id: str, amount: int, **body: Any) -> httpx.Response:
    return client.post(
        f"/v1/authorizations/{auth_id}/increment", json={"idempotency_key": key(), "amount": amount, **body}
    )


def refund(client: httpx.Client, card: dict[str, Any], amount: int, /, **body: Any) -> httpx.Response:
    """A refund to ``card``; ``body`` adds fields or replaces any (the amount too)."""
    request = {
        "idempotency_key": key(),
        "pan": card["pan"],
        "expiry": card["expiry"],
        "amount": amount,
        "merchant_id": "M-0001",
    }
    return client.post("/v1/refunds", json={**request, **body})


# ---- reversal by the original key -----------------------------------------------------------------


@pytest.mark.parametrize("with_pan", [True, False], ids=["to-the-card's-cell", "asked-of-every-cell"])
def test_a_reversal_by_the_original_key_releases_the_hold_of_a_committed_authorization(
    core: CoreStack, with_pan: bool
) -> None:
    opened = open_account(core.client)
    original_key = key()
    held = approved(core.client, opened, 300_000, idempotency_key=original_key)
    answer = answer_of(reverse_by_key(core.client, original_key, opened["pan"] if with_pan else None))
    assert answer["original"] == "approved"
    assert (answer["auth_id"], answer["status"], answer["reversed"]) == (held["auth_id"], "reversed", 300_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["total"]["available"]) == (0, LIMIT)


def test_a_reversal_that_arrives_before_its_authorization_makes_the_late_authorization_decline(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    original_key = key()
    for with_pan in (opened["pan"], None):  # the first one records it; the second finds it recorded
        answer = answer_of(reverse_by_key(core.client, original_key, with_pan))
        assert (answer["original"], answer["status"], answer["reversed"]) == ("absent", "recorded", 0)
    for _ in range(2):  # the original, and its retry, arrive late
        late = answer_of(authorize(core.client, opened, 300_000, idempotency_key=original_key))
        assert (late["approved"], late["response_code"]) == (False, "05"), late
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["total"]["available"]) == (0, LIMIT)
    assert (
        core.psql(
            opened["cell"], "SELECT count(*) FROM authorizations WHERE account_id = $1", opened["account_id"]
        )[0][0]
        == 0
    )


def test_a_retried_reversal_by_key_answers_as_the_first_time_and_releases_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    original_key = key()
    approved(core.client, opened, 300_000, idempotency_key=original_key)
    approved(core.client, opened, 100_000)
    reversal_key = key()
    first = answer_of(reverse_by_key(core.client, original_key, opened["pan"], idempotency_key=reversal_key))
    again = answer_of(reverse_by_key(core.client, original_key, opened["pan"], idempotency_key=reversal_key))
    assert again == first
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 100_000
    other_body = reverse_by_key(
        core.client, original_key, opened["pan"], amount=1_000, idempotency_key=reversal_key
    )
    assert answer_of(other_body, 409)["error"]["field"] == "idempotency_key"
    # a second reversal with a new key: nothing is left to release
    later = answer_of(reverse_by_key(core.client, original_key, opened["pan"]))
    assert (later["status"], later["reversed"]) == ("reversed", 0)


def test_a_reversal_by_key_of_part_of_a_hold_releases_that_part_and_never_more_than_is_held(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    original_key = key()
    approved(core.client, opened, 300_000, idempotency_key=original_key)
    answer = answer_of(reverse_by_key(core.client, original_key, opened["pan"], amount=100_000))
    assert (answer["status"], answer["reversed"], answer["remaining_hold"]) == ("open", 100_000, 200_000)
    before = database_fingerprint(core)
    too_much = answer_of(reverse_by_key(core.client, original_key, opened["pan"], amount=200_001), 422)
    assert too_much["error"]["field"] == "amount"
    assert database_fingerprint(core) == before


def test_a_reversal_by_key_of_a_declined_authorization_releases_nothing(core: CoreStack) -> None:
    opened = open_account(core.client, activate=False)
    original_key = key()
    declined = answer_of(authorize(core.client, opened, 300_000, idempotency_key=original_key))
    assert declined["response_code"] == "05"
    answer = answer_of(reverse_by_key(core.client, original_key))
    assert (answer["original"], answer["reversed"], answer["auth_id"]) == ("declined", 0, declined["auth_id"])


def test_a_reversal_by_key_of_a_cleared_authorization_releases_nothing_and_unposts_nothing(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    original_key = key()
    held = approved(core.client, opened, 300_000, idempotency_key=original_key)
    clear(core.client, held["auth_id"], 300_000)
    answer = answer_of(reverse_by_key(core.client, original_key, opened["pan"]))
    assert (answer["status"], answer["reversed"]) == ("cleared", 0)
    assert lines(core.client, opened["customer_id"])["purchase"]["used"] == 300_000


def test_a_reversal_by_key_of_something_other_than_an_authorization_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 100_000)
    repayment_key = key()
    response = core.client.post(
        "/v1/repayments",
        json={"idempotency_key": repayment_key, "account_id": opened["account_id"], "amount": 1_000},
    )
    assert response.status_code == 200, response.text
    before = database_fingerprint(core)
    refused = answer_of(reverse_by_key(core.client, repayment_key, opened["pan"]), 422)
    assert refused["error"]["field"] == "original_idempotency_key"
    assert database_fingerprint(core) == before


def test_a_reversal_by_key_of_an_increment_releases_what_the_increment_added(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 300_000)
    increment_key = key()
    answer_of(increment(core.client, held["auth_id"], 50_000, idempotency_key=increment_key))
    answer = answer_of(reverse_by_key(core.client, increment_key, opened["pan"]))
    assert (answer["reversed"], answer["remaining_hold"], answer["status"]) == (50_000, 300_000, "open")


@pytest.fixture(scope="module")
def two_apps(postgres: PostgresServer) -> Iterator[CoreStack]:
    """Both cells behind two app servers: a reversal and its original may meet on different ones."""
    stack = new_stack(postgres)
    try:
        first = stack.start_app([1, 2])
        second = stack.start_app([1, 2])
        stack.start_gateway({1: [first.url, second.url], 2: [first.url, second.url]})
        yield stack
    finally:
        stack.close()


def test_an_authorization_and_its_reversal_racing_on_two_app_servers_never_leave_a_hold(
    two_apps: CoreStack,
) -> None:
    opened = open_account(two_apps.client)
    apps = [httpx.Client(base_url=app.url, timeout=30) for app in two_apps.apps]
    outcomes = []
    try:
        for round_number in range(40):
            original_key = key()
            body = {
                "idempotency_key": original_key,
                "pan": opened["pan"],
                "expiry": opened["expiry"],
                "amount": 1_000,
                "currency": "CNY",
                "mcc": "5411",
                "merchant_id": "M-0001",
                "channel": "pos",
                "kind": "purchase",
            }
            reversal = {"idempotency_key": key(), "original_idempotency_key": original_key}
            first, second = apps if round_number % 2 else apps[::-1]
            with ThreadPoolExecutor(max_workers=2) as pool:
                sent_authorization = pool.submit(first.post, "/v1/authorizations", json=body)
                sent_reversal = pool.submit(second.post, "/v1/authorizations/reversal", json=reversal)
                authorized, reversed_ = sent_authorization.result(), sent_reversal.result()
            authorized_answer, reversal_answer = answer_of(authorized), answer_of(reversed_)
            if authorized_answer["approved"]:
                assert (reversal_answer["original"], reversal_answer["status"]) == ("approved", "reversed")
            else:
                assert (authorized_answer["response_code"], reversal_answer["original"]) == ("05", "absent")
            outcomes.append(authorized_answer["approved"])
    finally:
        for app in apps:
            app.close()
    view = lines(two_apps.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 0)
    assert_books_balance(two_apps.client)


def test_a_reversal_without_a_card_number_needs_every_cell_and_one_with_it_only_the_card_s(
    core_factory: Callable[[], CoreStack],
) -> None:
    stack = core_factory()
    first = stack.start_app([1])
    second = stack.start_app([2])
    stack.start_gateway({1: [first.url], 2: [second.url]})
    customers = customers_in_each_cell(stack.client)
    opened = customers[1]
    original_key = key()
    approved(stack.client, opened, 100_000, idempotency_key=original_key)
    port = int(second.url.rsplit(":", 1)[1])
    second.stop()
    unknown, reversal_key = key(), key()
    asked_everywhere = reverse_by_key(stack.client, unknown, idempotency_key=reversal_key)
    assert asked_everywhere.status_code == 503, asked_everywhere.text  # cell 2 may have it: retry later
    # the cell that has the original answers even while another cell is down
    found = answer_of(reverse_by_key(stack.client, original_key))
    assert (found["original"], found["status"]) == ("approved", "reversed")
    # cell 2 is back: the same reversal, tried again, is recorded in every cell
    stack.start_app([2], port=port)
    # as the 503 said: retry (the gateway sees cell 2 ready at its next poll, 200 ms apart)
    deadline = time.monotonic() + GATEWAY_SEES_IT_S
    while (again := reverse_by_key(stack.client, unknown, idempotency_key=reversal_key)).status_code == 503:
        assert time.monotonic() < deadline, again.text
        time.sleep(0.2)
    retried = answer_of(again)
    assert (retried["original"], retried["status"]) == ("absent", "recorded")
    for cell in (1, 2):
        claimed = stack.psql(cell, "SELECT count(*) FROM idempotency WHERE key = $1", unknown)
        assert claimed[0][0] == 1, cell
    late = answer_of(authorize(stack.client, customers[2], 1_000, idempotency_key=unknown))
    assert (late["approved"], late["response_code"]) == (False, "05")


# ---- incremental authorizations ---------------------------------------------------------------------


def test_an_approved_increment_grows_the_hold_and_clearing_posts_the_final_amount(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 200_000)  # a hotel takes a deposit for the first night
    answer = answer_of(increment(core.client, held["auth_id"], 150_000))  # the stay is extended
    assert (answer["approved"], answer["response_code"], answer["auth_id"]) == (True, "00", held["auth_id"])
    assert (answer["amount"], answer["hold"], answer["available"]) == (350_000, 350_000, LIMIT - 350_000)
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 350_000
    clear(core.client, held["auth_id"], 340_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 340_000)


def test_an_increment_beyond_the_line_is_declined_51_and_leaves_the_hold_as_it_was(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 5_000_000)
    held = approved(core.client, opened, 3_950_000)  # 50,000 left on the line
    answer = answer_of(increment(core.client, held["auth_id"], 50_001))
    assert (answer["approved"], answer["response_code"], answer["hold"]) == (False, "51", 3_950_000)
    assert answer_of(increment(core.client, held["auth_id"], 50_000))["response_code"] == "00"


def test_an_increment_taking_the_hold_past_the_single_amount_limit_is_declined_61(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 4_900_000)
    answer = answer_of(increment(core.client, held["auth_id"], 100_001))
    assert (answer["approved"], answer["response_code"], answer["hold"]) == (False, "61", 4_900_000)
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 4_900_000


def test_an_increment_on_a_card_reported_lost_is_declined_41(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 100_000)
    status = core.client.post(f"/v1/cards/{opened['card_id']}/status", json={"status": "lost"})
    assert status.status_code == 200, status.text
    answer = answer_of(increment(core.client, held["auth_id"], 10_000))
    assert (answer["approved"], answer["response_code"]) == (False, "41")


def test_an_increment_needs_an_open_hold(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 100_000)
    clear(core.client, held["auth_id"], 100_000)
    before = database_fingerprint(core)
    refused = answer_of(increment(core.client, held["auth_id"], 10_000), 409)
    assert refused["error"]["field"] == "auth_id"
    unknown = answer_of(increment(core.client, "AU01" + "A" * 16, 10_000), 404)
    assert unknown["error"]["field"] == "auth_id"
    assert database_fingerprint(core) == before


def test_a_retried_increment_adds_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    held = approved(core.client, opened, 100_000)
    body = {"idempotency_key": key(), "amount": 25_000}
    answers = [
        answer_of(core.client.post(f"/v1/authorizations/{held['auth_id']}/increment", json=body))
        for _ in range(3)
    ]
    assert all(a == answers[0] for a in answers)
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 125_000


# ---- refunds ----------------------------------------------------------------------------------------


def test_a_refund_pays_the_purchases_owed_first_and_keeps_the_rest_as_a_credit(core: CoreStack) -> None:
    opened = open_account(core.client)
    bought = purchase(core.client, opened, 300_000)
    repay(core.client, opened["account_id"], 250_000)  # 50,000 of purchases still owed
    answer = answer_of(refund(core.client, opened, 120_000, original_transaction_id=bought["transaction_id"]))
    assert answer["allocation"] == {"purchase": 50_000, "credit_balance": 70_000}
    view = lines(core.client, opened["customer_id"])
    assert view["total"]["used"] == -70_000
    assert view["total"]["available"] == LIMIT + 70_000
    listed = core.client.get(f"/v1/accounts/{opened['account_id']}/transactions").json()["transactions"]
    (line,) = [t for t in listed if t["transaction_id"] == answer["transaction_id"]]
    assert (line["kind"], line["amount"], line["original_transaction_id"]) == (
        "refund",
        120_000,
        bought["transaction_id"],
    )


def test_refunds_of_a_purchase_never_exceed_what_was_bought(core: CoreStack) -> None:
    opened = open_account(core.client)
    bought = purchase(core.client, opened, 300_000)
    answer_of(refund(core.client, opened, 200_000, original_transaction_id=bought["transaction_id"]))
    before = database_fingerprint(core)
    refused = answer_of(
        refund(core.client, opened, 100_001, original_transaction_id=bought["transaction_id"]), 422
    )
    assert refused["error"]["field"] == "amount"
    assert database_fingerprint(core) == before
    answer_of(refund(core.client, opened, 100_000, original_transaction_id=bought["transaction_id"]))


def test_a_refund_without_its_purchase_is_credited_and_a_retry_credits_once(core: CoreStack) -> None:
    opened = open_account(core.client)
    body = {"idempotency_key": key()}
    answers = [answer_of(refund(core.client, opened, 40_000, **body)) for _ in range(3)]
    assert all(a == answers[0] for a in answers)
    assert answers[0]["allocation"] == {"purchase": 0, "credit_balance": 40_000}
    assert lines(core.client, opened["customer_id"])["total"]["used"] == -40_000


def test_a_refund_to_a_card_reported_stolen_still_reaches_its_account(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 100_000)
    assert (
        core.client.post(f"/v1/cards/{opened['card_id']}/status", json={"status": "stolen"}).status_code
        == 200
    )
    answer = answer_of(refund(core.client, opened, 100_000))
    assert answer["allocation"]["purchase"] == 100_000


@pytest.mark.parametrize(
    ("change", "status", "field"),
    [
        ({"expiry": "01/99"}, 422, "expiry"),
        ({"original_transaction_id": "TX01" + "A" * 16}, 404, "original_transaction_id"),
        ({"amount": 0}, 400, "amount"),
        ({"pan": ids.new_pan(1, 9_999_998)}, 404, "pan"),
    ],
    ids=["another-expiry", "unknown-purchase", "no-amount", "unknown-card"],
)
def test_a_refund_that_does_not_fit_its_card_is_refused_and_writes_nothing(
    core: CoreStack, change: dict[str, Any], status: int, field: str
) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    refused = answer_of(refund(core.client, opened, 10_000, **change), status)
    assert refused["error"]["field"] == field
    assert database_fingerprint(core) == before


def test_a_refund_naming_another_accounts_purchase_or_a_cash_withdrawal_is_refused(core: CoreStack) -> None:
    mine, other = open_account(core.client), open_account(core.client)
    theirs = purchase(core.client, other, 100_000)
    cash = clear(core.client, approved(core.client, mine, 100_000, **CASH)["auth_id"], 100_000)
    before = database_fingerprint(core)
    answer_of(refund(core.client, mine, 10_000, original_transaction_id=theirs["transaction_id"]), 404)
    refused = answer_of(
        refund(core.client, mine, 10_000, original_transaction_id=cash["transaction_id"]), 422
    )
    assert refused["error"]["field"] == "original_transaction_id"
    assert database_fingerprint(core) == before
