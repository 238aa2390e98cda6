"""Random card traffic on a fresh account, checked step by step against a model of the books.

Every step is one of: authorize (purchase or cash), increment an open hold, reverse (all or
part, by its id or by the original request's key), let a hold reach its expiry, clear (below, at
or above the hold), refund a purchase, repay, convert a cleared purchase into installments, pay
off a plan, raise a line temporarily (the total's raise reaches every child by its share),
change the total's permanent limit (every child follows by its share). After each step: every
journal entry balances, balances match postings and holds match lines, no line shows less than
zero, and every line's limit, temporary raise, used (posted, net of a credit balance), held and
available equal the model's; every decision is the one the model expects.

A hold reaches its expiry by moving its ``expires_at`` into the past in the database (the clock
passing for that hold alone): nothing sleeps, and no other hold expires by surprise.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from tests.cards import assert_books_balance, authorize, key, lines, open_account
from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer

LIMIT = 9_000_000
LINES = ("total", "purchase", "cash", "installment")
SHARES = {"purchase": Decimal(1), "cash": Decimal("0.5"), "installment": Decimal(1)}
SINGLE_MAX = {"purchase": 5_000_000, "cash": 500_000}
CASH_FEE_MIN = 1_000
INSTALLMENT_MIN = 50_000
REPAYMENT_ORDER = (
    ("fees", "fees"),
    ("interest", "interest"),
    ("installment_billed", "installment_due"),
    ("cash", "cash"),
    ("purchase", "purchase"),
)


@pytest.fixture(scope="module")
def stack(postgres: PostgresServer) -> Iterator[CoreStack]:
    """A private stack: no other test's pricing rules change the fees this model expects."""
    own = new_stack(postgres)
    try:
        app = own.start_app([1, 2])
        own.start_gateway({1: [app.url], 2: [app.url]})
        yield own
    finally:
        own.close()


def half_up(amount: Decimal) -> int:
    return int(amount.quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass
class Auth:
    line: str
    amount: int
    hold: int
    key: str  # the idempotency key of the authorization
    status: str = "open"  # open | reversed | cleared | expired


@dataclass
class Model:
    limits: dict[str, int] = field(
        default_factory=lambda: {"total": LIMIT, "purchase": LIMIT, "cash": LIMIT // 2, "installment": LIMIT}
    )
    temporary: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LINES, 0))  # raises asked
    ledgers: dict[str, int] = field(default_factory=dict)
    auths: dict[str, Auth] = field(default_factory=dict)
    cleared: dict[str, tuple[str, int]] = field(default_factory=dict)  # transaction -> (line, amount)
    refunded: dict[str, int] = field(default_factory=dict)  # purchase transaction -> refunded so far
    converted: set[str] = field(default_factory=set)
    plans: dict[str, int] = field(default_factory=dict)  # plan -> unbilled principal (0: paid off)

    def post(self, gl: str, amount: int) -> None:
        self.ledgers[gl] = self.ledgers.get(gl, 0) + amount

    def posted(self, line: str) -> int:
        b = self.ledgers
        if line == "total":
            return sum(b.values())
        if line == "installment":
            return b.get("installment_unbilled", 0) + b.get("installment_billed", 0)
        return b.get(line, 0)

    def used(self, line: str) -> int:
        """Posted, net of a credit balance (a prepayment can be spent on any line)."""
        credit = max(0, -self.ledgers.get("credit_balance", 0))
        return self.posted(line) if line == "total" else self.posted(line) - credit

    def raised(self, line: str) -> int:
        """A line's live temporary raise: its own, and a child's share of the total's."""
        if line == "total":
            return self.temporary["total"]
        return self.temporary[line] + half_up(SHARES[line] * self.temporary["total"])

    def held(self, line: str) -> int:
        open_holds = [a for a in self.auths.values() if a.status == "open"]
        return sum(a.hold for a in open_holds if line in ("total", a.line))

    def own_available(self, line: str) -> int:
        return self.limits[line] + self.raised(line) - self.used(line) - self.held(line)

    def available(self, line: str) -> int:
        own = self.own_available(line)
        if line != "total":
            own = min(own, self.own_available("total"))
        return max(0, own)

    def view(self) -> dict[str, dict[str, int]]:
        return {
            line: {
                "limit": self.limits[line],
                "temporary": self.raised(line),
                "used": self.used(line),
                "held": self.held(line),
                "available": self.available(line),
            }
            for line in LINES
        }


