"""Repayments pay fees, then interest, billed installments, cash, purchases; the rest is a credit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.cards import (
    approved,
    assert_books_balance,
    book_installment,
    clear,
    key,
    lines,
    open_account,
    purchase,
    repay,
)
from tests.fixtures_core import CoreStack

LIMIT = 9_000_000
LINES = ("total", "purchase", "cash", "installment")
CASH = {"kind": "cash", "channel": "atm", "mcc": "6011"}
ALLOCATION_KEYS = {"fees", "interest", "installment_due", "cash", "purchase", "credit_balance"}


@pytest.fixture(autouse=True)
def books_balance_after_each_scenario(core: CoreStack) -> Iterator[None]:
    yield
    assert_books_balance(core.client)


def allocation(answer: dict[str, Any]) -> dict[str, int]:
    parts: dict[str, int] = answer["allocation"]
    assert set(parts) == ALLOCATION_KEYS, parts
    assert sum(parts.values()) == answer.get("amount", sum(parts.values()))
    return parts


def only(**parts: int) -> dict[str, int]:
    return {name: parts.get(name, 0) for name in ALLOCATION_KEYS}


def ledgers(core: CoreStack, opened: dict[str, Any]) -> dict[str, int]:
    rows = core.psql(
        opened["cell"],
        "SELECT gl, sum(debit_fen - credit_fen)::bigint FROM postings WHERE account_id = $1 GROUP BY gl",
        opened["account_id"],
    )
    return {row[0]: int(row[1]) for row in rows if row[1] != 0}


def cash_withdrawal(core: CoreStack, opened: dict[str, Any], amount: int) -> dict[str, Any]:
    auth = approved(core.client, opened, amount, **CASH)
    return clear(core.client, auth["auth_id"], amount)


def billed_installment(core: CoreStack, opened: dict[str, Any], amount: int) -> None:
    """A purchase converted into a plan and paid off at once: its principal is billed and due now."""
    cleared = purchase(core.client, opened, amount)
    booked = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 3)
    assert booked.status_code == 201, booked.text
    paid_off = core.client.post(
        f"/v1/installments/{booked.json()['plan_id']}/payoff", json={"idempotency_key": key()}
    )
    assert paid_off.status_code == 200, paid_off.text


def test_a_repayment_of_a_purchase_goes_to_purchases_and_frees_the_credit(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 300_000)
    answer = repay(core.client, opened["account_id"], 100_000)
    assert answer["transaction_id"].startswith("TX")
    assert allocation(answer) == only(purchase=100_000)
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["used"] == 200_000
    assert view["total"]["available"] == LIMIT - 200_000


def test_repayments_pay_fees_then_installment_due_then_cash_then_purchases_then_keep_a_credit(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    cash_withdrawal(core, opened, 200_000)  # cash 200,000 and a fee of 2,000
    billed_installment(core, opened, 600_000)  # installment due 600,000
    purchase(core.client, opened, 100_000)
    assert ledgers(core, opened) == {
        "fees": 2_000,
        "installment_billed": 600_000,
        "cash": 200_000,
        "purchase": 100_000,
    }
    account = opened["account_id"]
    assert allocation(repay(core.client, account, 1_500)) == only(fees=1_500)
    assert allocation(repay(core.client, account, 100_500)) == only(fees=500, installment_due=100_000)
    assert allocation(repay(core.client, account, 550_000)) == only(installment_due=500_000, cash=50_000)
    assert allocation(repay(core.client, account, 200_000)) == only(cash=150_000, purchase=50_000)
    assert allocation(repay(core.client, account, 80_000)) == only(purchase=50_000, credit_balance=30_000)
    assert allocation(repay(core.client, account, 5_000)) == only(credit_balance=5_000)
    left = ledgers(core, opened)
    assert left == {"credit_balance": -35_000}
    balance = core.client.get(f"/v1/accounts/{account}/balance").json()
    assert balance["posted"] == -35_000
    assert balance["held"] == 0


def test_one_repayment_covering_everything_splits_over_every_bucket(core: CoreStack) -> None:
    opened = open_account(core.client)
    cash_withdrawal(core, opened, 100_000)  # fee 1,000
    billed_installment(core, opened, 90_000)
    purchase(core.client, opened, 70_000)
    answer = repay(core.client, opened["account_id"], 300_000)
    assert allocation(answer) == only(
        fees=1_000, installment_due=90_000, cash=100_000, purchase=70_000, credit_balance=39_000
    )
    view = lines(core.client, opened["customer_id"])
    for line in LINES:  # nothing owed; the credit balance shows as negative use on every line
        assert view[line]["used"] == -39_000, view
        assert view[line]["available"] == min(view[line]["limit"], LIMIT) + 39_000, view


def test_a_repayment_on_an_account_that_owes_nothing_is_kept_as_a_credit_balance(core: CoreStack) -> None:
    opened = open_account(core.client)
    answer = repay(core.client, opened["account_id"], 12_345)
    assert allocation(answer) == only(credit_balance=12_345)
    assert ledgers(core, opened) == {"credit_balance": -12_345}


def test_a_repayment_does_not_touch_open_holds(core: CoreStack) -> None:
    opened = open_account(core.client)
    approved(core.client, opened, 400_000)
    purchase(core.client, opened, 100_000)
    assert allocation(repay(core.client, opened["account_id"], 100_000)) == only(purchase=100_000)
    view = lines(core.client, opened["customer_id"])
    assert view["purchase"]["held"] == 400_000
    assert view["purchase"]["used"] == 0
    assert view["total"]["available"] == LIMIT - 400_000


def test_unbilled_installment_principal_is_not_repaid_before_it_is_billed(core: CoreStack) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, 300_000)
    booked = book_installment(core.client, opened["account_id"], cleared["transaction_id"], 6)
    assert booked.status_code == 201, booked.text
    answer = repay(core.client, opened["account_id"], 50_000)
    assert allocation(answer) == only(credit_balance=50_000)
    assert ledgers(core, opened) == {"installment_unbilled": 300_000, "credit_balance": -50_000}


def test_a_repayment_to_an_unknown_account_is_not_found_and_writes_nothing(core: CoreStack) -> None:
    from cardcore.common import ids

    unknown = ids.new_id(ids.PREFIX_ACCOUNT, 1)
    before = core.psql(1, "SELECT count(*) FROM postings")[0][0]
    response = core.client.post(
        "/v1/repayments", json={"idempotency_key": key(), "account_id": unknown, "amount": 10_000}
    )
    assert response.status_code == 404, response.text
    assert response.json()["error"]["field"] == "account_id"
    assert core.psql(1, "SELECT count(*) FROM postings")[0][0] == before


def test_repayments_appear_in_the_account_transactions(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 100_000)
    answer = repay(core.client, opened["account_id"], 60_000)
    response = core.client.get(f"/v1/accounts/{opened['account_id']}/transactions")
    assert response.status_code == 200, response.text
    listed = {t["transaction_id"]: t for t in response.json()["transactions"]}
    assert answer["transaction_id"] in listed
    assert listed[answer["transaction_id"]]["amount"] == 60_000
