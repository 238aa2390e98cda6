"""Limits: the unified view of the credit lines, temporary raises and permanent changes."""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    authorize,
    database_fingerprint,
    lines,
    open_account,
    purchase,
    repay,
)
from tests.fixtures_core import CoreStack

LIMIT = 9_000_000  # an income of 300,000 CNY
CASH_LIMIT = LIMIT // 2


def rfc3339(moment: datetime) -> str:
    return moment.isoformat()


def in_seconds(seconds: float) -> str:
    return rfc3339(datetime.now(UTC) + timedelta(seconds=seconds))


def raise_temporarily(client: httpx.Client, customer_id: str, **body: Any) -> httpx.Response:
    return client.post(f"/v1/customers/{customer_id}/limits/temporary", json=body)


def set_limit(client: httpx.Client, customer_id: str, line: str, limit: int) -> httpx.Response:
    return client.post(f"/v1/customers/{customer_id}/limits", json={"line": line, "limit": limit})


def assert_children_within_total(view: dict[str, dict[str, int]]) -> None:
    for child in ("purchase", "cash", "installment"):
        assert view[child]["available"] <= view["total"]["available"], view


# ---- the view -----------------------------------------------------------------------------------


def test_an_open_hold_counts_as_held_on_the_purchase_line_and_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = approved(core.client, opened, 123_400)
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 123_400
    assert view["total"]["held"] == 123_400
    assert view["cash"]["held"] == 0
    assert view["purchase"]["available"] == LIMIT - 123_400
    assert view["total"]["available"] == LIMIT - 123_400
    assert answer["available"] == LIMIT - 123_400
    assert_children_within_total(view)


def test_a_cleared_purchase_counts_as_used_and_no_longer_as_held(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 250_000)
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["used"] == 250_000
    assert view["purchase"]["held"] == 0
    assert view["total"]["used"] == 250_000
    assert view["total"]["available"] == LIMIT - 250_000
    assert view["installment"]["available"] == LIMIT - 250_000
    assert_children_within_total(view)


def test_the_cash_line_never_shows_more_than_what_is_left_of_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 5_000_000)  # the single purchase limit of the standard product
    view = lines(core.client, opened["customer_id"])
    assert view["total"]["available"] == LIMIT - 5_000_000
    assert view["cash"]["limit"] == CASH_LIMIT
    assert view["cash"]["available"] == LIMIT - 5_000_000 < CASH_LIMIT
    assert_children_within_total(view)


# ---- temporary raises ---------------------------------------------------------------------------


def test_a_temporary_raise_lifts_the_line_until_it_expires(core: CoreStack) -> None:
    opened = open_account(core.client, annual_income=7_000_000)  # a limit of 2,100,000 fen
    customer_id = opened["customer_id"]
    limit = lines(core.client, customer_id)["total"]["limit"]
    assert limit == 2_100_000
    assert authorize(core.client, opened, 2_400_000).json()["response_code"] == "51"

    expires_at = in_seconds(2.5)
    response = raise_temporarily(
        core.client, customer_id, line="total", amount=500_000, expires_at=expires_at
    )
    assert response.status_code == 201, response.text
    view = lines(core.client, customer_id)
    for line in ("total", "purchase"):  # the purchase line is all of the total: all of its raise
        assert view[line]["limit"] == limit
        assert view[line]["temporary"] == 500_000
        assert view[line]["available"] == limit + 500_000
    assert view["cash"]["temporary"] == 250_000  # half of the total: half of its raise
    assert_children_within_total(view)

    held = approved(core.client, opened, 2_400_000)
    assert held["available"] == limit + 500_000 - 2_400_000

    time.sleep(max(0.0, (datetime.fromisoformat(expires_at) - datetime.now(UTC)).total_seconds()) + 0.3)
    view = lines(core.client, customer_id)
    for line in ("total", "purchase"):
        assert view[line]["temporary"] == 0
        assert view[line]["limit"] == limit
        assert view[line]["held"] == 2_400_000
        assert view[line]["available"] == 0
    assert authorize(core.client, opened, 100).json()["response_code"] == "51"


def test_a_raise_of_a_child_line_alone_never_lifts_it_above_what_the_total_has(core: CoreStack) -> None:
    opened = open_account(core.client)
    response = raise_temporarily(
        core.client, opened["customer_id"], line="cash", amount=6_000_000, expires_at=in_seconds(3600)
    )
    assert response.status_code == 201, response.text
    view = lines(core.client, opened["customer_id"])
    assert view["cash"]["temporary"] == 6_000_000
    assert view["cash"]["available"] == LIMIT  # its own room is 10,500,000: the total caps it
    assert view["total"]["available"] == LIMIT
    assert view["purchase"]["temporary"] == 0


