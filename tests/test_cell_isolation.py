"""Two cells behind one gateway, each with its own app server: a cell that is down fails only its
own requests, fast, while the other cell keeps serving."""

from __future__ import annotations

import signal
import time
from collections.abc import Callable

import pytest

from tests.cards import (
    approved,
    authorize,
    customers_in_each_cell,
    key,
    lines,
    purchase,
    trial_balance,
)
from tests.fixtures_core import CoreStack

FAST_FAILURE_S = 1.0


@pytest.fixture
def split_stack(core_factory: Callable[[], CoreStack]) -> CoreStack:
    stack = core_factory()
    first = stack.start_app([1])
    second = stack.start_app([2])
    stack.start_gateway({1: [first.url], 2: [second.url]})
    return stack


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError("condition not reached in time")


def test_applicants_are_spread_over_cells_and_ids_carry_their_cell(split_stack: CoreStack) -> None:
    client = split_stack.client
    by_cell = customers_in_each_cell(client)
    for cell, opened in by_cell.items():
        assert opened["customer_id"][2:4] == f"{cell:02d}"
        assert opened["pan"][6:8] == f"{cell:02d}"
        routing = client.get(f"/v1/routing/customers/{opened['customer_id']}").json()
        assert routing["cell"] == cell
        assert routing["leader_site"] == "prod"
        assert client.get(f"/v1/routing/cards/{opened['card_id']}").json()["cell"] == cell


def test_a_stopped_cell_fails_fast_and_the_other_cell_keeps_serving(split_stack: CoreStack) -> None:
    client = split_stack.client
    by_cell = customers_in_each_cell(client)
    healthy, broken = by_cell[1], by_cell[2]
    purchase(client, healthy, 10_000)
    purchase(client, broken, 10_000)

    split_stack.apps[1].stop(signal.SIGKILL)
    wait_until(lambda: client.get(f"/v1/customers/{broken['customer_id']}").status_code == 503)

    started = time.monotonic()
    answer = client.get(f"/v1/customers/{broken['customer_id']}/limits")
    assert time.monotonic() - started < FAST_FAILURE_S
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "cell_unavailable"

    started = time.monotonic()
    declined = authorize(client, broken, 5_000)
    assert time.monotonic() - started < FAST_FAILURE_S
    assert declined.status_code == 200
    assert declined.json()["approved"] is False
    assert declined.json()["response_code"] == "91"

    # the healthy cell notices nothing
    for _ in range(20):
        approved(client, healthy, 100)
    assert lines(client, healthy["customer_id"])["total"]["held"] == 2_000
    assert trial_balance(client, 1)["balanced"] is True


def test_a_restarted_cell_serves_again_with_its_data(split_stack: CoreStack) -> None:
    client = split_stack.client
    broken = customers_in_each_cell(client)[2]
    posted = purchase(client, broken, 12_345)
    old = split_stack.apps[1]
    old.stop(signal.SIGKILL)
    wait_until(lambda: client.get(f"/v1/customers/{broken['customer_id']}").status_code == 503)

    split_stack.start_app([2], port=int(old.url.rsplit(":", 1)[1]))
    wait_until(lambda: client.get(f"/v1/customers/{broken['customer_id']}").status_code == 200)
    transactions = client.get(f"/v1/accounts/{broken['account_id']}/transactions").json()["transactions"]
    assert [t["transaction_id"] for t in transactions] == [posted["transaction_id"]]
    repaid = client.post(
        "/v1/repayments", json={"idempotency_key": key(), "account_id": broken["account_id"], "amount": 345}
    )
    assert repaid.status_code == 200
    assert trial_balance(client, 2)["balanced"] is True
