"""The statement cycle: installment billing, interest by value date, the grace period, late fees,
statements with their lines, the minimum due, statement installments and early payoff.

The cycle of a business date runs for every account of that cycle day and moves the cell's
business date (postings are valued on it), so these tests run on a private stack of their own,
and each takes business dates in a year no test took before (``cycle_dates``), whatever order
they run in: the business date only moves forward.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    book_installment,
    clear,
    database_fingerprint,
    key,
    open_account,
    purchase,
    repay,
)
from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer

APR = 0.1825  # 0.05 % a day: 500 fen a day on 1,000,000
DAILY_RATE = 0.0005
GRACE_DAYS = 20
FLOOR = 10_000
LATE_FEE_RATE = 0.05
LATE_FEE_MIN = 1_000
_YEARS = itertools.count(2031)


def fresh_year() -> int:
    """A year no test of this module used before: its dates are after the business date."""
    return next(_YEARS)


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer) -> Iterator[CoreStack]:
    own = new_stack(postgres)
    try:
        app = own.start_app([1, 2])
        own.start_gateway({1: [app.url], 2: [app.url]})
        yield own
    finally:
        own.close()


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(stack: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(stack.client)


def cycle_day(stack: CoreStack, opened: dict[str, Any]) -> int:
    response = stack.client.get(f"/v1/customers/{opened['customer_id']}")
    assert response.status_code == 200, response.text
    (account,) = [a for a in response.json()["accounts"] if a["account_id"] == opened["account_id"]]
    day: int = account["cycle_day"]
    assert 1 <= day <= 28
    return day


def run_cycle(stack: CoreStack, business_date: date) -> dict[str, Any]:
    response = stack.client.post("/v1/admin/cycle", json={"business_date": business_date.isoformat()})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def statements(stack: CoreStack, opened: dict[str, Any]) -> list[dict[str, Any]]:
    """Oldest first."""
    response = stack.client.get(f"/v1/accounts/{opened['account_id']}/statements")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["statements"]
    return sorted(found, key=lambda s: s["statement_date"])


def balance(stack: CoreStack, opened: dict[str, Any]) -> dict[str, Any]:
    response = stack.client.get(f"/v1/accounts/{opened['account_id']}/balance")
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


def ledgers(stack: CoreStack, opened: dict[str, Any]) -> dict[str, int]:
    rows = stack.psql(
        opened["cell"],
        "SELECT gl, sum(debit_fen - credit_fen)::bigint FROM postings WHERE account_id = $1 GROUP BY gl",
        opened["account_id"],
    )
    return {row[0]: int(row[1]) for row in rows if row[1] != 0}


def plans(stack: CoreStack, opened: dict[str, Any]) -> list[dict[str, Any]]:
    response = stack.client.get(f"/v1/accounts/{opened['account_id']}/installments")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["plans"]
    return found


def cycle_dates(stack: CoreStack, opened: dict[str, Any], count: int) -> list[date]:
    """The account's cycle dates of ``count`` consecutive months from January of a fresh year."""
    day = cycle_day(stack, opened)
    year = fresh_year()
    return [date(year + (month - 1) // 12, (month - 1) % 12 + 1, day) for month in range(1, count + 1)]


def advance(stack: CoreStack, business_date: date) -> None:
    """Move the cell's business date (the end of day does): what is posted next is valued on it."""
    run_cycle(stack, business_date)


def transactions(stack: CoreStack, opened: dict[str, Any]) -> list[dict[str, Any]]:
    response = stack.client.get(f"/v1/accounts/{opened['account_id']}/transactions", params={"limit": 200})
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["transactions"]
    return found


def statement_lines(stack: CoreStack, opened: dict[str, Any], statement_id: str) -> list[dict[str, Any]]:
    response = stack.client.get(f"/v1/accounts/{opened['account_id']}/statements/{statement_id}")
    assert response.status_code == 200, response.text
    found: list[dict[str, Any]] = response.json()["lines"]
    return found


def interest_of(fen_days: int) -> int:
    """Interest at the product APR on a sum of daily balances (fen x days), half up."""
    exact = Decimal(fen_days) * Decimal("0.1825") / 365
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


# ---- statements ---------------------------------------------------------------------------------


def test_a_statement_shows_the_posted_balance_the_minimum_due_and_the_due_date(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    approved(stack.client, opened, 100_000)  # an open hold is not on the statement
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    (statement,) = statements(stack, opened)
    assert statement["statement_date"] == statement_date.isoformat()
    assert statement["due_date"] == (statement_date + timedelta(days=GRACE_DAYS)).isoformat()
    assert statement["statement_balance"] == 300_000
    assert statement["minimum_due"] == 30_000  # 10 % of the revolving balance
    assert statement["interest"] == 0
    shown = balance(stack, opened)
    assert shown["statement_balance"] == 300_000
    assert shown["minimum_due"] == 30_000
    assert shown["due_date"] == statement["due_date"]
    assert shown["posted"] == 300_000
    assert shown["held"] == 100_000


@pytest.mark.parametrize(
    ("owed", "minimum"),
    [
        (50_000, FLOOR),  # 10 % is below the floor of 100 CNY
        (100_000, FLOOR),
        (5_000, 5_000),  # never more than the balance
        (1_234_567, 123_457),
    ],
)
def test_the_minimum_due_is_ten_percent_with_a_floor_and_never_above_the_balance(
    stack: CoreStack, owed: int, minimum: int
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, owed)
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    (statement,) = statements(stack, opened)
    assert (statement["statement_balance"], statement["minimum_due"]) == (owed, minimum)


def test_an_account_that_owes_nothing_has_nothing_due(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    for statement in statements(stack, opened):
        assert (statement["statement_balance"], statement["minimum_due"], statement["interest"]) == (0, 0, 0)
    assert balance(stack, opened)["minimum_due"] == 0


def test_the_cycle_runs_only_for_accounts_whose_cycle_day_it_is(stack: CoreStack) -> None:
    due = open_account(stack.client)
    day = cycle_day(stack, due)
    other = open_account(stack.client)
    while cycle_day(stack, other) == day:
        other = open_account(stack.client)
    purchase(stack.client, due, 100_000)
    purchase(stack.client, other, 100_000)
    run_cycle(stack, date(fresh_year(), 3, day))
    assert len(statements(stack, due)) == 1
    assert statements(stack, other) == []
    assert balance(stack, other)["statement_balance"] == 0


def test_a_repayment_after_the_statement_lowers_the_minimum_still_due(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    repay(stack.client, opened["account_id"], 20_000)
    assert balance(stack, opened)["minimum_due"] == 10_000
    repay(stack.client, opened["account_id"], 20_000)
    assert balance(stack, opened)["minimum_due"] == 0


# ---- interest -----------------------------------------------------------------------------------


def test_interest_is_charged_when_the_previous_statement_was_not_paid_by_its_due_date(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    run_cycle(stack, second)
    old, new = statements(stack, opened)
    assert old["interest"] == 0
    interest = new["interest"]
    assert interest == interest_of(300_000 * (second - first).days)  # every day of the cycle
    late_fee = 1_500  # 5 % of the 30,000 minimum left unpaid at the due date
    assert (new["late_fee"], new["fees"]) == (late_fee, late_fee)
    assert ledgers(stack, opened) == {"purchase": 300_000, "interest": interest, "fees": late_fee}
    assert new["statement_balance"] == 300_000 + interest + late_fee
    assert new["past_due"] == 30_000
    # in full: the past due, the fee and the interest of the cycle; 10 % of the 270,000 left
    assert new["minimum_due"] == 30_000 + late_fee + interest + 27_000
    answer = repay(stack.client, opened["account_id"], 300_000 + interest + late_fee)
    assert answer["allocation"]["fees"] == late_fee
    assert answer["allocation"]["interest"] == interest
    assert answer["allocation"]["purchase"] == 300_000
    assert ledgers(stack, opened) == {}


def test_no_interest_when_the_previous_statement_was_paid_in_full(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    repay(stack.client, opened["account_id"], 300_000)
    purchase(stack.client, opened, 70_000)
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert new["interest"] == 0
    assert new["statement_balance"] == 70_000
    assert "interest" not in ledgers(stack, opened)


def test_a_partly_paid_statement_is_charged_interest_on_no_more_than_what_was_left(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    repay(stack.client, opened["account_id"], 200_000)
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert new["interest"] == interest_of(100_000 * (second - first).days)
    assert new["late_fee"] == 0  # more than the minimum was paid, the day after the statement


# ---- installments billed by the cycle -----------------------------------------------------------


def test_each_cycle_bills_one_period_of_a_plan_until_it_is_complete(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    schedule = booked.json()["schedule"]
    purchase(stack.client, opened, 300_000)
    dates = cycle_dates(stack, opened, 4)

    run_cycle(stack, dates[0])
    first_fee = schedule[0]["fee"]
    assert first_fee > 0
    assert ledgers(stack, opened) == {
        "purchase": 300_000,
        "installment_unbilled": 400_000,
        "installment_billed": 200_000,
        "fees": first_fee,
    }
    (statement,) = statements(stack, opened)
    assert statement["statement_balance"] == 300_000 + 200_000 + first_fee
    assert statement["fees"] == first_fee
    # 10 % of the revolving 300,000, plus the period's fee and principal, each counted once
    assert statement["minimum_due"] == 30_000 + first_fee + 200_000
    assert statement["installment_due"] in (200_000, 200_000 + first_fee)
    assert plans(stack, opened)[0]["periods_billed"] == 1

    for business_date in dates[1:]:
        run_cycle(stack, business_date)
    books = ledgers(stack, opened)
    assert "installment_unbilled" not in books
    assert books["installment_billed"] == 600_000
    listed = statements(stack, opened)
    installment_fees = [s["fees"] - s["late_fee"] for s in listed]
    assert installment_fees == [p["fee"] for p in schedule] + [0]
    assert books["fees"] == sum(p["fee"] for p in schedule) + sum(s["late_fee"] for s in listed)
    (plan,) = plans(stack, opened)
    assert (plan["status"], plan["periods_billed"]) == ("completed", 3)


def test_a_plan_paid_off_after_one_period_bills_the_rest_of_the_principal_and_no_more_fees(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    plan = booked.json()
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    first_fee = plan["schedule"][0]["fee"]
    response = stack.client.post(
        f"/v1/installments/{plan['plan_id']}/payoff", json={"idempotency_key": key()}
    )
    assert response.status_code == 200, response.text
    assert ledgers(stack, opened) == {"installment_billed": 600_000, "fees": first_fee}
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert new["fees"] == new["late_fee"], "no installment fee after the payoff"
    books = ledgers(stack, opened)
    assert books["installment_billed"] == 600_000
    assert books["fees"] == first_fee + new["late_fee"]
    assert "installment_unbilled" not in books


def test_a_repayment_after_billing_pays_the_fee_then_the_billed_installment(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    fee = booked.json()["schedule"][0]["fee"]
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    answer = repay(stack.client, opened["account_id"], fee + 250_000)
    assert answer["allocation"] == {
        "fees": fee,
        "interest": 0,
        "installment_due": 200_000,
        "cash": 0,
        "purchase": 0,
        "credit_balance": 50_000,
    }


# ---- idempotent and online ----------------------------------------------------------------------


def test_running_the_same_business_date_twice_changes_nothing(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    assert (
        book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3).status_code == 201
    )
    purchase(stack.client, opened, 200_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    run_cycle(stack, second)  # bills a period and charges interest
    listed = statements(stack, opened)
    books = {cell: stack.client.get(f"/v1/admin/trial-balance?cell={cell}").json() for cell in (1, 2)}
    fingerprint = database_fingerprint(stack)
    run_cycle(stack, second)
    run_cycle(stack, first)
    assert statements(stack, opened) == listed
    assert {cell: stack.client.get(f"/v1/admin/trial-balance?cell={cell}").json() for cell in (1, 2)} == books
    assert database_fingerprint(stack) == fingerprint


def test_authorizations_keep_being_answered_while_the_cycle_runs(stack: CoreStack) -> None:
    busy = [open_account(stack.client) for _ in range(6)]
    for opened in busy:
        purchase(stack.client, opened, 100_000)
    shopper = open_account(stack.client)
    answers: list[dict[str, Any]] = []
    stop = threading.Event()

    def shop() -> None:
        while not stop.is_set() and len(answers) < 200:
            response = stack.client.post(
                "/v1/authorizations",
                json={
                    "idempotency_key": key(),
                    "pan": shopper["pan"],
                    "expiry": shopper["expiry"],
                    "amount": 100,
                    "currency": "CNY",
                    "mcc": "5411",
                    "merchant_id": "M-0001",
                    "channel": "pos",
                    "kind": "purchase",
                },
            )
            answers.append({"status": response.status_code, **response.json()})

    worker = threading.Thread(target=shop)
    worker.start()
    year = fresh_year()
    try:
        for opened in busy:
            run_cycle(stack, date(year, 5, cycle_day(stack, opened)))
    finally:
        stop.set()
        worker.join(timeout=30)
    assert answers
    assert all(a["status"] == 200 and a["response_code"] == "00" for a in answers), answers[:3]
    for opened in busy:
        assert len(statements(stack, opened)) == 1


# ---- interest by value date: the days a balance was owed, the grace, the late fee -------------


def test_a_statement_paid_in_full_after_its_due_date_is_charged_interest_for_the_days_owed_and_a_late_fee(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)  # January and February: 31 days apart
    run_cycle(stack, first)
    (statement,) = statements(stack, opened)
    assert (statement["statement_balance"], statement["minimum_due"]) == (1_000_000, 100_000)
    paid_on = first + timedelta(days=29)  # nine days after the due date
    advance(stack, paid_on)
    assert repay(stack.client, opened["account_id"], 1_000_000)["value_date"] == paid_on.isoformat()
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    # owed from the day after the statement to the day before the payment: 28 days x 500 fen
    assert new["interest"] == 14_000
    assert new["late_fee"] == 5_000  # 5 % of the 100,000 minimum unpaid at the due date
    assert new["fees"] == 5_000
    assert ledgers(stack, opened) == {"interest": 14_000, "fees": 5_000}
    assert (new["statement_balance"], new["past_due"], new["minimum_due"]) == (19_000, 0, 19_000)


@pytest.mark.parametrize("paid_after_days", [1, 30])
def test_a_repayment_counts_from_the_day_it_is_valued(stack: CoreStack, paid_after_days: int) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    advance(stack, first + timedelta(days=paid_after_days))
    repay(stack.client, opened["account_id"], 500_000)  # half: the grace is lost either way
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    days = (second - first).days
    owed_in_full = paid_after_days - 1
    assert new["interest"] == interest_of(1_000_000 * owed_in_full + 500_000 * (days - owed_in_full))
    assert new["late_fee"] == (0 if paid_after_days <= GRACE_DAYS else 5_000)


def test_new_purchases_bear_interest_from_their_value_date_while_the_customer_revolves(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    repay(stack.client, opened["account_id"], 100_000)  # the minimum, the day after: no late fee
    bought_on = first + timedelta(days=10)
    advance(stack, bought_on)
    purchase(stack.client, opened, 200_000)
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    days = (second - first).days
    assert new["interest"] == interest_of(900_000 * days + 200_000 * (second - bought_on).days + 200_000)
    assert new["late_fee"] == 0


def test_purchases_bear_no_interest_when_the_previous_statement_was_paid_in_full_by_its_due_date(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    advance(stack, first + timedelta(days=GRACE_DAYS))  # on the due date itself
    repay(stack.client, opened["account_id"], 1_000_000)
    purchase(stack.client, opened, 200_000)
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert (new["interest"], new["late_fee"], new["statement_balance"]) == (0, 0, 200_000)


# ---- the minimum due ----------------------------------------------------------------------------


def test_a_cash_advance_bears_interest_from_its_day_and_its_fee_is_on_the_statement_and_due_in_full(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    (statement_date,) = cycle_dates(stack, opened, 1)
    advance(stack, statement_date - timedelta(days=10))
    auth = approved(stack.client, opened, 100_000, kind="cash", channel="atm", mcc="6011")
    clear(stack.client, auth["auth_id"], 100_000)  # a fee of 1,000 (1 %, the minimum too)
    run_cycle(stack, statement_date)
    (statement,) = statements(stack, opened)
    interest = interest_of(100_000 * 11)  # the day it was withdrawn to the statement date
    assert statement["interest"] == interest == 550
    assert statement["fees"] == 1_000
    assert statement["statement_balance"] == 100_000 + 1_000 + interest
    assert statement["minimum_due"] == 1_000 + interest + 10_000  # 10 % of the cash itself
    lines = {
        line["kind"]: line["amount"] for line in statement_lines(stack, opened, statement["statement_id"])
    }
    assert lines == {"cash": 100_000, "cash_advance_fee": 1_000, "interest": interest}


def test_the_floor_is_the_floor_of_the_whole_minimum_not_added_to_the_installment(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    fee = booked.json()["schedule"][0]["fee"]
    purchase(stack.client, opened, 50_000)  # 10 % of it is 5,000, below the floor of 10,000
    (statement_date,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, statement_date)
    (statement,) = statements(stack, opened)
    assert statement["minimum_due"] == 200_000 + fee + 5_000


def test_a_minimum_left_unpaid_is_carried_into_the_next_minimum_in_full(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    repay(stack.client, opened["account_id"], 40_000)  # 60,000 of the 100,000 minimum left
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert new["past_due"] == 60_000
    assert new["late_fee"] == 3_000
    interest = new["interest"]
    assert interest == interest_of(960_000 * (second - first).days)
    rest = 960_000 + interest + 3_000 - (60_000 + 3_000 + interest)
    assert new["minimum_due"] == 60_000 + 3_000 + interest + rest // 10
    assert balance(stack, opened)["minimum_due"] == new["minimum_due"]


# ---- statement installments and early payoff -----------------------------------------------------


def test_a_statement_converted_into_installments_is_no_longer_due_nor_charged_interest(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 1_000_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    (statement,) = statements(stack, opened)
    assert statement["minimum_due"] == 100_000
    advance(stack, first + timedelta(days=5))
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 12)
    assert booked.status_code == 201, booked.text
    period = booked.json()["schedule"][0]
    (statement,) = statements(stack, opened)
    assert (statement["converted"], statement["minimum_due"], statement["minimum_due_at_cut"]) == (
        1_000_000,
        0,
        100_000,
    )
    assert balance(stack, opened)["minimum_due"] == 0
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert (new["interest"], new["late_fee"]) == (0, 0)
    assert new["installment_due"] == period["principal"]
    assert new["minimum_due"] == period["principal"] + period["fee"]
    answer = repay(stack.client, opened["account_id"], new["minimum_due"])
    assert answer["allocation"]["credit_balance"] == 0
    assert answer["allocation"]["installment_due"] == period["principal"]


def test_a_billed_purchase_cannot_be_converted_once_its_statement_is_past_due(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 1_000_000)
    (first,) = cycle_dates(stack, opened, 1)
    run_cycle(stack, first)
    advance(stack, first + timedelta(days=GRACE_DAYS + 1))
    before = ledgers(stack, opened)
    response = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 12)
    assert response.status_code == 422, response.text
    assert response.json()["error"]["code"] == "statement_past_due"
    assert ledgers(stack, opened) == before


def test_an_early_payoff_is_due_in_full_on_the_next_statement_and_never_revolves(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 6)
    assert booked.status_code == 201, booked.text
    paid_off = stack.client.post(
        f"/v1/installments/{booked.json()['plan_id']}/payoff", json={"idempotency_key": key()}
    )
    assert paid_off.status_code == 200, paid_off.text
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    (statement,) = statements(stack, opened)
    assert statement["installment_due"] == 600_000
    assert statement["minimum_due"] == 600_000  # all of it, not 10 %
    repay(stack.client, opened["account_id"], statement["minimum_due"])
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert (new["interest"], new["late_fee"], new["statement_balance"]) == (0, 0, 0)


# ---- what the cycle posts is in the transactions and on the statement ------------------------------


def test_interest_fees_installment_billing_and_payoff_are_transactions_and_statement_lines(
    stack: CoreStack,
) -> None:
    opened = open_account(stack.client)
    first_purchase = purchase(stack.client, opened, 600_000)
    plan = book_installment(stack.client, opened["account_id"], first_purchase["transaction_id"], 3).json()
    second_purchase = purchase(stack.client, opened, 300_000)
    first, second = cycle_dates(stack, opened, 2)
    run_cycle(stack, first)
    payoff = stack.client.post(f"/v1/installments/{plan['plan_id']}/payoff", json={"idempotency_key": key()})
    assert payoff.status_code == 200, payoff.text
    run_cycle(stack, second)
    old, new = statements(stack, opened)
    kinds_old = sorted(line["kind"] for line in statement_lines(stack, opened, old["statement_id"]))
    assert kinds_old == ["installment_bill", "installment_booking", "purchase", "purchase"]
    on_new = statement_lines(stack, opened, new["statement_id"])
    assert sorted(line["kind"] for line in on_new) == ["installment_payoff", "interest", "late_fee"]
    by_kind = {line["kind"]: line for line in on_new}
    assert by_kind["interest"]["amount"] == new["interest"]
    assert by_kind["late_fee"]["amount"] == new["late_fee"]
    assert by_kind["installment_payoff"]["amount"] == 400_000
    assert by_kind["installment_payoff"]["plan_id"] == plan["plan_id"]
    assert all(line["value_date"] <= new["statement_date"] for line in on_new)
    listed = {t["transaction_id"]: t for t in transactions(stack, opened)}
    assert second_purchase["transaction_id"] in listed
    assert {t["kind"] for t in listed.values()} >= {
        "installment_bill",
        "interest",
        "late_fee",
        "installment_payoff",
    }
    assert all(t["statement_id"] in (old["statement_id"], new["statement_id"]) for t in listed.values())
