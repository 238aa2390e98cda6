"""Authorization, reversal and clearing: the financial heart, run inside group-commit batches.

Decision order: format -> duplicate key (replayed before we get here) -> card status -> (online:
card-not-present lock) -> expiry -> (online: CVV2) -> channel / MCC rules -> single-amount limit
-> credit on the line and every ancestor. Online, a wrong expiry date or CVV2 counts against the
card: ``cnp_failures_max`` in a row lock it for online use for ``cnp_lock_seconds`` (59, suspected
fraud); an online request that passes both checks starts the count again.
Never: approve beyond any line; mutate state before the request is known to be valid; store or
log a CVV2 (it is derived again from the PAN and checked).
"""

from __future__ import annotations

from datetime import date, timedelta
from typing import Any, Literal

import msgspec

from cardcore.accounting import journal
from cardcore.common import catalogue, ids
from cardcore.common.crypto import PanVault
from cardcore.common.pricing import PriceContext, price
from cardcore.common.types import (
    AmountFen,
    Currency,
    Cvv2,
    Expiry,
    IdempotencyKey,
    Mcc,
    PanText,
    ShortText,
)
from cardcore.limits.lines import AccountState
from cardcore.platform.engine import BatchContext, Needs, Op, register
from cardcore.platform.http import bad_request, conflict, not_found, unprocessable

APPROVED = "00"
DO_NOT_HONOR = "05"
INVALID_CARD = "14"
LOST = "41"
STOLEN = "43"
INSUFFICIENT = "51"
EXPIRED = "54"
NOT_PERMITTED = "57"
EXCEEDS_AMOUNT = "61"
SUSPECTED_FRAUD = "59"  # ISO 8583: locked for card-not-present use after repeated wrong CVV2 / expiry
CVV2_FAILED = "N7"  # ISO 8583 (as card networks use it): decline for CVV2 failure
CARD_NOT_PRESENT = "online"

# cash is not given online, and an ATM does not sell goods
NOT_PERMITTED_CHANNELS = frozenset({("cash", "online"), ("purchase", "atm")})
STATUS_CODES = {
    "inactive": DO_NOT_HONOR,
    "locked": DO_NOT_HONOR,
    "lost": LOST,
    "stolen": STOLEN,
    "closed": INVALID_CARD,
}


class AuthorizationRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    pan: PanText
    expiry: Expiry
    amount: AmountFen
    mcc: Mcc
    merchant_id: ShortText
    channel: Literal["pos", "online", "atm"]
    cvv2: Cvv2 | None = None  # required when channel is online
    kind: Literal["purchase", "cash"] = "purchase"
    currency: Currency = "CNY"


class ReversalRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    amount: AmountFen | None = None


class ClearingRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    auth_id: ShortText
    amount: AmountFen
    currency: Currency = "CNY"


def check_authorization_format(request: AuthorizationRequest) -> None:
    if not ids.pan_well_formed(request.pan):
        raise bad_request("pan", "pan must be 16 digits with a valid Luhn check digit")
    if request.channel == CARD_NOT_PRESENT and request.cvv2 is None:
        raise bad_request("cvv2", "cvv2 is required when channel is online (card not present)")
    if request.currency != "CNY":
        raise bad_request(
            "currency", f"currency {request.currency} is not supported (CNY only)", "unsupported_currency"
        )


def expiry_end(expiry: str) -> date:
    """The last day a card printed MM/YY is valid."""
    month, year = int(expiry[:2]), 2000 + int(expiry[3:])
    first_of_next = date(year + (month == 12), month % 12 + 1, 1)
    return first_of_next - timedelta(days=1)