# ---- the steps ----------------------------------------------------------------------------------

# whole yuan, mostly small (a cash fee at its minimum), sometimes large (lines run out), and
# the single-amount limits with one yuan either side
amounts = st.one_of(
    st.integers(1, 1_500).map(lambda n: n * 100),
    st.integers(1, 30_000).map(lambda n: n * 100),
    st.sampled_from([500_000, 500_100, 5_000_000, 5_000_100]),
)


def pick(items: list[str], index: int) -> str | None:
    return items[index % len(items)] if items else None


def do_authorize(client: httpx.Client, opened: dict[str, Any], model: Model, kind: str, amount: int) -> None:
    channel = {"kind": "cash", "channel": "atm", "mcc": "6011"} if kind == "cash" else {}
    idempotency_key = key()
    response = authorize(client, opened, amount, idempotency_key=idempotency_key, **channel)
    assert response.status_code == 200, response.text
    answer = response.json()
    if amount > SINGLE_MAX[kind]:
        expected = "61"
    elif model.own_available(kind) >= amount and model.own_available("total") >= amount:
        expected = "00"
    else:
        expected = "51"
    assert answer["response_code"] == expected, (kind, amount, model.view(), answer)
    if expected == "00":
        model.auths[answer["auth_id"]] = Auth(kind, amount, amount, idempotency_key)
    assert answer["available"] == model.available(kind), (answer, model.view())


def do_increment(client: httpx.Client, model: Model, index: int, amount: int) -> None:
    auth_id = pick(list(model.auths), index)
    if auth_id is None:
        return
    auth = model.auths[auth_id]
    response = client.post(
        f"/v1/authorizations/{auth_id}/increment", json={"idempotency_key": key(), "amount": amount}
    )
    if auth.status != "open":
        assert response.status_code == 409, response.text
        return
    assert response.status_code == 200, response.text
    answer = response.json()
    if auth.amount + amount > SINGLE_MAX[auth.line]:
        expected = "61"
    elif model.own_available(auth.line) >= amount and model.own_available("total") >= amount:
        expected = "00"
    else:
        expected = "51"
    assert answer["response_code"] == expected, (auth, amount, model.view(), answer)
    if expected == "00":
        auth.amount += amount
        auth.hold += amount
    assert answer["available"] == model.available(auth.line), (answer, model.view())


def do_expire(stack: CoreStack, opened: dict[str, Any], model: Model, index: int) -> None:
    """The hold reaches its expiry: the clock passes for it alone."""
    auth_id = pick([a for a, auth in model.auths.items() if auth.status == "open"], index)
    if auth_id is None:
        return
    stack.psql(
        opened["cell"],
        "UPDATE authorizations SET expires_at = now() - interval '1 second' WHERE auth_id = $1",
        auth_id,
    )
    auth = model.auths[auth_id]
    auth.status, auth.hold = "expired", 0


