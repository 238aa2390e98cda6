"""Authorization, reversal, clearing, incremental authorization and refunds: the acquirer's
side of the financial heart, run inside group-commit batches.

Decision order: format -> duplicate key (replayed before we get here) -> card status -> (online:
card-not-present lock) -> expiry -> (online: CVV2) -> channel / MCC rules -> single-amount limit
-> credit on the line and every ancestor. Online, a wrong expiry date or CVV2 counts against the
card: ``cnp_failures_max`` in a row lock it for online use for ``cnp_lock_seconds`` (59, suspected
fraud); an online request that passes both checks starts the count again.

Reversal by the original request's key (an answer lost in a timeout or a failover): if the
original authorization (or increment) was committed, its hold is released; if not, the key is
claimed in the idempotency table with a decline, so the original, arriving late, is declined
and never holds (the table's primary key orders a claim and a late commit on two app servers).
Never: approve beyond any line; mutate state before the request is known to be valid; store or
log a CVV2 (it is derived again from the PAN and checked).
"""

from __future__ import annotations

from datetime import date, datetime, timedelta
from typing import Annotated, Any, Literal

import msgspec

from cardcore.accounting import journal
from cardcore.common import catalogue, ids
from cardcore.common.crypto import PanVault
from cardcore.common.money import fen_of
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
from cardcore.platform.engine import CLAIMED_HASH, BatchContext, Needs, Op, register
from cardcore.platform.http import ApiError, bad_request, conflict, encode, not_found, unprocessable
from cardcore.platform.state import TransactionRow

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


class ReversalByKeyRequest(msgspec.Struct, forbid_unknown_fields=True):
    """A reversal of a request whose answer was lost, named by that request's key. ``pan`` is
    optional (ISO 8583 reversals carry it): with it the reversal goes to the card's cell; without
    it every cell is asked."""

    idempotency_key: IdempotencyKey
    original_idempotency_key: Annotated[
        str,
        msgspec.Meta(
            min_length=1,
            max_length=64,
            description="The key of the request to reverse; not this request's own idempotency_key "
            "(a comparison no JSON Schema can make: refused with 400).",
        ),
    ]
    amount: AmountFen | None = None
    pan: PanText | None = None


class IncrementRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    amount: AmountFen
    currency: Currency = "CNY"


class RefundRequest(msgspec.Struct, forbid_unknown_fields=True):
    idempotency_key: IdempotencyKey
    pan: PanText
    expiry: Expiry
    amount: AmountFen
    merchant_id: ShortText
    original_transaction_id: ShortText | None = None
    currency: Currency = "CNY"


def check_authorization_format(request: AuthorizationRequest | RefundRequest) -> None:
    if not ids.pan_well_formed(request.pan):
        raise bad_request("pan", "pan must be 16 digits with a valid Luhn check digit")
    if (
        isinstance(request, AuthorizationRequest)
        and request.channel == CARD_NOT_PRESENT
        and request.cvv2 is None
    ):
        raise bad_request("cvv2", "cvv2 is required when channel is online (card not present)")
    check_currency(request.currency)


def check_reversal_by_key(request: ReversalByKeyRequest) -> None:
    if request.original_idempotency_key == request.idempotency_key:
        raise bad_request("original_idempotency_key", "a reversal cannot name its own idempotency_key")
    if request.pan is not None and not ids.pan_well_formed(request.pan):
        raise bad_request("pan", "pan must be 16 digits with a valid Luhn check digit")


def check_currency(currency: str) -> None:
    if currency != "CNY":
        raise bad_request(
            "currency", f"currency {currency} is not supported (CNY only)", "unsupported_currency"
        )


def expiry_end(expiry: str) -> date:
    """The last day a card printed MM/YY is valid."""
    month, year = int(expiry[:2]), 2000 + int(expiry[3:])
    first_of_next = date(year + (month == 12), month % 12 + 1, 1)
    return first_of_next - timedelta(days=1)


class Authorize:
    claimable = True  # reversed by its key before it arrived: declined

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
        # a reversal by this request's key later in the batch finds the hold here
        ctx.auths[auth_id] = {
            "auth_id": auth_id,
            "account_id": state.account_id if state else None,
            "card_id": card["card_id"] if card is not None else None,
            "line": line,
            "amount_fen": request.amount,
            "hold_fen": hold,
            "status": "open" if hold else "declined",
            "expired": False,
            "card_status": card["status"] if card is not None else None,
        }
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


def write_auth(
    ctx: BatchContext, auth: dict[str, Any], amount_fen: int | None = None, expires_at: datetime | None = None
) -> None:
    """Buffer the authorization's hold and status (and a new amount or expiry), keeping what an
    earlier request of the batch changed on it."""
    pending = ctx.writes.auth_updates.get(auth["auth_id"])
    ctx.writes.auth_updates[auth["auth_id"]] = (
        auth["hold_fen"],
        auth["status"],
        amount_fen if amount_fen is not None else (pending[2] if pending else None),
        expires_at if expires_at is not None else (pending[3] if pending else None),
    )


