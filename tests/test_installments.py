"""Installments: the per-period fee schedule and its real APR, quotes, booking, payoff."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from cardcore.installments import schedule as schedules

from tests.cards import (
    approved,
    assert_books_balance,
    book_installment,
    clear,
    key,
    lines,
    open_account,
    purchase,
)
from tests.fixtures_core import CoreStack

LIMIT = 9_000_000
STD_FEE_RATES = {3: 0.0075, 6: 0.007, 12: 0.006, 24: 0.0065}


def irr_by_newton(principal: int, payments: list[int]) -> float:
    """An independent IRR: Newton's method on principal = sum(payment_k / (1 + r)^k)."""
    rate = 0.01
    for _ in range(100):
        value = sum(p / (1 + rate) ** k for k, p in enumerate(payments, start=1)) - principal
        slope = sum(-k * p / (1 + rate) ** (k + 1) for k, p in enumerate(payments, start=1))
        step = value / slope
        rate -= step
        if abs(step) < 1e-14:
            break
    return rate


# ---- the schedule, unit-tested ------------------------------------------------------------------


def test_each_period_pays_an_equal_share_of_principal_and_the_per_period_fee() -> None:
    periods = schedules.schedule(1_200_000, 12, 0.006)
    assert len(periods) == 12
    assert [p.period for p in periods] == list(range(1, 13))
    assert all(p.principal_fen == 100_000 and p.fee_fen == 7_200 for p in periods)
    assert all(p.payment_fen == 107_200 for p in periods)


def test_the_rounding_remainder_of_the_principal_falls_in_the_last_period() -> None:
    periods = schedules.schedule(1_000_001, 12, 0.006)
    assert [p.principal_fen for p in periods[:-1]] == [83_333] * 11
    assert periods[-1].principal_fen == 1_000_001 - 11 * 83_333
    assert all(p.fee_fen == 6_000 for p in periods)


def test_the_rounding_remainder_of_the_fee_falls_in_the_last_period() -> None:
    periods = schedules.schedule(100_001, 3, 0.0075)  # fee 750.0075 a period: 2,250 in all
    fees = [p.fee_fen for p in periods]
    assert sum(fees) == 2_250
    assert fees[:-1] == [750, 750]


@pytest.mark.parametrize("principal", [50_000, 99_999, 123_457, 1_000_000, 5_000_003, 99_999_999])
@pytest.mark.parametrize("terms", [3, 6, 12, 24])
def test_the_principals_of_a_schedule_sum_to_the_amount_converted(principal: int, terms: int) -> None:
    periods = schedules.schedule(principal, terms, STD_FEE_RATES[terms])
    assert sum(p.principal_fen for p in periods) == principal
    assert len(periods) == terms
    assert all(p.principal_fen >= 0 and p.fee_fen >= 0 for p in periods)
    share = principal // terms
    assert all(p.principal_fen == share for p in periods[:-1])
    assert 0 <= periods[-1].principal_fen - share < terms
    assert sum(p.fee_fen for p in periods) == round(principal * STD_FEE_RATES[terms] * terms)


def test_twelve_periods_at_0_6_percent_a_period_cost_about_13_percent_a_year() -> None:
    periods = schedules.schedule(1_200_000, 12, 0.006)
    apr = schedules.apr(1_200_000, periods)
    assert apr == pytest.approx(0.1302, abs=0.0005)
    # the flat rate is 7.2 % a year; the real rate is almost twice that
    assert apr > 0.006 * 12 * 1.7


def test_the_apr_is_twelve_times_the_internal_rate_of_return_of_the_schedule() -> None:
    for principal, terms in [(1_200_000, 12), (600_000, 3), (777_777, 6), (2_400_000, 24)]:
        periods = schedules.schedule(principal, terms, STD_FEE_RATES[terms])
        payments = [p.payment_fen for p in periods]
        expected = irr_by_newton(principal, payments) * 12
        assert schedules.apr(principal, periods) == pytest.approx(expected, abs=2e-6)
        assert schedules.monthly_irr(principal, payments) == pytest.approx(expected / 12, abs=1e-9)


def test_a_schedule_without_a_fee_costs_nothing() -> None:
    periods = schedules.schedule(300_000, 3, 0.0)
    assert sum(p.fee_fen for p in periods) == 0
    assert schedules.apr(300_000, periods) == 0.0


