"""The base of every card-traffic user: paced by its class's schedule, requests named by cell,
answers judged, acknowledged financial transactions written to the ack log.

Owns: ``CardCoreUser`` (abstract) with ``call`` for any request and ``transact`` for a financial
one (it adds the idempotency key, or sends the one given for a retry, writes the ack log line and
says whether a failure may hide a commit).
Never: retry a financial request with a new key (a lost answer may have been committed);
put a PAN into a name, a failure message or the ack log.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Any, ClassVar

import gevent
from locust import FastHttpUser

from watertight_load.ack_log import now_rfc3339
from watertight_load.outstanding import Outstanding
from watertight_load.population import Customer, Population
from watertight_load.session import SESSION
from watertight_load.traffic import NONFINANCIAL, failure_reason, indeterminate, request_name

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
        return self._send(method, route, path, cell, body)[0]

    def _send(
        self, method: str, route: str, path: str, cell: int, body: Any = None
    ) -> tuple[dict[str, Any] | None, bool]:
        """The answer (None when it failed) and whether the failure may hide a commit."""
        with self.client.request(
            method, path, name=request_name(route, cell), json=body, catch_response=True
        ) as response:
            try:
                answer = response.json() if response.content else None
            except ValueError:
                answer = None
            reason = failure_reason(route, response.status_code, answer)
            if reason is not None:
                response.failure(reason)
                return None, indeterminate(route, response.status_code, answer)
            response.success()
            return (answer if isinstance(answer, dict) else {}), False

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
        answer, unsure = self._send("POST", route, path, customer.cell, {"idempotency_key": key, **body})
        if answer is not None and SESSION.ack_log is not None:
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
        return Reply(answer, key, unsure)


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
