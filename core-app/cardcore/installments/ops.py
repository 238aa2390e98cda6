"""Installment quotes, booking (a posted purchase becomes a plan) and early payoff.

Booking moves the principal from the purchase ledger to unbilled installment principal, which
the installment line (and the total line) carry until the cycle bills it period by period. A
purchase already on a statement (a statement installment) can be converted until that
statement's due date: the statement's due amount and minimum drop by what was converted, so the
converted purchase is neither charged interest nor paid twice. Early payoff bills the remaining
principal at once (due in full on the next statement, never revolving) and waives the fees of
the periods not yet billed.
Never: book a plan the installment line cannot carry, or convert one purchase twice.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cardcore.accounting import journal
from cardcore.common import ids
from cardcore.common.crypto import PanVault
from cardcore.common.pricing import Price, PriceContext, price
from cardcore.common.types import IdempotencyKey, ShortText, Terms
from cardcore.installments import schedule as schedules
from cardcore.limits.lines import AccountState, minimum_due
from cardcore.platform.engine import BatchContext, Catalogue, Needs, Op, register
from cardcore.platform.http import bad_request, conflict, not_found, unprocessable
from cardcore.platform.state import TransactionRow


class BookingRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    account_id: ShortText
    transaction_id: ShortText
    terms: Terms


class PayoffRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey


def check_terms(terms: int, params: dict[str, Any], field: str = "terms") -> None:
    offered = sorted(int(t) for t in params["installment_fee_rates"])
    if terms not in offered:
        raise bad_request(field, f"terms {terms} not offered; choose one of {offered}")


def fee_rate_for(
    catalogue: Catalogue, state: AccountState, terms: int, amount_fen: int, now: Any, mcc: str | None = None
) -> Price:
    context = PriceContext(
        product_code=state.product_code,
        account_id=state.account_id,
        now=now,
        tags=frozenset(state.tags),
        mcc=mcc,
        amount_fen=amount_fen,
        kind="purchase",
        installment_plan_count=state.installment_plan_count,
    )
    return price(
        "installment_fee_rate", context, catalogue.products[state.product_code], catalogue.rules, terms
    )


def option(principal_fen: int, terms: int, fee_rate: Price) -> dict[str, Any]:
    periods = schedules.schedule(principal_fen, terms, fee_rate.value)
    return {
        "terms": terms,
        "fee_rate": fee_rate.value,
        "fee_per_period": periods[0].fee_fen,
        "total_fee": sum(p.fee_fen for p in periods),
        "first_payment": periods[0].payment_fen,
        "apr": schedules.apr(principal_fen, periods),
        "pricing_trace": fee_rate.trace,
        "schedule": [
            {"period": p.period, "principal": p.principal_fen, "fee": p.fee_fen, "payment": p.payment_fen}
            for p in periods
        ],
    }


class Book:
    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.account_ids.add(op.request.account_id)
        needs.transaction_ids.add(op.request.transaction_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: BookingRequest = op.request
        state = ctx.account(request.account_id)
        if state is None:
            raise not_found("account_id", f"account {request.account_id} not found")
        params = ctx.catalogue.products[state.product_code]
        check_terms(request.terms, params)
        txn = ctx.transactions.get(request.transaction_id)
        if txn is None or txn["account_id"] != state.account_id:
            raise not_found(
                "transaction_id",
                f"transaction {request.transaction_id} not found on account {state.account_id}",
            )
        if txn["kind"] != "purchase":
            raise unprocessable(
                "not_a_purchase", "only posted purchases can be converted into installments", "transaction_id"
            )
        if txn["converted_by"] is not None or request.transaction_id in ctx.booked_transactions:
            raise conflict(
                "already_converted",
                f"transaction {request.transaction_id} is already an installment plan",
                "transaction_id",
            )
        principal = int(txn["amount_fen"])
        if principal < int(params["installment_min_fen"]):
            raise unprocessable(
                "below_minimum",
                f"purchases under {params['installment_min_fen']} fen cannot be converted",
                "transaction_id",
            )
        if principal > state.balances.get(journal.GL_PURCHASE, 0):
            raise unprocessable(
                "already_repaid",
                "the purchase balance is lower than this purchase: it was repaid",
                "transaction_id",
            )
        if state.own_available("installment") < principal:
            raise unprocessable(
                "insufficient_installment_line",
                "the installment line cannot carry this plan",
                "transaction_id",
            )
        valued = ctx.value_date(state)
        statement = state.last_statement
        billed = statement is not None and txn["value_date"] <= statement.statement_date
        if billed:
            assert statement is not None
            if valued > statement.due_date:
                raise unprocessable(
                    "statement_past_due",
                    f"the purchase is on the statement of {statement.statement_date}, due {statement.due_date}:"
                    " a billed purchase can be converted until its statement is due",
                    "transaction_id",
                )
        fee_rate = fee_rate_for(ctx.catalogue, state, request.terms, principal, ctx.now, txn["mcc"])
        quoted = option(principal, request.terms, fee_rate)
        plan_id = ctx.new_id(ids.PREFIX_PLAN)
        entry = journal.transfer(
            state.account_id,
            "installment_booking",
            request.transaction_id,
            principal,
            (state.account_id, journal.GL_INSTALLMENT_UNBILLED),
            (state.account_id, journal.GL_PURCHASE),
            value_date=valued,
        )
        ctx.writes.entries.append(entry)
        state.apply(entry.legs)
        if billed:
            assert statement is not None
            _convert_on_statement(ctx, state, statement.statement_id, principal)
        ctx.writes.transactions.append(
            TransactionRow(
                ctx.new_id(ids.PREFIX_TRANSACTION),
                state.account_id,
                "installment_booking",
                principal,
                valued,
                entry,
                {"transaction_id": request.transaction_id, "terms": request.terms, "billed": billed},
                plan_id=plan_id,
            )
        )
        state.installment_plan_count += 1
        state.changed_metrics = True
        ctx.booked_transactions.add(request.transaction_id)
        ctx.writes.plan_inserts.append(
            (
                plan_id,
                state.account_id,
                request.transaction_id,
                principal,
                request.terms,
                quoted["fee_rate"],
                quoted["apr"],
                msgspec.json.encode(quoted["schedule"]).decode(),
                "active",
                msgspec.json.encode(quoted["pricing_trace"]).decode(),
            )
        )
        return 201, {
            "plan_id": plan_id,
            "account_id": state.account_id,
            "transaction_id": request.transaction_id,
            "principal": principal,
            "terms": request.terms,
            "fee_rate": quoted["fee_rate"],
            "total_fee": quoted["total_fee"],
            "apr": quoted["apr"],
            "status": "active",
            "schedule": quoted["schedule"],
            "pricing_trace": quoted["pricing_trace"],
        }


class Payoff:
    """Early payoff: all unbilled principal becomes due now; the fees of unbilled periods are waived."""

    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        assert op.path_id is not None
        needs.plan_ids.add(op.path_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        assert op.path_id is not None
        plan = ctx.plans.get(op.path_id)
        if plan is None:
            raise not_found("plan_id", f"installment plan {op.path_id} not found")
        if plan["status"] != "active":
            raise conflict("plan_not_active", f"plan {op.path_id} is {plan['status']}", "plan_id")
        state = ctx.account(plan["account_id"])
        assert state is not None
        billed = plan["periods_billed"]
        remaining = sum(p["principal"] for p in plan["schedule"][billed:])
        waived = sum(p["fee"] for p in plan["schedule"][billed:])
        assert remaining > 0
        valued = ctx.value_date(state)
        entry = journal.transfer(
            state.account_id,
            "installment_payoff",
            None,
            remaining,
            (state.account_id, journal.GL_INSTALLMENT_BILLED),
            (state.account_id, journal.GL_INSTALLMENT_UNBILLED),
            value_date=valued,
        )
        ctx.writes.entries.append(entry)
        state.apply(entry.legs)
        ctx.writes.transactions.append(
            TransactionRow(
                ctx.new_id(ids.PREFIX_TRANSACTION),
                state.account_id,
                "installment_payoff",
                remaining,
                valued,
                entry,
                {"fees_waived": waived},
                plan_id=plan["plan_id"],
            )
        )
        plan["status"] = "paid_off"
        ctx.writes.plan_updates[plan["plan_id"]] = (plan["terms"], "paid_off")
        return 200, {
            "plan_id": plan["plan_id"],
            "status": "paid_off",
            "principal_due_now": remaining,
            "fees_waived": waived,
        }


def _convert_on_statement(
    ctx: BatchContext, state: AccountState, statement_id: str, principal_fen: int
) -> None:
    """A billed purchase became a plan: its statement's due amount and minimum drop by it."""
    statement = state.last_statement
    assert statement is not None and statement.statement_id == statement_id
    pending = ctx.writes.statement_updates.get(statement_id)
    converted = (pending[0] if pending else statement.converted_fen) + principal_fen
    minimum = minimum_due(
        statement.balance_fen - converted,
        statement.fixed_due_fen,
        statement.revolving_fen - converted,
        statement.min_due_rate,
        statement.min_due_floor_fen,
    )
    ctx.writes.statement_updates[statement_id] = (converted, minimum)


register("book_installment", Book())
register("payoff", Payoff())