def do_reverse_by_key(
    client: httpx.Client, opened: dict[str, Any], model: Model, index: int, with_pan: bool
) -> None:
    """The acquirer never got the answer: it reverses by the authorization's key."""
    auth_id = pick(list(model.auths), index)
    if auth_id is None:
        return
    auth = model.auths[auth_id]
    body: dict[str, Any] = {"idempotency_key": key(), "original_idempotency_key": auth.key}
    if with_pan:
        body["pan"] = opened["pan"]
    response = client.post("/v1/authorizations/reversal", json=body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert (answer["original"], answer["auth_id"]) == ("approved", auth_id), answer
    if auth.status == "open":
        assert (answer["reversed"], answer["status"]) == (auth.hold, "reversed"), answer
        auth.hold, auth.status = 0, "reversed"
    else:
        assert (answer["reversed"], answer["status"]) == (0, auth.status), answer


def do_reverse(client: httpx.Client, model: Model, index: int, fraction: float | None) -> None:
    auth_id = pick(list(model.auths), index)
    if auth_id is None:
        return
    auth = model.auths[auth_id]
    body: dict[str, Any] = {"idempotency_key": key()}
    base = auth.hold if auth.status == "open" else auth.amount
    amount = base if fraction is None else max(1, int(base * fraction))
    if fraction is not None:
        body["amount"] = amount
    response = client.post(f"/v1/authorizations/{auth_id}/reversal", json=body)
    if auth.status != "open":  # reversed, cleared or expired
        assert response.status_code == 409, response.text
    elif amount > auth.hold:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "amount"
    else:
        assert response.status_code == 200, response.text
        auth.hold -= amount
        if auth.hold == 0:
            auth.status = "reversed"


def do_clear(client: httpx.Client, model: Model, index: int, factor: float) -> None:
    auth_id = pick([a for a, auth in model.auths.items() if auth.status != "cleared"], index)
    if auth_id is None:
        return
    auth = model.auths[auth_id]
    amount = max(100, int(auth.amount * factor) // 100 * 100)
    response = client.post(
        "/v1/clearing", json={"idempotency_key": key(), "auth_id": auth_id, "amount": amount}
    )
    assert response.status_code == 200, response.text
    if auth.status == "open":  # a reversed or expired hold stays so: the clearing posts all the same
        auth.status = "cleared"
    auth.hold = 0
    model.post(auth.line, amount)
    if auth.line == "cash":
        model.post("fees", max(CASH_FEE_MIN, amount // 100))  # 1 %: exact, amounts are whole yuan
    model.cleared[response.json()["transaction_id"]] = (auth.line, amount)


def do_refund(
    client: httpx.Client, opened: dict[str, Any], model: Model, index: int, fraction: float
) -> None:
    """The merchant takes (part of) a purchase back: it pays purchases owed, the rest is credit."""
    transaction_id = pick([t for t, (line, _) in model.cleared.items() if line == "purchase"], index)
    if transaction_id is None:
        return
    _, bought = model.cleared[transaction_id]
    left = bought - model.refunded.get(transaction_id, 0)
    amount = max(100, int(bought * fraction) // 100 * 100)
    response = client.post(
        "/v1/refunds",
        json={
            "idempotency_key": key(),
            "pan": opened["pan"],
            "expiry": opened["expiry"],
            "amount": amount,
            "merchant_id": "M-0001",
            "original_transaction_id": transaction_id,
        },
    )
    if amount > left:
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "amount"
        return
    assert response.status_code == 200, response.text
    to_purchase = min(amount, max(0, model.ledgers.get("purchase", 0)))
    assert response.json()["allocation"] == {"purchase": to_purchase, "credit_balance": amount - to_purchase}
    model.post("purchase", -to_purchase)
    model.post("credit_balance", -(amount - to_purchase))
    model.refunded[transaction_id] = model.refunded.get(transaction_id, 0) + amount


def do_repay(client: httpx.Client, opened: dict[str, Any], model: Model, amount: int) -> None:
    response = client.post(
        "/v1/repayments",
        json={"idempotency_key": key(), "account_id": opened["account_id"], "amount": amount},
    )
    assert response.status_code == 200, response.text
    expected = dict.fromkeys(["fees", "interest", "installment_due", "cash", "purchase", "credit_balance"], 0)
    left = amount
    for gl, name in REPAYMENT_ORDER:
        part = min(max(0, model.ledgers.get(gl, 0)), left)
        expected[name] = part
        model.post(gl, -part)
        left -= part
    expected["credit_balance"] = left
    model.post("credit_balance", -left)
    assert response.json()["allocation"] == expected


def do_book(client: httpx.Client, opened: dict[str, Any], model: Model, index: int, terms: int) -> None:
    transaction_id = pick(list(model.cleared), index)
    if transaction_id is None:
        return
    line, amount = model.cleared[transaction_id]
    response = client.post(
        "/v1/installments",
        json={
            "idempotency_key": key(),
            "account_id": opened["account_id"],
            "transaction_id": transaction_id,
            "terms": terms,
        },
    )
    if transaction_id in model.converted:
        assert response.status_code == 409, response.text
    elif (
        line != "purchase"
        or amount < INSTALLMENT_MIN
        or amount > model.ledgers.get("purchase", 0)
        or model.own_available("installment") < amount
    ):
        assert response.status_code == 422, response.text
    else:
        assert response.status_code == 201, response.text
        plan = response.json()
        assert sum(p["principal"] for p in plan["schedule"]) == amount
        model.converted.add(transaction_id)
        model.plans[plan["plan_id"]] = amount
        model.post("purchase", -amount)
        model.post("installment_unbilled", amount)


def do_payoff(client: httpx.Client, model: Model, index: int) -> None:
    plan_id = pick(list(model.plans), index)
    if plan_id is None:
        return
    response = client.post(f"/v1/installments/{plan_id}/payoff", json={"idempotency_key": key()})
    unbilled = model.plans[plan_id]
    if unbilled == 0:
        assert response.status_code == 409, response.text
        return
    assert response.status_code == 200, response.text
    model.plans[plan_id] = 0
    model.post("installment_unbilled", -unbilled)
    model.post("installment_billed", unbilled)


def do_raise(client: httpx.Client, opened: dict[str, Any], model: Model, line: str, amount: int) -> None:
    expires_at = (datetime.now(UTC) + timedelta(days=1)).isoformat()
    response = client.post(
        f"/v1/customers/{opened['customer_id']}/limits/temporary",
        json={"line": line, "amount": amount, "expires_at": expires_at},
    )
    assert response.status_code == 201, response.text
    model.temporary[line] += amount


def do_change_total(client: httpx.Client, opened: dict[str, Any], model: Model, limit: int) -> None:
    """A new permanent total: every child follows by its share, unless one would fall below its use."""
    wanted = {"total": limit, **{line: half_up(share * limit) for line, share in SHARES.items()}}
    response = client.post(
        f"/v1/customers/{opened['customer_id']}/limits", json={"line": "total", "limit": limit}
    )
    if any(wanted[line] < model.used(line) + model.held(line) for line in LINES):
        assert response.status_code == 422, response.text
        assert response.json()["error"]["field"] == "limit"
        return
    assert response.status_code == 200, response.text
    model.limits = wanted


def check(stack: CoreStack, opened: dict[str, Any], model: Model, step: tuple[Any, ...]) -> None:
    view = lines(stack.client, opened["customer_id"])
    for line in LINES:
        assert view[line]["available"] >= 0, (step, view)
        got = {name: view[line][name] for name in ("limit", "temporary", "used", "held", "available")}
        assert got == model.view()[line], (step, line, got, model.view()[line])
    assert_books_balance(stack.client, (opened["cell"],))


class CardTraffic(RuleBasedStateMachine):
    """One fresh account per run; each rule is a step, checked against the model after it."""

    def __init__(self, stack: CoreStack) -> None:
        super().__init__()
        self.stack = stack
        self.client = stack.client
        self.opened = open_account(self.client)
        self.model = Model()
        self.last: tuple[Any, ...] = ("open",)

    @rule(kind=st.sampled_from(["purchase", "purchase", "cash"]), amount=amounts)
    def authorize(self, kind: str, amount: int) -> None:
        self.last = ("authorize", kind, amount)
        do_authorize(self.client, self.opened, self.model, kind, amount)

    @precondition(lambda self: bool(self.model.auths))
    @rule(index=st.integers(0, 99), fraction=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0, 1.5])))
    def reverse(self, index: int, fraction: float | None) -> None:
        self.last = ("reverse", index, fraction)
        do_reverse(self.client, self.model, index, fraction)

    @precondition(lambda self: bool(self.model.auths))
    @rule(index=st.integers(0, 99), with_pan=st.booleans())
    def reverse_by_the_original_key(self, index: int, with_pan: bool) -> None:
        self.last = ("reverse by key", index, with_pan)
        do_reverse_by_key(self.client, self.opened, self.model, index, with_pan)

    @precondition(lambda self: bool(self.model.auths))
    @rule(index=st.integers(0, 99), amount=amounts)
    def increment(self, index: int, amount: int) -> None:
        self.last = ("increment", index, amount)
        do_increment(self.client, self.model, index, amount)

    @precondition(lambda self: any(a.status == "open" for a in self.model.auths.values()))
    @rule(index=st.integers(0, 99))
    def let_a_hold_expire(self, index: int) -> None:
        self.last = ("expire", index)
        do_expire(self.stack, self.opened, self.model, index)

    @precondition(lambda self: any(a.status != "cleared" for a in self.model.auths.values()))
    @rule(index=st.integers(0, 99), factor=st.sampled_from([0.5, 1.0, 1.25]))
    def clear(self, index: int, factor: float) -> None:
        self.last = ("clear", index, factor)
        do_clear(self.client, self.model, index, factor)

    @precondition(lambda self: any(line == "purchase" for line, _ in self.model.cleared.values()))
    @rule(index=st.integers(0, 99), fraction=st.sampled_from([0.3, 1.0, 1.2]))
    def refund(self, index: int, fraction: float) -> None:
        self.last = ("refund", index, fraction)
        do_refund(self.client, self.opened, self.model, index, fraction)

    @rule(amount=amounts)
    def repay(self, amount: int) -> None:
        self.last = ("repay", amount)
        do_repay(self.client, self.opened, self.model, amount)

    @precondition(lambda self: bool(self.model.cleared))
    @rule(index=st.integers(0, 99), terms=st.sampled_from([3, 6, 12, 24]))
    def convert_into_installments(self, index: int, terms: int) -> None:
        self.last = ("book", index, terms)
        do_book(self.client, self.opened, self.model, index, terms)

    @precondition(lambda self: bool(self.model.plans))
    @rule(index=st.integers(0, 99))
    def pay_off(self, index: int) -> None:
        self.last = ("payoff", index)
        do_payoff(self.client, self.model, index)

    @rule(line=st.sampled_from(["total", "total", "purchase", "cash", "installment"]), amount=amounts)
    def raise_temporarily(self, line: str, amount: int) -> None:
        self.last = ("raise", line, amount)
        do_raise(self.client, self.opened, self.model, line, amount)

    @rule(limit=st.integers(2, 150).map(lambda n: n * 100_000))
    def change_the_total_limit(self, limit: int) -> None:
        self.last = ("total limit", limit)
        do_change_total(self.client, self.opened, self.model, limit)

    @invariant()
    def books_balance_and_lines_match_the_model(self) -> None:
        check(self.stack, self.opened, self.model, self.last)


def test_random_card_traffic_keeps_the_books_balanced_and_every_line_within_its_limit(
    stack: CoreStack,
) -> None:
    class OnThisStack(CardTraffic):
        def __init__(self) -> None:
            super().__init__(stack)

    run_state_machine_as_test(
        OnThisStack,
        settings=settings(
            max_examples=40,
            stateful_step_count=20,
            deadline=None,
            suppress_health_check=[HealthCheck.too_slow],
        ),
    )
