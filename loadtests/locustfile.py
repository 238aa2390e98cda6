"""Card traffic for the watertight core: cardholders paying, and customers looking things up.

Two kinds of users over a population of customers opened through the API and spread over every
cell (``--customers``, or a ``--population`` file from an earlier run):

- ``Cardholder`` does the financial transactions, at ``--rate-financial`` per second in total:
  authorizations, most of them cleared later (~90 %), some incremented first (a hotel stay, a
  fuel pump), a few reversed (~5 %), the rest left to expire; cleared purchases of 500 CNY or
  more turned into installment plans, a few smaller ones returned (refunds); what was spent
  repaid so the lines never run out. Every authorization or increment whose answer was lost (no
  answer, a 5xx, a 91: the core may have committed it) is reversed by its idempotency key, as an
  acquirer does: at once (in the next slot), and while the core cannot answer, again with the
  same reversal key after a growing wait; reversals take at most every other slot.
- ``Enquirer`` does the non-financial ones, at ``--rate-nonfinancial`` per second: balance,
  limits, card, tags, the newest transactions, installment quotes and routing lookups.

Each task is one request, and each request waits for a slot of its class's fixed-rate schedule,
so the rate offered does not depend on the core's latency. Requests are named by route and
cell (``/v1/clearing [cell 2]``). Declines are business answers, not failures; response code 91
(issuer unavailable) is a failure. The plumbing lives in ``watertight_load/``; see README.md.

    locust -f loadtests/locustfile.py --host http://127.0.0.1:18080
"""

from __future__ import annotations

import random
import time

from locust import events, task
from watertight_load import session
from watertight_load.outstanding import INSTALLMENT_MIN_FEN, Hold, LostAnswer, Purchase, purchase_amount_fen
from watertight_load.population import Customer
from watertight_load.traffic import FINANCIAL, NONFINANCIAL
from watertight_load.users import CardCoreUser, Reply, idempotency_key

session.attach(events)

MERCHANTS = [
    ("5411", "M-GROCERY-0001"),
    ("5812", "M-RESTAURANT-0002"),
    ("5541", "M-FUEL-0003"),
    ("5732", "M-ELECTRONICS-0004"),
    ("4111", "M-TRANSIT-0005"),
    ("5311", "M-STORE-0006"),
]
INSTALLMENT_TERMS = [3, 6, 12]


