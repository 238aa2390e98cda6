"""The statement cycle: installment billing, interest after the grace period, statements, minimum due.

The cycle of a business date runs for every account of that cycle day, so these tests run on a
private stack of their own: the business dates they pick touch no other test's accounts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import date, timedelta
from typing import Any

import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    book_installment,
    database_fingerprint,
    key,
    open_account,
    purchase,
    repay,
)
from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer

APR = 0.1825
GRACE_DAYS = 20
FLOOR = 10_000


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


def cycle_dates(stack: CoreStack, opened: dict[str, Any], year: int, count: int) -> list[date]:
    """The account's cycle dates of ``count`` consecutive months from January of ``year``."""
    day = cycle_day(stack, opened)
    return [date(year + (month - 1) // 12, (month - 1) % 12 + 1, day) for month in range(1, count + 1)]


def interest_bound(unpaid: int, start: date, end: date) -> int:
    """Daily interest at the product APR on the unpaid balance between two statements."""
    return round(unpaid * APR * (end - start).days / 365) + 1


# ---- statements ---------------------------------------------------------------------------------


def test_a_statement_shows_the_posted_balance_the_minimum_due_and_the_due_date(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    approved(stack.client, opened, 100_000)  # an open hold is not on the statement
    (statement_date,) = cycle_dates(stack, opened, 2031, 1)
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
    (statement_date,) = cycle_dates(stack, opened, 2032, 1)
    run_cycle(stack, statement_date)
    (statement,) = statements(stack, opened)
    assert (statement["statement_balance"], statement["minimum_due"]) == (owed, minimum)


def test_an_account_that_owes_nothing_has_nothing_due(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    (statement_date,) = cycle_dates(stack, opened, 2033, 1)
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
    run_cycle(stack, date(2034, 3, day))
    assert len(statements(stack, due)) == 1
    assert statements(stack, other) == []
    assert balance(stack, other)["statement_balance"] == 0


def test_a_repayment_after_the_statement_lowers_the_minimum_still_due(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    (statement_date,) = cycle_dates(stack, opened, 2035, 1)
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
    first, second = cycle_dates(stack, opened, 2036, 2)
    run_cycle(stack, first)
    run_cycle(stack, second)
    old, new = statements(stack, opened)
    assert old["interest"] == 0
    interest = new["interest"]
    assert 0 < interest <= interest_bound(300_000, first, second)
    assert ledgers(stack, opened) == {"purchase": 300_000, "interest": interest}
    assert new["statement_balance"] == 300_000 + interest
    assert new["minimum_due"] == 30_000 + interest
    answer = repay(stack.client, opened["account_id"], 300_000 + interest)
    assert answer["allocation"]["interest"] == interest
    assert answer["allocation"]["purchase"] == 300_000
    assert ledgers(stack, opened) == {}


def test_no_interest_when_the_previous_statement_was_paid_in_full(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    purchase(stack.client, opened, 300_000)
    first, second = cycle_dates(stack, opened, 2037, 2)
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
    first, second = cycle_dates(stack, opened, 2038, 2)
    run_cycle(stack, first)
    repay(stack.client, opened["account_id"], 200_000)
    run_cycle(stack, second)
    _, new = statements(stack, opened)
    assert 0 < new["interest"] <= interest_bound(100_000, first, second)


# ---- installments billed by the cycle -----------------------------------------------------------


def test_each_cycle_bills_one_period_of_a_plan_until_it_is_complete(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    schedule = booked.json()["schedule"]
    purchase(stack.client, opened, 300_000)
    dates = cycle_dates(stack, opened, 2039, 4)

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
    assert books["fees"] == sum(p["fee"] for p in schedule)
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
    first, second = cycle_dates(stack, opened, 2040, 2)
    run_cycle(stack, first)
    first_fee = plan["schedule"][0]["fee"]
    response = stack.client.post(
        f"/v1/installments/{plan['plan_id']}/payoff", json={"idempotency_key": key()}
    )
    assert response.status_code == 200, response.text
    assert ledgers(stack, opened) == {"installment_billed": 600_000, "fees": first_fee}
    run_cycle(stack, second)
    books = ledgers(stack, opened)
    assert books["installment_billed"] == 600_000
    assert books["fees"] == first_fee
    assert "installment_unbilled" not in books
    _, new = statements(stack, opened)
    assert new["fees"] == 0


def test_a_repayment_after_billing_pays_the_fee_then_the_billed_installment(stack: CoreStack) -> None:
    opened = open_account(stack.client)
    cleared = purchase(stack.client, opened, 600_000)
    booked = book_installment(stack.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    fee = booked.json()["schedule"][0]["fee"]
    (statement_date,) = cycle_dates(stack, opened, 2041, 1)
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
    first, second = cycle_dates(stack, opened, 2042, 2)
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
    try:
        for opened in busy:
            run_cycle(stack, date(2043, 5, cycle_day(stack, opened)))
    finally:
        stop.set()
        worker.join(timeout=30)
    assert answers
    assert all(a["status"] == 200 and a["response_code"] == "00" for a in answers), answers[:3]
    for opened in busy:
        assert len(statements(stack, opened)) == 1
