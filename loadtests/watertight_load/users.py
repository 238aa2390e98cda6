"""The base of every card-traffic user: paced by its class's schedule, requests named by cell,
answers judged, acknowledged financial transactions written to the ack log.

Owns: ``CardCoreUser`` (abstract) with ``call`` for any request and ``transact`` for a financial
one (it adds the idempotency key, or sends the one given for a retry, writes the ack log line,
says whether a failure may hide a commit, and with a history: the write, the read-back of the
account's newest transactions, or the request as indeterminate when its outcome cannot be known
from the answer).
Never: retry a financial request with a new key (a lost answer may have been committed);
put a PAN into a name, a failure message or the ack log.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser

from watertight_load.ack_log import now_rfc3339
from watertight_load.history import READ_PAGE_SIZE
from watertight_load.outstanding import Outstanding
from watertight_load.population import Customer, Population
from watertight_load.session import SESSION
from watertight_load.traffic import (
    NONFINANCIAL,
    business_refusal,
    failure_reason,
    indeterminate,
    request_name,
)

NETWORK_TIMEOUT_S = 5.0
CONNECTION_TIMEOUT_S = 2.0
ANSWER_IDS = ("auth_id", "transaction_id", "plan_id", "original_idempotency_key")


def idempotency_key() -> str:
    return "lt-" + uuid.uuid4().hex


@dataclass(frozen=True)
class Reply:
    """A financial request's outcome: the answer (None when it failed), the key it was sent with,
    and whether a failure may hide a commit (no answer, 5xx, 91)."""

    answer: dict[str, Any] | None
    key: str
    indeterminate: bool = False


class CardCoreUser(FastHttpUser):
    abstract = True
    traffic: ClassVar[str] = NONFINANCIAL
    network_timeout = NETWORK_TIMEOUT_S
    connection_timeout = CONNECTION_TIMEOUT_S

    population: Population

    def on_start(self) -> None:
        self.population = SESSION.wait_for_population()
        gevent.sleep(self.wait_time())  # the first task waits for a slot too

    def wait_time(self) -> float:
        return SESSION.wait_for_slot(self.traffic)

    @property
    def outstanding(self) -> Outstanding:
        return SESSION.outstanding

    def customer(self) -> Customer:
        return self.population.any()

    def call(self, method: str, route: str, path: str, cell: int, body: Any = None) -> dict[str, Any] | None:
        """One request named ``<route> [cell N]``; the JSON answer, or None when it failed."""
        _, answer, failed = self._request(method, route, path, cell, body)
        return None if failed else answer

    def _request(
        self, method: str, route: str, path: str, cell: int, body: Any = None
    ) -> tuple[int, dict[str, Any], bool]:
        """(status, JSON answer, failed): status 0 when no answer came."""
        with self.client.request(
            method,
            path,
            name=request_name(route, cell),
            json=body,
            headers=SESSION.require_tokens().headers(route),
            catch_response=True,
        ) as response:
            try:
                answer = response.json() if response.content else None
            except ValueError:
                answer = None
            reason = failure_reason(route, response.status_code, answer)
            if reason is not None:
                response.failure(reason)
            else:
                response.success()
            return (
                int(response.status_code or 0),
                answer if isinstance(answer, dict) else {},
                reason is not None,
            )

    def transact(
        self,
        route: str,
        path: str,
        customer: Customer,
        amount_fen: int | None,
        body: dict[str, Any],
        key: str | None = None,
    ) -> Reply:
        """A financial request: sent with a fresh idempotency key (or ``key``, for a retry);
        acknowledged answers are appended to the ack log before the task goes on."""
        key = key or idempotency_key()
        sent = time.time()
        status, answer, failed = self._request(
            "POST", route, path, customer.cell, {"idempotency_key": key, **body}
        )
        history = SESSION.history
        if failed:
            unsure = indeterminate(route, status, answer)
            if history is not None and unsure:
                history.indeterminate(
                    key, f"POST {route}", customer.account_id, customer.cell, sent, _answer(status, answer)
                )
            return Reply(None, key, unsure)
        if business_refusal(route, status, answer):
            return Reply(answer, key)  # refused, nothing committed: not acknowledged
        if SESSION.ack_log is not None:
            entry: dict[str, Any] = {
                "idempotency_key": key,
                "endpoint": f"POST {route}",
                "cell": customer.cell,
                "customer_id": customer.customer_id,
                "account_id": customer.account_id,
                "amount": amount_fen,
            }
            entry.update({name: answer[name] for name in ANSWER_IDS if answer.get(name)})
            entry["status"] = _status(route, answer)
            if "response_code" in answer:
                entry["response_code"] = answer["response_code"]
            entry["time"] = now_rfc3339()
            SESSION.ack_log.append(entry)
        transaction_id = answer.get("transaction_id")
        if history is not None and isinstance(transaction_id, str):
            history.write(customer.account_id, customer.cell, sent, transaction_id, key)
            if history.wants_read_back():
                self.read_transactions(customer)  # read-your-writes: it must show this one
        return Reply(answer, key)

    def read_transactions(self, customer: Customer) -> dict[str, Any] | None:
        """The account's newest transactions; recorded in the history for the stale-read verdict."""
        route = "/v1/accounts/{account_id}/transactions"
        path = f"/v1/accounts/{customer.account_id}/transactions?limit={READ_PAGE_SIZE}"
        sent = time.time()
        answer = self.call("GET", route, path, customer.cell)
        if answer is not None and SESSION.history is not None:
            SESSION.history.read(customer.account_id, customer.cell, sent, answer, READ_PAGE_SIZE)
        return answer


def _answer(status: int, answer: dict[str, Any]) -> str:
    if status == 0:
        return "no answer"
    code = answer.get("response_code") or (answer.get("error") or {}).get("code") or ""
    return f"HTTP {status} {code}".rstrip()


def _status(route: str, answer: dict[str, Any]) -> str:
    if "approved" in answer:
        return "approved" if answer["approved"] else "declined"
    if route.endswith("/reversal"):
        return str(answer.get("status", "reversed"))
    if route == "/v1/installments":
        return "booked"
    if route == "/v1/refunds":
        return "refunded"
    return "posted"