class Authorize:
    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.pan_tokens.update(vault.tokens(op.request.pan))

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: AuthorizationRequest = op.request
        card = ctx.card_for_pan(request.pan)
        state = ctx.account(card["account_id"]) if card is not None else None
        code = self._decide(ctx, request, card, state)
        if card is not None and request.channel == CARD_NOT_PRESENT:
            self._count_card_not_present(ctx, request, card, code)
        auth_id = ctx.new_id(ids.PREFIX_AUTHORIZATION)
        line = request.kind
        hold = 0
        offer = None
        if code == APPROVED:
            assert state is not None
            state.hold(line, request.amount)
            hold = request.amount
            offer = self._offer(ctx, request, state)
        ctx.writes.auth_inserts.append(
            (
                auth_id,
                state.account_id if state else None,
                card["card_id"] if card is not None else None,
                line,
                request.amount,
                hold,
                "open" if hold else "declined",
                code,
                request.mcc,
                request.merchant_id,
                request.channel,
                ctx.now + timedelta(seconds=ctx.settings.hold_ttl_seconds),
            )
        )
        body: dict[str, Any] = {
            "auth_id": auth_id,
            "approved": code == APPROVED,
            "response_code": code,
            "available": state.available(line) if state is not None else None,
        }
        if offer is not None:
            body["offer"] = offer
        return 200, body

    @staticmethod
    def _decide(
        ctx: BatchContext, request: AuthorizationRequest, card: Any, state: AccountState | None
    ) -> str:
        if card is None or state is None:
            return INVALID_CARD
        status_code = STATUS_CODES.get(card["status"])
        if status_code is not None:
            return status_code
        if state.status != "open":
            return DO_NOT_HONOR
        online = request.channel == CARD_NOT_PRESENT
        if online and card["cnp_locked"]:
            return SUSPECTED_FRAUD
        if request.expiry != card["expiry"] or expiry_end(card["expiry"]) < ctx.now.date():
            return EXPIRED
        if online and not _cvv2_holds(ctx.vault, request, card):
            return CVV2_FAILED
        params = ctx.catalogue.products[state.product_code]
        if request.mcc in params["blocked_mccs"]:
            return NOT_PERMITTED
        if (request.kind, request.channel) in NOT_PERMITTED_CHANNELS:
            return NOT_PERMITTED
        single_max = params[
            "cash_single_amount_limit_fen" if request.kind == "cash" else "single_amount_limit_fen"
        ]
        if request.amount > single_max:
            return EXCEEDS_AMOUNT
        if not state.can_hold(request.kind, request.amount):
            return INSUFFICIENT
        return APPROVED

    @staticmethod
    def _count_card_not_present(
        ctx: BatchContext, request: AuthorizationRequest, card: dict[str, Any], code: str
    ) -> None:
        """A wrong expiry or CVV2 online counts against the card (enough in a row lock it); an
        online request that got past both checks starts the count again."""
        guessed = code == CVV2_FAILED or (code == EXPIRED and request.expiry != card["expiry"])
        if guessed:
            card["cnp_failures"] += 1
            locked_until = None
            if card["cnp_failures"] >= ctx.settings.cnp_failures_max:
                locked_until = ctx.now + timedelta(seconds=ctx.settings.cnp_lock_seconds)
                card["cnp_locked"] = True
            ctx.writes.card_cnp[card["card_id"]] = (card["cnp_failures"], locked_until)
        elif card["cnp_failures"] and code not in _BEFORE_CARD_NOT_PRESENT_CHECKS:
            card["cnp_failures"] = 0
            card["cnp_locked"] = False
            ctx.writes.card_cnp[card["card_id"]] = (0, None)

    @staticmethod
    def _offer(
        ctx: BatchContext, request: AuthorizationRequest, state: AccountState
    ) -> dict[str, Any] | None:
        """A real-time installment offer when a transaction-scenario campaign applies."""
        if request.kind != "purchase":
            return None
        context = PriceContext(
            product_code=state.product_code,
            account_id=state.account_id,
            now=ctx.now,
            tags=frozenset(state.tags),
            mcc=request.mcc,
            amount_fen=request.amount,
            kind="purchase",
            installment_plan_count=state.installment_plan_count,
        )
        params = ctx.catalogue.products[state.product_code]
        terms = catalogue.OFFER_TERMS
        if str(terms) not in params["installment_fee_rates"]:
            return None
        fee_rate = price("installment_fee_rate", context, params, ctx.catalogue.rules, terms)
        campaign = fee_rate.campaign
        if campaign is None:
            return None
        return {
            "kind": "installment",
            "campaign": campaign["name"],
            "rule_id": campaign["rule_id"],
            "terms": terms,
            "fee_rate": fee_rate.value,
            "pricing_trace": fee_rate.trace,
        }


# answers decided before the expiry and CVV2 are looked at: they neither count nor clear failures
_BEFORE_CARD_NOT_PRESENT_CHECKS = frozenset(
    {INVALID_CARD, DO_NOT_HONOR, LOST, STOLEN, SUSPECTED_FRAUD, EXPIRED}
)


def _cvv2_holds(vault: PanVault, request: AuthorizationRequest, card: dict[str, Any]) -> bool:
    """The CVV2 offered is the card's (derived again, under the key version it was issued with; a
    card issued before CVV2 existed has none and cannot be used card-not-present)."""
    version = card["cvv_key_version"]
    if version is None or request.cvv2 is None:
        return False
    return vault.cvv2_matches(request.pan, card["expiry"], version, request.cvv2)