class Cardholder(CardCoreUser):
    """A cardholder paying with the card, and paying the bill; the acquirer on the other side."""

    traffic = FINANCIAL

    @task(20)
    def authorize(self) -> None:
        if self.reverse_a_lost_answer():
            return
        customer = self.customer()
        amount_fen = purchase_amount_fen()
        mcc, merchant_id = random.choice(MERCHANTS)
        channel = random.choice(["pos", "pos", "online"])
        body = {
            "pan": customer.pan,
            "expiry": customer.expiry,
            "amount": amount_fen,
            "currency": "CNY",
            "mcc": mcc,
            "merchant_id": merchant_id,
            "channel": channel,
            "kind": "purchase",
        }
        if channel == "online":
            body["cvv2"] = customer.cvv2  # card not present: the code printed on the card
        reply = self.transact("/v1/authorizations", "/v1/authorizations", customer, amount_fen, body)
        self.remember_if_lost(reply, customer, amount_fen)
        if reply.answer is not None and reply.answer.get("approved"):
            self.outstanding.held(Hold(reply.answer["auth_id"], customer, amount_fen))

    @task(18)
    def clear(self) -> None:
        if self.reverse_a_lost_answer():
            return
        hold = self.outstanding.next_hold()
        if hold is None:
            self.authorize()  # nothing held yet: buy something instead
            return
        reply = self.transact(
            "/v1/clearing",
            "/v1/clearing",
            hold.customer,
            hold.amount_fen,
            {"auth_id": hold.auth_id, "amount": hold.amount_fen},
        )
        if reply.answer is not None:
            self.outstanding.cleared(Purchase(reply.answer["transaction_id"], hold.customer, hold.amount_fen))

    @task(1)
    def increment(self) -> None:
        """The amount grows while the hold is open (a hotel stay extended, a tank filled)."""
        if self.reverse_a_lost_answer():
            return
        hold = self.outstanding.next_hold()
        if hold is None:
            self.authorize()
            return
        more_fen = max(100, hold.amount_fen // 5 // 10 * 10)
        reply = self.transact(
            "/v1/authorizations/{auth_id}/increment",
            f"/v1/authorizations/{hold.auth_id}/increment",
            hold.customer,
            more_fen,
            {"amount": more_fen},
        )
        self.remember_if_lost(reply, hold.customer, more_fen)
        grown = reply.answer is not None and reply.answer.get("approved")
        self.outstanding.held(Hold(hold.auth_id, hold.customer, hold.amount_fen + (more_fen if grown else 0)))

    @task(1)
    def reverse(self) -> None:
        if self.reverse_a_lost_answer():
            return
        hold = self.outstanding.next_hold()
        if hold is None:
            self.authorize()  # nothing held yet: buy something instead
            return
        self.transact(
            "/v1/authorizations/{auth_id}/reversal",
            f"/v1/authorizations/{hold.auth_id}/reversal",
            hold.customer,
            hold.amount_fen,
            {},
        )

    @task(2)
    def repay(self) -> None:
        if self.reverse_a_lost_answer():
            return
        owed = self.outstanding.next_repayment()
        if owed is None:
            self.authorize()  # nothing to repay yet
            return
        customer, amount_fen = owed
        reply = self.transact(
            "/v1/repayments",
            "/v1/repayments",
            customer,
            amount_fen,
            {"account_id": customer.account_id, "amount": amount_fen},
        )
        if reply.answer is None:
            self.outstanding.owe(customer, amount_fen)  # repay it later, with a new key

    @task(1)
    def book_installment(self) -> None:
        if self.reverse_a_lost_answer():
            return
        purchase = self.outstanding.next_bookable()
        if purchase is None:
            self.authorize()  # no large purchase waiting
            return
        reply = self.transact(
            "/v1/installments",
            "/v1/installments",
            purchase.customer,
            purchase.amount_fen,
            {
                "account_id": purchase.customer.account_id,
                "transaction_id": purchase.transaction_id,
                "terms": random.choice(INSTALLMENT_TERMS),
            },
        )
        if reply.answer is None:
            self.outstanding.owe(purchase.customer, purchase.amount_fen)  # stays a purchase: repay it

    @task(1)
    def refund(self) -> None:
        """A customer brings something back: the merchant refunds all of it, or half."""
        if self.reverse_a_lost_answer():
            return
        purchase = self.outstanding.next_returnable()
        if purchase is None:
            self.authorize()
            return
        amount_fen = purchase.amount_fen if random.random() < 0.5 else max(10, purchase.amount_fen // 2)
        customer = purchase.customer
        reply = self.transact(
            "/v1/refunds",
            "/v1/refunds",
            customer,
            amount_fen,
            {
                "pan": customer.pan,
                "expiry": customer.expiry,
                "amount": amount_fen,
                "merchant_id": random.choice(MERCHANTS)[1],
                "original_transaction_id": purchase.transaction_id,
            },
        )
        if reply.answer is not None:
            self.outstanding.returned(customer, amount_fen)

    # -- the acquirer's side of a lost answer -------------------------------------------------

    def remember_if_lost(self, reply: Reply, customer: Customer, amount_fen: int) -> None:
        """No usable answer, and the core may have committed it: it will be reversed by its key."""
        if reply.indeterminate:
            self.outstanding.lost_answer(LostAnswer(reply.key, idempotency_key(), customer, amount_fen))

    def reverse_a_lost_answer(self) -> bool:
        """Spend this slot reversing the oldest lost answer, if there is one; False when none."""
        lost = self.outstanding.next_lost_answer()
        if lost is None:
            return False
        reply = self.transact(
            "/v1/authorizations/reversal",
            "/v1/authorizations/reversal",
            lost.customer,
            lost.amount_fen,
            {"original_idempotency_key": lost.original_key, "pan": lost.customer.pan},
            key=lost.reversal_key,
        )
        if reply.answer is None and reply.indeterminate:
            self.outstanding.lost_answer(lost.again(time.monotonic()))  # later, the same reversal key
        return True


class Enquirer(CardCoreUser):
    """A customer (or the bank's app on their behalf) looking at cards and accounts."""

    traffic = NONFINANCIAL

    @task(4)
    def balance(self) -> None:
        customer = self.customer()
        route = "/v1/accounts/{account_id}/balance"
        self.call("GET", route, f"/v1/accounts/{customer.account_id}/balance", customer.cell)

    @task(3)
    def limits(self) -> None:
        customer = self.customer()
        route = "/v1/customers/{customer_id}/limits"
        self.call("GET", route, f"/v1/customers/{customer.customer_id}/limits", customer.cell)

    @task(2)
    def transactions(self) -> None:
        self.read_transactions(self.customer())

    @task(2)
    def card(self) -> None:
        customer = self.customer()
        self.call("GET", "/v1/cards/{card_id}", f"/v1/cards/{customer.card_id}", customer.cell)

    @task(1)
    def tags(self) -> None:
        customer = self.customer()
        route = "/v1/customers/{customer_id}/tags"
        self.call("GET", route, f"/v1/customers/{customer.customer_id}/tags", customer.cell)

    @task(1)
    def installment_quote(self) -> None:
        customer = self.customer()
        amount_fen = random.randrange(INSTALLMENT_MIN_FEN, 500_001, 100)  # quotes start at 500 CNY
        body = {"account_id": customer.account_id, "amount": amount_fen, "terms": INSTALLMENT_TERMS}
        self.call("POST", "/v1/installments/quote", "/v1/installments/quote", customer.cell, body)

    @task(1)
    def routing(self) -> None:
        customer = self.customer()
        route = "/v1/routing/cards/{card_id}"
        self.call("GET", route, f"/v1/routing/cards/{customer.card_id}", customer.cell)