def release(ctx: BatchContext, auth: dict[str, Any], state: AccountState, amount_fen: int) -> None:
    """Release ``amount_fen`` of an open hold (all of it: the authorization is reversed)."""
    state.release(auth["line"], amount_fen)
    auth["hold_fen"] -= amount_fen
    auth["status"] = "open" if auth["hold_fen"] else "reversed"
    write_auth(ctx, auth)


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
        release(ctx, auth, state, amount)
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
            write_auth(ctx, auth)
        line = auth["line"]
        gl = journal.GL_CASH if line == "cash" else journal.GL_PURCHASE
        transaction_id = ctx.new_id(ids.PREFIX_TRANSACTION)
        valued = ctx.value_date(state)
        entry = journal.transfer(
            state.account_id,
            line,
            transaction_id,
            request.amount,
            (state.account_id, gl),
            (journal.BANK, journal.GL_SCHEME_SETTLEMENT),
            value_date=valued,
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
            fee = max(int(params["cash_fee_min_fen"]), fen_of(request.amount, rate.value))
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
            TransactionRow(
                transaction_id,
                state.account_id,
                line,
                request.amount,
                valued,
                entry,
                details,
                auth_id=auth["auth_id"],
            )
        )
        if fee:  # a line of its own on the statement, posted by the same entry
            ctx.writes.transactions.append(
                TransactionRow(
                    ctx.new_id(ids.PREFIX_TRANSACTION),
                    state.account_id,
                    "cash_advance_fee",
                    fee,
                    valued,
                    entry,
                    {"transaction_id": transaction_id, "pricing_trace": trace},
                    auth_id=auth["auth_id"],
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


# what a late authorization gets when a reversal claimed its key first
_REVERSED_BEFORE_ARRIVAL = {
    "auth_id": None,
    "approved": False,
    "response_code": DO_NOT_HONOR,
    "available": None,
    "reason": "reversed before it arrived",
}


KNOWN_ONLY = "known-only"


class ReverseByKey:
    """Reverse a request named by its idempotency key (its answer was lost). Runs in the cell of
    the card. Without the card number every cell is asked, in two rounds so that a refusal
    writes nothing anywhere: first ``KNOWN_ONLY`` (applied only where the original is known;
    elsewhere 404 ``original_unknown``, nothing written), then, when no cell knew it, the claim
    in every cell."""

    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.original_keys.add(op.request.original_idempotency_key)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: ReversalByKeyRequest = op.request
        key = request.original_idempotency_key
        check_reversal_by_key(request)
        answer: dict[str, Any] = {"original_idempotency_key": key}
        original = self._original(ctx, key)
        if op.mode == KNOWN_ONLY and (original is None or isinstance(original, str)):
            raise ApiError(
                404,
                "original_unknown",
                "no request with this idempotency_key in this cell",
                "original_idempotency_key",
            )
        if original is None:
            # never seen here: claim the key so the original, if it comes, is declined
            stored = encode(_REVERSED_BEFORE_ARRIVAL)
            ctx.writes.idempotency.append((key, CLAIMED_HASH, 200, stored))
            ctx.claimed[key] = (CLAIMED_HASH, 200, stored)
            return 200, {**answer, "original": "absent", "status": "recorded", "reversed": 0}
        if isinstance(original, str):  # claimed by an earlier reversal
            return 200, {**answer, "original": "absent", "status": "recorded", "reversed": 0}
        if "auth_id" not in original or "approved" not in original:
            raise unprocessable(
                "not_an_authorization",
                "original_idempotency_key names a request that is not an authorization",
                "original_idempotency_key",
            )
        answer["auth_id"] = original["auth_id"]
        if not original["approved"]:
            return 200, {**answer, "original": "declined", "status": "declined", "reversed": 0}
        auth = ctx.auths.get(original["auth_id"])
        assert auth is not None and auth["account_id"] is not None, "an approved answer names its hold"
        auth, state = _auth_of(ctx, auth["auth_id"])
        answer["original"] = "approved"
        if auth["status"] != "open":
            return 200, {**answer, "status": auth["status"], "reversed": 0, "remaining_hold": 0}
        # absent amount: all that is still held (an increment: what it added, as far as still held)
        wanted = original.get("incremented", auth["hold_fen"])
        amount = min(wanted, auth["hold_fen"]) if request.amount is None else request.amount
        if amount > auth["hold_fen"]:
            raise unprocessable(
                "exceeds_hold", f"amount {amount} exceeds the remaining hold {auth['hold_fen']}", "amount"
            )
        if amount:
            release(ctx, auth, state, amount)
        return 200, {
            **answer,
            "status": auth["status"],
            "reversed": amount,
            "remaining_hold": auth["hold_fen"],
            "available": state.available(auth["line"]),
        }

    @staticmethod
    def _original(ctx: BatchContext, key: str) -> dict[str, Any] | str | None:
        """The answer the original request got (decoded), "claimed" when an earlier reversal
        claimed the key, None when it was never seen."""
        if key in ctx.claimed:
            return "claimed"
        if key in ctx.answered:
            return ctx.answered[key][1]
        stored = ctx.originals.get(key)
        if stored is None:
            return None
        request_hash, _, response = stored
        if request_hash == CLAIMED_HASH:
            return "claimed"
        decoded = msgspec.json.decode(response)
        return decoded if isinstance(decoded, dict) else {}


class Increment:
    """An incremental authorization on an open hold (a hotel stay extended, a fuel pump): the
    card and the credit are checked again; approved, the hold grows and its expiry restarts."""

    claimable = True  # reversed by its key before it arrived: declined

    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        assert op.path_id is not None
        needs.auth_ids.add(op.path_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: IncrementRequest = op.request
        check_currency(request.currency)
        assert op.path_id is not None
        auth, state = _auth_of(ctx, op.path_id)
        if auth["status"] != "open":
            raise conflict(
                "hold_not_open",
                f"authorization {auth['auth_id']} is {auth['status']}; nothing to increment",
                "auth_id",
            )
        code = self._decide(ctx, auth, state, request.amount)
        if code == APPROVED:
            state.hold(auth["line"], request.amount)
            auth["hold_fen"] += request.amount
            auth["amount_fen"] += request.amount
            write_auth(
                ctx, auth, auth["amount_fen"], ctx.now + timedelta(seconds=ctx.settings.hold_ttl_seconds)
            )
        body: dict[str, Any] = {
            "auth_id": auth["auth_id"],
            "approved": code == APPROVED,
            "response_code": code,
            "available": state.available(auth["line"]),
            "amount": auth["amount_fen"],
            "hold": auth["hold_fen"],
        }
        if code == APPROVED:
            body["incremented"] = request.amount
        return 200, body

    @staticmethod
    def _decide(ctx: BatchContext, auth: dict[str, Any], state: AccountState, amount_fen: int) -> str:
        status_code = STATUS_CODES.get(auth["card_status"] or "closed")
        if status_code is not None:
            return status_code
        if state.status != "open":
            return DO_NOT_HONOR
        params = ctx.catalogue.products[state.product_code]
        single_max = params[
            "cash_single_amount_limit_fen" if auth["line"] == "cash" else "single_amount_limit_fen"
        ]
        if auth["amount_fen"] + amount_fen > single_max:
            return EXCEEDS_AMOUNT
        if not state.can_hold(auth["line"], amount_fen):
            return INSUFFICIENT
        return APPROVED


class Refund:
    """A merchandise return credited to the card's account: it pays purchases owed first, the
    rest is a credit balance. Named against its purchase, it cannot refund more than was bought."""

    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None:
        needs.pan_tokens.update(vault.tokens(op.request.pan))
        if op.request.original_transaction_id is not None:
            needs.transaction_ids.add(op.request.original_transaction_id)

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]:
        request: RefundRequest = op.request
        card = ctx.card_for_pan(request.pan)
        state = ctx.account(card["account_id"]) if card is not None else None
        if card is None or state is None:
            raise not_found("pan", "no card of this issuer has this number")
        if request.expiry != card["expiry"]:
            raise unprocessable("expiry_mismatch", "expiry is not the card's", "expiry")
        original = request.original_transaction_id
        if original is not None:
            txn = ctx.transactions.get(original)
            if txn is None or txn["account_id"] != state.account_id:
                raise not_found(
                    "original_transaction_id", f"transaction {original} not found on this card's account"
                )
            if txn["kind"] != "purchase":
                raise unprocessable(
                    "not_a_purchase", "only a purchase can be refunded", "original_transaction_id"
                )
            left = txn["amount_fen"] - txn["refunded_fen"]
            if request.amount > left:
                raise unprocessable(
                    "exceeds_purchase",
                    f"amount {request.amount} exceeds what is left to refund of the purchase ({left})",
                    "amount",
                )
            txn["refunded_fen"] += request.amount
        transaction_id = ctx.new_id(ids.PREFIX_TRANSACTION)
        valued = ctx.value_date(state)
        owed = state.balances.get(journal.GL_PURCHASE, 0)
        entry = journal.refund_entry(state.account_id, transaction_id, request.amount, owed, valued)
        ctx.writes.entries.append(entry)
        state.apply(entry.legs)
        state.total_spend_fen = max(0, state.total_spend_fen - request.amount)
        state.changed_metrics = True
        allocation = {
            "purchase": sum(leg.credit_fen for leg in entry.legs if leg.gl == journal.GL_PURCHASE),
            "credit_balance": sum(
                leg.credit_fen for leg in entry.legs if leg.gl == journal.GL_CREDIT_BALANCE
            ),
        }
        ctx.writes.transactions.append(
            TransactionRow(
                transaction_id,
                state.account_id,
                "refund",
                request.amount,
                valued,
                entry,
                {"merchant_id": request.merchant_id, "allocation": allocation},
                original_transaction_id=original,
            )
        )
        return 200, {
            "transaction_id": transaction_id,
            "amount": request.amount,
            "original_transaction_id": original,
            "allocation": allocation,
            "value_date": valued,
        }


register("authorize", Authorize())
register("reverse", Reverse())
register("reverse_by_key", ReverseByKey())
register("increment", Increment())
register("clear", Clear())
register("refund", Refund())