@pytest.mark.parametrize(
    "expires_at",
    [
        rfc3339(datetime.now(UTC) - timedelta(seconds=1)),
        rfc3339(datetime(2020, 1, 1, tzinfo=UTC)),
        (datetime.now(UTC) + timedelta(days=1)).replace(tzinfo=None).isoformat(),  # no time zone
        "tomorrow",
        "2031-02-30T00:00:00Z",
    ],
    ids=["a-second-ago", "years-ago", "without-time-zone", "not-a-time", "no-such-day"],
)
def test_a_temporary_raise_needs_an_expiry_in_the_future_with_a_time_zone(
    core: CoreStack, expires_at: str
) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    response = raise_temporarily(
        core.client, opened["customer_id"], line="total", amount=100_000, expires_at=expires_at
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "expires_at"
    assert database_fingerprint(core) == before
    assert lines(core.client, opened["customer_id"])["total"]["temporary"] == 0


# ---- permanent limits ---------------------------------------------------------------------------


def test_a_line_can_be_lowered_to_exactly_what_it_uses_but_not_below(core: CoreStack) -> None:
    opened = open_account(core.client)
    customer_id = opened["customer_id"]
    purchase(core.client, opened, 300_000)
    approved(core.client, opened, 200_000)  # held

    before = database_fingerprint(core)
    below = set_limit(core.client, customer_id, "purchase", 499_999)
    assert below.status_code == 422, below.text
    assert below.json()["error"]["field"] == "limit"
    below_total = set_limit(core.client, customer_id, "total", 499_999)
    assert below_total.status_code == 422, below_total.text
    assert below_total.json()["error"]["field"] == "limit"
    assert database_fingerprint(core) == before

    exact = set_limit(core.client, customer_id, "purchase", 500_000)
    assert exact.status_code == 200, exact.text
    view = lines(core.client, customer_id)
    assert view["purchase"]["limit"] == 500_000
    assert view["purchase"]["available"] == 0
    assert view["total"]["limit"] == LIMIT
    assert authorize(core.client, opened, 100).json()["response_code"] == "51"


def test_a_child_line_cannot_be_set_above_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    for line in ("purchase", "cash", "installment"):
        response = set_limit(core.client, opened["customer_id"], line, LIMIT + 10_000)
        assert response.status_code == 422, (line, response.text)
        assert response.json()["error"]["field"] == "limit"
    assert database_fingerprint(core) == before
    at_total = set_limit(core.client, opened["customer_id"], "cash", LIMIT)
    assert at_total.status_code == 200, at_total.text
    assert lines(core.client, opened["customer_id"])["cash"]["limit"] == LIMIT


def test_lowering_the_total_lowers_every_child_to_its_share_of_it(core: CoreStack) -> None:
    opened = open_account(core.client)
    customer_id = opened["customer_id"]
    response = set_limit(core.client, customer_id, "total", 6_000_000)
    assert response.status_code == 200, response.text
    view = {line["line"]: line for line in response.json()["lines"]}
    assert view == lines(core.client, customer_id)
    assert {line: view[line]["limit"] for line in view} == {
        "total": 6_000_000,
        "purchase": 6_000_000,
        "cash": 3_000_000,  # half, as it was
        "installment": 6_000_000,
    }
    # a child set on its own keeps its new share of the total from then on
    assert set_limit(core.client, customer_id, "cash", 1_500_000).status_code == 200
    assert set_limit(core.client, customer_id, "total", 3_000_000).status_code == 200
    view = lines(core.client, customer_id)
    assert {line: view[line]["limit"] for line in view} == {
        "total": 3_000_000,
        "purchase": 3_000_000,
        "cash": 750_000,
        "installment": 3_000_000,
    }
    assert_children_within_total(view)


def test_lowering_the_total_below_what_a_child_share_uses_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 400_000, kind="cash", channel="atm", mcc="6011")
    before = database_fingerprint(core)
    response = set_limit(core.client, opened["customer_id"], "total", 700_000)  # cash would be 350,000
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "limit"
    assert "cash" in response.json()["error"]["message"]
    assert database_fingerprint(core) == before


def test_lowering_the_total_below_what_a_child_uses_is_refused(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 1_000_000)
    before = database_fingerprint(core)
    response = set_limit(core.client, opened["customer_id"], "total", 900_000)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "limit"
    assert database_fingerprint(core) == before


