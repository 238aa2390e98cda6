"""Limits: the unified view of the credit lines, temporary raises and permanent changes."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.cards import approved, authorize, database_fingerprint, lines, open_account, purchase
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
    for line in ("total", "purchase"):
        response = raise_temporarily(
            core.client, customer_id, line=line, amount=500_000, expires_at=expires_at
        )
        assert response.status_code == 201, response.text
    view = lines(core.client, customer_id)
    for line in ("total", "purchase"):
        assert view[line]["limit"] == limit
        assert view[line]["temporary"] == 500_000
        assert view[line]["available"] == limit + 500_000
    assert view["cash"]["temporary"] == 0
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


def test_a_raise_on_the_total_alone_does_not_lift_a_child_above_its_own_limit(core: CoreStack) -> None:
    opened = open_account(core.client)
    response = raise_temporarily(
        core.client, opened["customer_id"], line="total", amount=1_000_000, expires_at=in_seconds(3600)
    )
    assert response.status_code == 201, response.text
    view = lines(core.client, opened["customer_id"])
    assert view["total"]["available"] == LIMIT + 1_000_000
    assert view["purchase"]["available"] == LIMIT
    assert view["cash"]["available"] == CASH_LIMIT


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


def test_lowering_the_total_clamps_the_children_above_it_and_leaves_the_others(core: CoreStack) -> None:
    opened = open_account(core.client)
    customer_id = opened["customer_id"]
    response = set_limit(core.client, customer_id, "total", 6_000_000)
    assert response.status_code == 200, response.text
    view = {line["line"]: line for line in response.json()["lines"]}
    assert view == lines(core.client, customer_id)
    assert view["total"]["limit"] == 6_000_000
    assert view["purchase"]["limit"] == 6_000_000
    assert view["installment"]["limit"] == 6_000_000
    assert view["cash"]["limit"] == CASH_LIMIT  # 4,500,000 was already below

    assert set_limit(core.client, customer_id, "total", 3_000_000).status_code == 200
    view = lines(core.client, customer_id)
    assert {line: view[line]["limit"] for line in view} == {
        "total": 3_000_000,
        "purchase": 3_000_000,
        "cash": 3_000_000,
        "installment": 3_000_000,
    }
    assert_children_within_total(view)


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