def test_the_same_fee_a_period_over_more_periods_is_a_higher_real_rate() -> None:
    # the fee is charged on the original principal while the balance owed shrinks
    short = schedules.apr(1_200_000, schedules.schedule(1_200_000, 3, 0.006))
    long = schedules.apr(1_200_000, schedules.schedule(1_200_000, 24, 0.006))
    assert 0.006 * 12 < short < long < 2 * 0.006 * 12


# ---- on the real stack --------------------------------------------------------------------------


@pytest.fixture
def books(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def quote(core: CoreStack, account_id: str, amount: int, terms: list[int]) -> dict[int, dict[str, Any]]:
    response = core.client.post(
        "/v1/installments/quote", json={"account_id": account_id, "amount": amount, "terms": terms}
    )
    assert response.status_code == 200, response.text
    return {option["terms"]: option for option in response.json()["options"]}


def applied_rate(trace: list[dict[str, Any]]) -> float:
    """The price a trace gives: the value of its last step applied (a multiplier's base is
    applied too); every step left out says why."""
    applied = [step for step in trace if step["applied"]]
    assert applied, trace
    assert all(step.get("reason") for step in trace if not step["applied"]), trace
    value: float = applied[-1]["value"]
    return value


def ledgers(core: CoreStack, opened: dict[str, Any]) -> dict[str, int]:
    rows = core.psql(
        opened["cell"],
        "SELECT gl, sum(debit_fen - credit_fen)::bigint FROM postings WHERE account_id = $1 GROUP BY gl",
        opened["account_id"],
    )
    return {row[0]: int(row[1]) for row in rows if row[1] != 0}


def payoff(core: CoreStack, plan_id: str) -> Any:
    return core.client.post(f"/v1/installments/{plan_id}/payoff", json={"idempotency_key": key()})


def test_a_quote_gives_each_term_its_fee_first_payment_real_apr_and_pricing_trace(
    core: CoreStack, books: None
) -> None:
    opened = open_account(core.client)
    options = quote(core, opened["account_id"], 1_200_000, [3, 6, 12, 24])
    assert sorted(options) == [3, 6, 12, 24]
    for terms, option in options.items():
        trace = option["pricing_trace"]
        assert trace[0]["layer"] == "catalogue"
        assert trace[0]["value"] == pytest.approx(STD_FEE_RATES[terms])
        rate = applied_rate(trace)
        periods = schedules.schedule(1_200_000, terms, rate)
        assert option["fee_per_period"] == periods[0].fee_fen
        assert option["total_fee"] == sum(p.fee_fen for p in periods)
        assert option["first_payment"] == periods[0].payment_fen
        assert option["apr"] == pytest.approx(
            irr_by_newton(1_200_000, [p.payment_fen for p in periods]) * 12, abs=1e-5
        )
    twelve = options[12]
    if applied_rate(twelve["pricing_trace"]) == pytest.approx(0.006):
        assert (twelve["fee_per_period"], twelve["total_fee"], twelve["first_payment"]) == (
            7_200,
            86_400,
            107_200,
        )
        assert twelve["apr"] == pytest.approx(0.1302, abs=0.0005)


def test_a_quote_changes_nothing(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    before = core.psql(opened["cell"], "SELECT count(*) FROM postings")[0][0]
    quote(core, opened["account_id"], 600_000, [3])
    assert core.psql(opened["cell"], "SELECT count(*) FROM postings")[0][0] == before
    assert lines(core.client, opened["customer_id"])["installment"]["used"] == 0


def test_a_quote_for_terms_the_product_does_not_offer_or_below_500_cny_is_refused(
    core: CoreStack, books: None
) -> None:
    opened = open_account(core.client)
    response = core.client.post(
        "/v1/installments/quote", json={"account_id": opened["account_id"], "amount": 600_000, "terms": [5]}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "terms"
    response = core.client.post(
        "/v1/installments/quote", json={"account_id": opened["account_id"], "amount": 49_999, "terms": [3]}
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["field"] == "amount"


def test_booking_a_purchase_moves_its_principal_onto_the_installment_line(
    core: CoreStack, books: None
) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    response = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 6)
    assert response.status_code == 201, response.text
    plan = response.json()
    assert plan["plan_id"].startswith("IP")
    schedule = plan["schedule"]
    assert len(schedule) == 6
    assert sum(p["principal"] for p in schedule) == 600_000
    assert all(p["payment"] == p["principal"] + p["fee"] for p in schedule)
    assert ledgers(core, opened) == {"installment_unbilled": 600_000}
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["used"] == 0
    assert view["installment"]["used"] == 600_000
    assert view["installment"]["available"] == LIMIT - 600_000
    assert view["total"]["used"] == 600_000
    assert view["total"]["available"] == LIMIT - 600_000
    listed = core.client.get(f"/v1/accounts/{opened['account_id']}/installments")
    assert listed.status_code == 200, listed.text
    (only,) = listed.json()["plans"]
    assert only["plan_id"] == plan["plan_id"]
    assert only["transaction_id"] == cleared["transaction_id"]
    assert only["status"] == "active"


def test_a_first_plan_is_booked_at_the_half_fee_campaign(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 1_200_000)  # makes the customer a first-installment candidate
    response = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 12)
    assert response.status_code == 201, response.text
    schedule = response.json()["schedule"]
    assert schedule[0]["fee"] == 3_600  # 0.6 % x 0.5 of 1,200,000


def test_converting_the_same_purchase_twice_is_a_conflict(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    assert (
        book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3).status_code == 201
    )
    again = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 6)
    assert again.status_code == 409, again.text
    assert ledgers(core, opened) == {"installment_unbilled": 600_000}


def test_a_cash_withdrawal_cannot_be_converted(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    auth = approved(core.client, opened, 300_000, kind="cash", channel="atm", mcc="6011")
    cleared = clear(core.client, auth["auth_id"], 300_000)
    response = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["field"] == "transaction_id"


def test_a_purchase_under_500_cny_cannot_be_converted(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 49_999)
    response = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3)
    assert response.status_code == 422, response.text


def test_a_purchase_of_another_account_cannot_be_converted(core: CoreStack, books: None) -> None:
    mine, other = open_account(core.client), open_account(core.client)
    cleared = purchase(core.client, other, 100_000)
    response = book_installment(core.client, mine["account_id"], cleared["transaction_id"], 3)
    assert response.status_code in (404, 422), response.text
    assert ledgers(core, other) == {"purchase": 100_000}


def test_a_plan_the_installment_line_cannot_carry_is_refused(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    response = core.client.post(
        f"/v1/customers/{opened['customer_id']}/limits", json={"line": "installment", "limit": 500_000}
    )
    assert response.status_code == 200, response.text
    cleared = purchase(core.client, opened, 600_000)
    response = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3)
    assert response.status_code == 422, response.text
    assert ledgers(core, opened) == {"purchase": 600_000}


def test_paying_off_a_plan_bills_the_remaining_principal_now_and_waives_the_remaining_fees(
    core: CoreStack, books: None
) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    booked = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 6)
    assert booked.status_code == 201, booked.text
    plan = booked.json()
    response = payoff(core, plan["plan_id"])
    assert response.status_code == 200, response.text
    assert ledgers(core, opened) == {"installment_billed": 600_000}  # no fee was ever charged
    listed = core.client.get(f"/v1/accounts/{opened['account_id']}/installments").json()["plans"]
    assert listed[0]["status"] == "paid_off"
    view = lines(core.client, opened["customer_id"])
    assert view["installment"]["used"] == 600_000
    assert view["total"]["used"] == 600_000


def test_paying_off_a_plan_twice_is_a_conflict(core: CoreStack, books: None) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 600_000)
    plan = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3).json()
    assert payoff(core, plan["plan_id"]).status_code == 200
    again = payoff(core, plan["plan_id"])
    assert again.status_code == 409, again.text
    assert ledgers(core, opened) == {"installment_billed": 600_000}


def test_paying_off_an_unknown_plan_is_not_found(core: CoreStack, books: None) -> None:
    from cardcore.common import ids

    response = payoff(core, ids.new_id(ids.PREFIX_PLAN, 1))
    assert response.status_code == 404, response.text
    assert response.json()["error"]["field"] == "plan_id"