def test_a_raised_limit_is_usable_at_once(core: CoreStack) -> None:
    opened = open_account(core.client, annual_income=7_000_000)  # 2,100,000
    customer_id = opened["customer_id"]
    assert authorize(core.client, opened, 3_000_000).json()["response_code"] == "51"
    assert set_limit(core.client, customer_id, "total", 4_000_000).status_code == 200
    assert set_limit(core.client, customer_id, "purchase", 4_000_000).status_code == 200
    answer = approved(core.client, opened, 3_000_000)
    assert answer["available"] == 1_000_000


# ---- expired holds give their credit back, whatever path locks the account first ---------------


@pytest.mark.parametrize("first_touch", ["temporary-raise", "permanent-limit"])
def test_a_hold_that_expired_gives_its_credit_back_for_good_whichever_change_finds_it_first(
    core_factory: Callable[[], CoreStack], first_touch: str
) -> None:
    stack = core_factory()
    app = stack.start_app([1, 2], hold_ttl_seconds=1)
    stack.start_gateway({1: [app.url], 2: [app.url]})
    opened = open_account(stack.client, annual_income=7_000_000)  # a limit of 2,100,000 fen
    customer_id = opened["customer_id"]
    approved(stack.client, opened, 100_000)
    time.sleep(1.5)  # the hold expires; nothing has touched the account since
    if first_touch == "temporary-raise":
        response = raise_temporarily(
            stack.client, customer_id, line="cash", amount=10_000, expires_at=in_seconds(3600)
        )
        assert response.status_code == 201, response.text
    else:
        response = set_limit(stack.client, customer_id, "cash", 1_000_000)
        assert response.status_code == 200, response.text
    assert_books_balance(stack.client)  # holds on the lines equal the open holds
    view = lines(stack.client, customer_id)
    assert (view["purchase"]["held"], view["total"]["held"]) == (0, 0)
    assert view["purchase"]["available"] == 2_100_000
    # the whole line can be spent again
    assert approved(stack.client, opened, 2_100_000)["available"] == 0
    assert_books_balance(stack.client)


# ---- the line tree: children are shares of the total, and follow its raises --------------------


def test_a_temporary_raise_of_the_total_lifts_the_purchase_line_with_it(core: CoreStack) -> None:
    opened = open_account(core.client, annual_income=3_500_000)  # a limit of 1,050,000 fen
    customer_id = opened["customer_id"]
    assert authorize(core.client, opened, 1_200_000).json()["response_code"] == "51"
    response = raise_temporarily(
        core.client, customer_id, line="total", amount=500_000, expires_at=in_seconds(3600)
    )
    assert response.status_code == 201, response.text
    view = lines(core.client, customer_id)
    assert (view["total"]["temporary"], view["purchase"]["temporary"]) == (500_000, 500_000)
    assert view["cash"]["temporary"] == 250_000  # cash is half of the total: half of its raise
    assert view["purchase"]["available"] == 1_550_000
    assert approved(core.client, opened, 1_200_000)["available"] == 350_000
    assert_children_within_total(lines(core.client, customer_id))


def test_raising_the_total_raises_every_child_line_by_its_share(core: CoreStack) -> None:
    opened = open_account(core.client, annual_income=3_500_000)  # 1,050,000; cash 525,000
    customer_id = opened["customer_id"]
    assert authorize(core.client, opened, 1_500_000).json()["response_code"] == "51"
    response = set_limit(core.client, customer_id, "total", 2_000_000)
    assert response.status_code == 200, response.text
    view = lines(core.client, customer_id)
    assert {line: view[line]["limit"] for line in view} == {
        "total": 2_000_000,
        "purchase": 2_000_000,
        "cash": 1_000_000,
        "installment": 2_000_000,
    }
    assert approved(core.client, opened, 1_500_000)["available"] == 500_000


def test_a_credit_balance_can_be_spent_on_every_line(core: CoreStack) -> None:
    opened = open_account(core.client, annual_income=3_500_000)  # 1,050,000; cash 525,000
    customer_id = opened["customer_id"]
    repay(core.client, opened["account_id"], 100_000)  # paid in before spending: a prepayment
    view = lines(core.client, customer_id)
    for line, limit in (("total", 1_050_000), ("purchase", 1_050_000), ("cash", 525_000)):
        assert view[line]["available"] == limit + 100_000, (line, view)
    assert approved(core.client, opened, 1_150_000)["available"] == 0
