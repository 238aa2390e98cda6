"""Reversals release holds; clearing posts what the merchant settles, whatever became of the hold."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cardcore.common import ids

from tests.cards import (
    approved,
    assert_books_balance,
    clear,
    key,
    lines,
    open_account,
    reverse,
)
from tests.fixtures_core import CoreStack

LIMIT = 9_000_000
CASH = {"kind": "cash", "channel": "atm", "mcc": "6011"}


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def ledger(core: CoreStack, opened: dict[str, Any], gl: str) -> int:
    rows = core.psql(
        opened["cell"],
        "SELECT coalesce(sum(debit_fen - credit_fen), 0)::bigint FROM postings WHERE account_id = $1 AND gl = $2",
        opened["account_id"],
        gl,
    )
    return int(rows[0][0])


def auth_status(core: CoreStack, opened: dict[str, Any], auth_id: str) -> tuple[str, int]:
    (row,) = core.psql(
        opened["cell"], "SELECT status, hold_fen FROM authorizations WHERE auth_id = $1", auth_id
    )
    return row[0], row[1]


def error_of(response: Any, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    return error


# ---- reversal -----------------------------------------------------------------------------------


def test_a_full_reversal_releases_the_whole_hold(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    response = reverse(core.client, auth["auth_id"])
    assert response.status_code == 200, response.text
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 0
    assert view["total"]["available"] == LIMIT
    assert auth_status(core, opened, auth["auth_id"]) == ("reversed", 0)


def test_a_partial_reversal_releases_only_that_part_and_a_second_one_the_rest(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    response = reverse(core.client, auth["auth_id"], 100_000)
    assert response.status_code == 200, response.text
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 200_000
    assert view["total"]["available"] == LIMIT - 200_000
    assert reverse(core.client, auth["auth_id"], 200_000).status_code == 200
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 0


def test_reversing_more_than_the_remaining_hold_is_refused_and_changes_nothing(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    assert reverse(core.client, auth["auth_id"], 100_000).status_code == 200
    error = error_of(reverse(core.client, auth["auth_id"], 200_001), 422)
    assert error["field"] == "amount"
    assert lines(core.client, opened["customer_id"])["purchase"]["held"] == 200_000


def test_a_cash_reversal_releases_the_cash_line(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 200_000, **CASH)
    assert reverse(core.client, auth["auth_id"]).status_code == 200
    view = lines(core.client, opened["customer_id"])
    assert view["cash"]["held"] == 0
    assert view["cash"]["available"] == LIMIT // 2


def test_reversing_a_fully_reversed_hold_is_a_conflict(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    assert reverse(core.client, auth["auth_id"]).status_code == 200
    error_of(reverse(core.client, auth["auth_id"]), 409)
    error_of(reverse(core.client, auth["auth_id"], 1), 409)


def test_reversing_a_cleared_hold_is_a_conflict(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    clear(core.client, auth["auth_id"], 300_000)
    error_of(reverse(core.client, auth["auth_id"]), 409)
    assert lines(core.client, opened["customer_id"])["purchase"]["used"] == 300_000


def test_reversing_an_unknown_authorization_is_not_found(core: CoreStack) -> None:
    error = error_of(reverse(core.client, ids.new_id(ids.PREFIX_AUTHORIZATION, 1)), 404)
    assert error["field"] == "auth_id"


# ---- clearing -----------------------------------------------------------------------------------


def test_clearing_the_held_amount_posts_it_and_releases_the_hold(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    cleared = clear(core.client, auth["auth_id"], 300_000)
    assert cleared["transaction_id"].startswith("TX")
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 300_000)
    assert view["total"]["available"] == LIMIT - 300_000
    assert ledger(core, opened, "purchase") == 300_000
    assert auth_status(core, opened, auth["auth_id"]) == ("cleared", 0)
    balance = core.client.get(f"/v1/accounts/{opened['account_id']}/balance").json()
    assert (balance["posted"], balance["held"], balance["available"]) == (300_000, 0, LIMIT - 300_000)


def test_clearing_below_the_hold_posts_the_smaller_amount_and_releases_the_rest(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    clear(core.client, auth["auth_id"], 240_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 240_000)
    assert view["total"]["available"] == LIMIT - 240_000


def test_clearing_above_the_hold_posts_the_larger_amount(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    clear(core.client, auth["auth_id"], 330_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 330_000)
    assert ledger(core, opened, "purchase") == 330_000


def test_clearing_after_a_partial_reversal_posts_and_releases_what_was_left(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    assert reverse(core.client, auth["auth_id"], 100_000).status_code == 200
    clear(core.client, auth["auth_id"], 200_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 200_000)


def test_a_fully_reversed_authorization_still_posts_when_it_clears(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    assert reverse(core.client, auth["auth_id"]).status_code == 200
    clear(core.client, auth["auth_id"], 300_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 300_000)
    assert view["total"]["available"] == LIMIT - 300_000


def test_clearing_an_unknown_authorization_is_not_found_and_posts_nothing(core: CoreStack) -> None:
    unknown = ids.new_id(ids.PREFIX_AUTHORIZATION, 2)
    before = core.psql(2, "SELECT count(*) FROM postings")[0][0]
    response = core.client.post(
        "/v1/clearing", json={"idempotency_key": key(), "auth_id": unknown, "amount": 10_000}
    )
    error = error_of(response, 404)
    assert error["field"] == "auth_id"
    assert core.psql(2, "SELECT count(*) FROM postings")[0][0] == before


def test_two_holds_clear_independently(core: CoreStack) -> None:
    opened = open_account(core.client)
    first = approved(core.client, opened, 100_000)
    second = approved(core.client, opened, 200_000)
    clear(core.client, first["auth_id"], 100_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (200_000, 100_000)
    clear(core.client, second["auth_id"], 150_000)
    view = lines(core.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 250_000)


# ---- cash and its fee ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "fee"),
    [
        (300_000, 3_000),  # 1 % of the amount
        (50_000, 1_000),  # 1 % would be 500: the minimum of 10 CNY applies
        (100_000, 1_000),  # exactly at the minimum
        (100_250, 1_003),  # 1,002.5 rounds half up (not to the even 1,002)
    ],
)
def test_clearing_cash_posts_the_cash_and_charges_the_cash_fee_to_the_fees_ledger(
    core: CoreStack, amount: int, fee: int
) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, amount, **CASH)
    clear(core.client, auth["auth_id"], amount)
    assert ledger(core, opened, "cash") == amount
    assert ledger(core, opened, "fees") == fee
    assert ledger(core, opened, "purchase") == 0
    view = lines(core.client, opened["customer_id"])
    assert (view["cash"]["held"], view["cash"]["used"]) == (0, amount)
    assert view["total"]["used"] == amount + fee
    balance = core.client.get(f"/v1/accounts/{opened['account_id']}/balance").json()
    assert balance["posted"] == amount + fee


def test_a_purchase_is_charged_no_fee(core: CoreStack) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000)
    clear(core.client, auth["auth_id"], 300_000)
    assert ledger(core, opened, "fees") == 0


# ---- expired holds (a private stack whose holds last one second) --------------------------------


def test_an_expired_hold_still_posts_when_it_clears_and_can_no_longer_be_reversed(
    core_factory: Callable[[], CoreStack],
) -> None:
    stack = core_factory()
    app = stack.start_app([1, 2], hold_ttl_seconds=1)
    stack.start_gateway({1: [app.url], 2: [app.url]})
    opened = open_account(stack.client)
    to_clear = approved(stack.client, opened, 300_000)
    to_reverse = approved(stack.client, opened, 100_000)
    time.sleep(1.5)
    clear(stack.client, to_clear["auth_id"], 300_000)
    view = lines(stack.client, opened["customer_id"])
    assert (view["purchase"]["held"], view["purchase"]["used"]) == (0, 300_000)
    assert view["total"]["available"] == LIMIT - 300_000
    assert reverse(stack.client, to_reverse["auth_id"]).status_code == 409
    assert_books_balance(stack.client)
