"""Authorization: the decision order, the ISO 8583 codes, holds on the lines, offers and hold expiry."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from cardcore.common import ids

from tests.cards import (
    approved,
    assert_books_balance,
    authorize,
    book_installment,
    lines,
    open_account,
    purchase,
)
from tests.fixtures_core import CoreStack

LIMIT = 9_000_000  # the STD limit for the default applicant's income of 300,000 CNY
CASH_LIMIT = LIMIT // 2
SINGLE_PURCHASE_MAX = 5_000_000
SINGLE_CASH_MAX = 500_000
CASH = {"kind": "cash", "channel": "atm", "mcc": "6011"}


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def decision(core: CoreStack, card: dict[str, Any], amount: int, **overrides: Any) -> dict[str, Any]:
    response = authorize(core.client, card, amount, **overrides)
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    assert answer["approved"] is (answer["response_code"] == "00"), answer
    return answer


def set_status(core: CoreStack, card: dict[str, Any], status: str) -> None:
    response = core.client.post(f"/v1/cards/{card['card_id']}/status", json={"status": status})
    assert response.status_code == 200, response.text


def unissued_pan(cell: int) -> str:
    """A well-formed PAN routed to ``cell`` whose serial the cell has not issued."""
    return ids.new_pan(cell, 9_999_998)


# ---- approval and holds -------------------------------------------------------------------------


def test_an_approved_purchase_holds_its_amount_on_the_purchase_line_and_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = decision(core, opened, 250_000)
    assert answer["approved"] is True
    assert answer["response_code"] == "00"
    assert answer["auth_id"].startswith("AU")
    assert answer["available"] == LIMIT - 250_000
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 250_000
    assert view["total"]["held"] == 250_000
    assert view["cash"]["held"] == 0
    assert view["total"]["available"] == LIMIT - 250_000


def test_an_approved_cash_withdrawal_holds_on_the_cash_line_and_answers_the_cash_available(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    answer = decision(core, opened, 300_000, **CASH)
    assert answer["approved"] is True
    assert answer["available"] == CASH_LIMIT - 300_000
    view = lines(core.client, opened["customer_id"])
    assert view["cash"]["held"] == 300_000
    assert view["purchase"]["held"] == 0
    assert view["total"]["held"] == 300_000
    assert view["purchase"]["available"] == LIMIT - 300_000


def test_a_declined_authorization_holds_nothing_and_answers_the_current_available(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 1_000_000)
    answer = decision(core, opened, 6_000_000)  # above the single-amount limit
    assert answer["approved"] is False
    assert answer["response_code"] == "61"
    assert answer["available"] == LIMIT - 1_000_000
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 1_000_000
    assert view["total"]["held"] == 1_000_000


# ---- card status --------------------------------------------------------------------------------


def test_a_card_number_the_cell_never_issued_is_an_invalid_card(core: CoreStack) -> None:
    for cell in (1, 2):
        answer = decision(core, {"pan": unissued_pan(cell), "expiry": "12/30"}, 10_000)
        assert answer["approved"] is False
        assert answer["response_code"] == "14"


def test_an_inactive_card_is_not_honoured(core: CoreStack) -> None:
    opened = open_account(core.client, activate=False)
    answer = decision(core, opened, 10_000)
    assert (answer["approved"], answer["response_code"]) == (False, "05")


@pytest.mark.parametrize(
    ("status", "code"), [("locked", "05"), ("lost", "41"), ("stolen", "43"), ("closed", "14")]
)
def test_a_card_that_is_not_active_is_declined_with_the_code_of_its_status(
    core: CoreStack, status: str, code: str
) -> None:
    opened = open_account(core.client)
    set_status(core, opened, status)
    answer = decision(core, opened, 10_000)
    assert (answer["approved"], answer["response_code"]) == (False, code)
    assert lines(core.client, opened["customer_id"])["total"]["held"] == 0


def test_an_unlocked_card_is_approved_again(core: CoreStack) -> None:
    opened = open_account(core.client)
    set_status(core, opened, "locked")
    assert decision(core, opened, 10_000)["response_code"] == "05"
    set_status(core, opened, "active")
    assert decision(core, opened, 10_000)["response_code"] == "00"


def test_a_replaced_card_is_closed_and_declined_as_invalid(core: CoreStack) -> None:
    opened = open_account(core.client)
    response = core.client.post(f"/v1/cards/{opened['card_id']}/replace")
    assert response.status_code in (200, 201), response.text
    assert decision(core, opened, 10_000)["response_code"] == "14"


# ---- expiry -------------------------------------------------------------------------------------


def test_an_expiry_that_differs_from_the_cards_is_declined_as_expired(core: CoreStack) -> None:
    opened = open_account(core.client)
    month, year = opened["expiry"].split("/")
    other = f"{month}/{int(year) + 1:02d}"
    answer = decision(core, opened, 10_000, expiry=other)
    assert (answer["approved"], answer["response_code"]) == (False, "54")


def test_a_card_past_its_expiry_is_declined_as_expired(core: CoreStack) -> None:
    opened = open_account(core.client)
    # the issuer printed this card long ago: move its expiry into the past
    core.psql(opened["cell"], "UPDATE cards SET expiry = '01/21' WHERE card_id = $1", opened["card_id"])
    answer = decision(core, opened, 10_000, expiry="01/21")
    assert (answer["approved"], answer["response_code"]) == (False, "54")


# ---- channel, MCC and the single-amount limit ---------------------------------------------------


def test_gambling_merchants_are_not_permitted(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = decision(core, opened, 10_000, mcc="7995")
    assert (answer["approved"], answer["response_code"]) == (False, "57")


def test_cash_is_not_given_online(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = decision(core, opened, 10_000, kind="cash", channel="online", mcc="6011")
    assert (answer["approved"], answer["response_code"]) == (False, "57")


def test_an_atm_does_not_sell_goods(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = decision(core, opened, 10_000, kind="purchase", channel="atm")
    assert (answer["approved"], answer["response_code"]) == (False, "57")


@pytest.mark.parametrize("channel", ["pos", "online"])
def test_purchases_are_permitted_at_the_point_of_sale_and_online(core: CoreStack, channel: str) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, 10_000, channel=channel)["response_code"] == "00"


def test_cash_at_a_point_of_sale_is_permitted(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, 10_000, kind="cash", channel="pos", mcc="6010")["response_code"] == "00"


def test_a_purchase_up_to_the_single_amount_limit_is_approved_and_one_fen_more_is_not(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, SINGLE_PURCHASE_MAX + 1)["response_code"] == "61"
    assert decision(core, opened, SINGLE_PURCHASE_MAX)["response_code"] == "00"


def test_a_cash_withdrawal_up_to_the_cash_single_amount_limit_is_approved_and_one_fen_more_is_not(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, SINGLE_CASH_MAX + 1, **CASH)["response_code"] == "61"
    assert decision(core, opened, SINGLE_CASH_MAX, **CASH)["response_code"] == "00"


# ---- credit -------------------------------------------------------------------------------------


def test_a_purchase_beyond_the_available_credit_is_declined_as_insufficient(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 5_000_000)
    approved(core.client, opened, 3_000_000)
    answer = decision(core, opened, 1_000_001)
    assert (answer["approved"], answer["response_code"]) == (False, "51")
    assert answer["available"] == 1_000_000
    last = decision(core, opened, 1_000_000)
    assert last["response_code"] == "00"
    assert last["available"] == 0
    view = lines(core.client, opened["customer_id"])
    assert view["total"]["available"] == 0
    assert view["total"]["held"] == LIMIT


def test_cash_is_declined_when_the_cash_line_is_spent_although_the_total_has_room(core: CoreStack) -> None:
    opened = open_account(core.client)
    for _ in range(CASH_LIMIT // SINGLE_CASH_MAX):
        approved(core.client, opened, SINGLE_CASH_MAX, **CASH)
    answer = decision(core, opened, 1, **CASH)
    assert (answer["approved"], answer["response_code"], answer["available"]) == (False, "51", 0)
    view = lines(core.client, opened["customer_id"])
    assert view["total"]["available"] == LIMIT - CASH_LIMIT
    assert decision(core, opened, 10_000)["response_code"] == "00"


def test_cash_is_declined_when_the_total_is_spent_although_the_cash_line_has_room(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 5_000_000)
    approved(core.client, opened, 3_800_000)
    answer = decision(core, opened, 300_000, **CASH)
    assert (answer["approved"], answer["response_code"]) == (False, "51")
    assert answer["available"] == 200_000  # the cash line shows no more than the total has
    assert decision(core, opened, 200_000, **CASH)["response_code"] == "00"


def test_a_purchase_is_declined_when_the_purchase_line_is_below_the_total(core: CoreStack) -> None:
    opened = open_account(core.client)
    response = core.client.post(
        f"/v1/customers/{opened['customer_id']}/limits", json={"line": "purchase", "limit": 1_000_000}
    )
    assert response.status_code == 200, response.text
    answer = decision(core, opened, 1_000_001)
    assert (answer["approved"], answer["response_code"], answer["available"]) == (False, "51", 1_000_000)
    assert decision(core, opened, 1_000_000)["response_code"] == "00"


def test_posted_purchases_count_against_the_credit_like_holds(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 4_000_000)
    approved(core.client, opened, 4_000_000)
    answer = decision(core, opened, 1_000_001)
    assert answer["response_code"] == "51"
    assert answer["available"] == 1_000_000


# ---- the decision order -------------------------------------------------------------------------


def test_card_status_is_checked_before_the_expiry(core: CoreStack) -> None:
    opened = open_account(core.client)
    set_status(core, opened, "lost")
    assert decision(core, opened, 10_000, expiry="01/21")["response_code"] == "41"


def test_the_expiry_is_checked_before_the_merchant(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, 10_000, expiry="01/21", mcc="7995")["response_code"] == "54"


def test_the_merchant_and_channel_are_checked_before_the_single_amount_limit(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert decision(core, opened, SINGLE_PURCHASE_MAX + 1, mcc="7995")["response_code"] == "57"
    assert decision(core, opened, SINGLE_CASH_MAX + 1, kind="cash", channel="online")["response_code"] == "57"


def test_the_single_amount_limit_is_checked_before_the_credit(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 5_000_000)
    approved(core.client, opened, 4_000_000)
    assert decision(core, opened, SINGLE_PURCHASE_MAX + 1)["response_code"] == "61"
    assert decision(core, opened, 1)["response_code"] == "51"


def test_a_malformed_request_is_rejected_before_any_decision(core: CoreStack) -> None:
    opened = open_account(core.client)
    bad_pan = opened["pan"][:-1] + str((int(opened["pan"][-1]) + 1) % 10)
    response = authorize(core.client, opened, 10_000, pan=bad_pan)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "pan"
    response = authorize(core.client, opened, 0)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "amount"
    assert lines(core.client, opened["customer_id"])["total"]["held"] == 0


# ---- real-time offer ----------------------------------------------------------------------------


def make_first_installment_candidate(core: CoreStack, opened: dict[str, Any]) -> None:
    """The tag is set by its rule: 500 CNY of cleared purchases and no installment plan yet."""
    purchase(core.client, opened, 50_000)
    response = core.client.get(f"/v1/customers/{opened['customer_id']}/tags")
    assert response.status_code == 200, response.text
    assert "first_installment_candidate" in str(response.json()), response.text


def test_a_first_installment_candidate_gets_a_half_fee_installment_offer_on_a_large_purchase(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    make_first_installment_candidate(core, opened)
    answer = decision(core, opened, 50_000)
    assert answer["approved"] is True
    offer = answer["offer"]
    assert offer["terms"] == 12
    assert offer["fee_rate"] == pytest.approx(0.006 * 0.5)
    trace = offer["pricing_trace"]
    assert trace[0]["layer"] == "catalogue" and trace[0]["value"] == pytest.approx(0.006)
    # the campaign halves the catalogue price: both steps make the price, the campaign's is it
    applied = [step for step in trace if step["applied"]]
    assert [step["layer"] for step in applied] == ["catalogue", "transaction"]
    assert applied[-1]["value"] == pytest.approx(0.003)


def test_no_offer_below_500_cny_for_cash_without_the_tag_or_once_a_plan_exists(core: CoreStack) -> None:
    untagged = open_account(core.client)
    assert decision(core, untagged, 60_000).get("offer") is None

    opened = open_account(core.client)
    make_first_installment_candidate(core, opened)
    assert decision(core, opened, 49_999).get("offer") is None
    assert decision(core, opened, 60_000, **CASH).get("offer") is None
    cleared = purchase(core.client, opened, 100_000)
    booked = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    assert decision(core, opened, 100_000).get("offer") is None


def test_a_declined_purchase_carries_no_offer(core: CoreStack) -> None:
    opened = open_account(core.client)
    make_first_installment_candidate(core, opened)
    answer = decision(core, opened, 60_000, mcc="7995")
    assert answer["approved"] is False
    assert answer.get("offer") is None


# ---- hold expiry (a private stack whose holds last one second) ----------------------------------


def test_an_expired_hold_stops_counting_on_the_lines(core_factory: Callable[[], CoreStack]) -> None:
    stack = core_factory()
    app = stack.start_app([1, 2], hold_ttl_seconds=1)
    stack.start_gateway({1: [app.url], 2: [app.url]})
    opened = open_account(stack.client)
    approved(stack.client, opened, 5_000_000)
    approved(stack.client, opened, 3_000_000)
    answer = authorize(stack.client, opened, 2_000_000).json()
    assert answer["response_code"] == "51"
    time.sleep(1.5)
    view = lines(stack.client, opened["customer_id"])
    assert view["purchase"]["held"] == 0
    assert view["total"]["available"] == LIMIT
    answer = authorize(stack.client, opened, 2_000_000).json()
    assert answer["response_code"] == "00"
    assert answer["available"] == LIMIT - 2_000_000
    view = lines(stack.client, opened["customer_id"])
    assert view["purchase"]["held"] == 2_000_000
    assert_books_balance(stack.client)
