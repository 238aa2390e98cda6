"""Repayments, run inside group-commit batches: allocated fees -> interest -> installment due ->
cash -> purchase, the rest kept as a credit balance. Never: allocate more than was paid.
"""

from __future__ import annotations

from typing import Any

import msgspec

from cardcore.accounting import journal
from cardcore.common import ids
from cardcore.common.crypto import PanVault
from cardcore.common.types import AmountFen, Currency, IdempotencyKey, ShortText
from cardcore.platform.engine import BatchContext, Needs, Op, register
from cardcore.platform.http import bad_request, not_found
from cardcore.platform.state import TransactionRow


class RepaymentRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    account_id: ShortText
    amount: AmountFen
    currency: Currency = "CNY"


class Repay:
    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.account_ids.add(op.request.account_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: RepaymentRequest = op.request
        if request.currency != "CNY":
            raise bad_request(
                "currency", f"currency {request.currency} is not supported (CNY only)", "unsupported_currency"
            )
        state = ctx.account(request.account_id)
        if state is None:
            raise not_found("account_id", f"account {request.account_id} not found")
        allocation = journal.allocate_repayment(request.amount, state.balances)
        transaction_id = ctx.new_id(ids.PREFIX_TRANSACTION)
        valued = ctx.value_date(state)
        entry = journal.repayment_entry(state.account_id, transaction_id, allocation, valued)
        ctx.writes.entries.append(entry)
        state.apply(entry.legs)
        named = allocation.named()
        ctx.writes.transactions.append(
            TransactionRow(
                transaction_id, state.account_id, "repayment", request.amount, valued, entry, named
            )
        )
        return 200, {
            "transaction_id": transaction_id,
            "amount": request.amount,
            "allocation": named,
            "value_date": valued,
        }


register("repay", Repay())