def _auth_of(ctx: BatchContext, auth_id: str) -> tuple[dict[str, Any], AccountState]:
    auth = ctx.auths.get(auth_id)
    if auth is None or auth["account_id"] is None:
        if auth is not None:
            raise conflict("authorization_declined", f"authorization {auth_id} was declined", "auth_id")
        raise not_found("auth_id", f"authorization {auth_id} not found")
    if auth["status"] == "declined":
        raise conflict("authorization_declined", f"authorization {auth_id} was declined", "auth_id")
    state = ctx.account(auth["account_id"])
    assert state is not None
    if auth["status"] == "open" and auth["expired"]:
        auth["status"], auth["hold_fen"] = "expired", 0  # load_accounts released it already
    return auth, state


class Reverse:
    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        assert op.path_id is not None
        needs.auth_ids.add(op.path_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: ReversalRequest = op.request
        assert op.path_id is not None
        auth, state = _auth_of(ctx, op.path_id)
        if auth["status"] != "open":
            raise conflict(
                "hold_not_open",
                f"authorization {auth['auth_id']} is {auth['status']}; nothing to reverse",
                "auth_id",
            )
        amount = auth["hold_fen"] if request.amount is None else request.amount
        if amount > auth["hold_fen"]:
            raise unprocessable(
                "exceeds_hold", f"amount {amount} exceeds the remaining hold {auth['hold_fen']}", "amount"
            )
        state.release(auth["line"], amount)
        auth["hold_fen"] -= amount
        auth["status"] = "open" if auth["hold_fen"] else "reversed"
        ctx.writes.auth_updates[auth["auth_id"]] = (auth["hold_fen"], auth["status"])
        return 200, {
            "auth_id": auth["auth_id"],
            "reversed": amount,
            "remaining_hold": auth["hold_fen"],
            "status": auth["status"],
            "available": state.available(auth["line"]),
        }


class Clear:
    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.auth_ids.add(op.request.auth_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: ClearingRequest = op.request
        if request.currency != "CNY":
            raise bad_request(
                "currency", f"currency {request.currency} is not supported (CNY only)", "unsupported_currency"
            )
        if ids.cell_of_id(request.auth_id, ids.PREFIX_AUTHORIZATION) is None:
            raise bad_request("auth_id", "auth_id is not an authorization id")
        auth, state = _auth_of(ctx, request.auth_id)
        released = auth["hold_fen"] if auth["status"] == "open" else 0
        if released:
            state.release(auth["line"], released)
            auth["hold_fen"], auth["status"] = 0, "cleared"
            ctx.writes.auth_updates[auth["auth_id"]] = (0, "cleared")
        line = auth["line"]
        gl = journal.GL_CASH if line == "cash" else journal.GL_PURCHASE
        transaction_id = ctx.new_id(ids.PREFIX_TRANSACTION)
        entry = journal.transfer(
            state.account_id,
            line,
            transaction_id,
            request.amount,
            (state.account_id, gl),
            (journal.BANK, journal.GL_SCHEME_SETTLEMENT),
        )
        fee = 0
        trace: list[dict[str, Any]] | None = None
        if line == "cash":
            params = ctx.catalogue.products[state.product_code]
            rate = price(
                "cash_fee_rate",
                PriceContext(
                    state.product_code,
                    state.account_id,
                    ctx.now,
                    frozenset(state.tags),
                    kind="cash",
                    amount_fen=request.amount,
                ),
                params,
                ctx.catalogue.rules,
            )
            fee = max(int(params["cash_fee_min_fen"]), round(request.amount * rate.value))
            trace = rate.trace
            entry.legs.append(journal.Leg(state.account_id, journal.GL_FEES, fee, 0))
            entry.legs.append(journal.Leg(journal.BANK, journal.GL_INCOME_FEES, 0, fee))
            entry.__post_init__()
        else:
            state.total_spend_fen += request.amount
            state.changed_metrics = True
        ctx.writes.entries.append(entry)
        state.apply(entry.legs)
        details = {"auth_amount": auth["amount_fen"], "hold_released": released, "fee": fee}
        ctx.writes.transactions.append(
            (
                transaction_id,
                state.account_id,
                line,
                request.amount,
                auth["auth_id"],
                None,
                entry,
                _json(details),
            )
        )
        body: dict[str, Any] = {
            "transaction_id": transaction_id,
            "amount": request.amount,
            "hold_released": released,
            "fee": fee,
        }
        if trace is not None:
            body["pricing_trace"] = trace
        return 200, body


def _json(value: Any) -> str:
    return msgspec.json.encode(value).decode()


register("authorize", Authorize())
register("reverse", Reverse())
register("clear", Clear())
