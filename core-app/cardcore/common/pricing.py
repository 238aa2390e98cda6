"""Three-layer pricing: product defaults, account overrides, transaction-scenario campaigns.

Layers are resolved from the least specific to the most specific (catalogue < product < account
< transaction), and the most specific layer with a matching rule wins:
- at most one rule of each layer applies: rules of one layer never stack. In the product and
  account layers the newest matching rule supersedes the older ones; among transaction-layer
  campaigns the customer gets the lowest price (the earliest rule on a tie);
- a ``value`` rule replaces the price the layers below gave; a ``multiplier`` rule multiplies it
  (a campaign halving the fee halves the price this account would otherwise pay);
- the trace lists the catalogue default and every matching rule in that order, each with the
  price it gives (``value``), ``applied``: whether that step is part of the price charged (the
  winning rule and the steps its multipliers apply to), and for the others the ``reason`` why
  not. The price is the value of the last step applied.
Never: price without a trace; let two rules of one layer both apply.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import msgspec

from cardcore.common.money import decimal_of

PriceItem = Literal["apr", "installment_fee_rate", "cash_fee_rate"]
Layer = Literal["product", "account", "transaction"]
LAYER_ORDER: dict[str, int] = {"product": 1, "account": 2, "transaction": 3}
_RATE_QUANTUM = Decimal("0.00000001")


class PriceSpec(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    item: PriceItem
    terms: int | None = None
    value: float | None = None
    multiplier: float | None = None


class Conditions(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    tags_all: list[str] = []
    mcc_in: list[str] = []
    min_amount_fen: int | None = None
    first_installment: bool | None = None
    kind: Literal["purchase", "cash"] | None = None


class PricingRule(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    layer: Layer
    name: str
    price: PriceSpec
    product_code: str | None = None
    account_id: str | None = None
    conditions: Conditions | None = None
    # with an offset (RFC 3339): a time without one cannot be compared with the clock
    valid_from: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    valid_to: (
        Annotated[
            datetime,
            msgspec.Meta(
                tz=True,
                description="After valid_from (a comparison no JSON Schema can make: refused with 400).",
            ),
        ]
        | None
    ) = None


def rule_id_of(rule: PricingRule) -> str:
    """Content-addressed: the same rule posted to every cell gets the same id everywhere."""
    return "PR" + hashlib.sha256(msgspec.json.encode(rule)).hexdigest()[:16].upper()


def validate_rule(rule: PricingRule) -> tuple[str, str] | None:
    """(field, message) of the first problem, or None."""
    spec = rule.price
    if (spec.value is None) == (spec.multiplier is None):
        return "price", "give exactly one of price.value and price.multiplier"
    number = spec.value if spec.value is not None else spec.multiplier
    assert number is not None
    if not 0 <= number <= 10:
        return "price.value" if spec.value is not None else "price.multiplier", "must be between 0 and 10"
    if spec.item == "installment_fee_rate" and spec.terms is not None and spec.terms not in TERMS_ALLOWED:
        return "price.terms", f"terms must be one of {sorted(TERMS_ALLOWED)}"
    if rule.layer == "product" and not rule.product_code:
        return "product_code", "a product-layer rule names its product_code"
    if rule.layer == "account" and not rule.account_id:
        return "account_id", "an account-layer rule names its account_id"
    if rule.layer != "transaction" and rule.conditions is not None:
        return "conditions", "only transaction-layer campaigns take conditions"
    if rule.valid_from and rule.valid_to and rule.valid_to <= rule.valid_from:
        return "valid_to", "valid_to must be after valid_from"
    return None


TERMS_ALLOWED = frozenset({3, 6, 9, 12, 18, 24, 36})


@dataclass(slots=True)
class PriceContext:
    product_code: str
    account_id: str
    now: datetime
    tags: frozenset[str] = frozenset()
    mcc: str | None = None
    amount_fen: int | None = None
    kind: str | None = None
    installment_plan_count: int = 0


@dataclass(slots=True)
class Price:
    value: float
    trace: list[dict[str, Any]] = field(default_factory=list)

    @property
    def campaign(self) -> dict[str, Any] | None:
        """The transaction-layer step that applied, if any."""
        for step in reversed(self.trace):
            if step["layer"] == "transaction" and step["applied"]:
                return step
        return None


def _default(item: str, terms: int | None, params: dict[str, Any]) -> float:
    if item == "installment_fee_rate":
        rates = params["installment_fee_rates"]
        return float(rates[str(terms)])
    return float(params[item])


def _matches(rule: PricingRule, item: str, terms: int | None, ctx: PriceContext) -> bool:
    if rule.price.item != item or (rule.price.terms is not None and rule.price.terms != terms):
        return False
    if rule.valid_from and ctx.now < rule.valid_from:
        return False
    if rule.valid_to and ctx.now >= rule.valid_to:
        return False
    if rule.layer == "product":
        return rule.product_code == ctx.product_code
    if rule.layer == "account":
        return rule.account_id == ctx.account_id
    cond = rule.conditions or Conditions()
    if cond.tags_all and not set(cond.tags_all) <= ctx.tags:
        return False
    if cond.mcc_in and ctx.mcc not in cond.mcc_in:
        return False
    if cond.min_amount_fen is not None and (ctx.amount_fen is None or ctx.amount_fen < cond.min_amount_fen):
        return False
    if cond.first_installment is not None and cond.first_installment != (ctx.installment_plan_count == 0):
        return False
    return not (cond.kind is not None and ctx.kind is not None and cond.kind != ctx.kind)


def _apply(base: float, spec: PriceSpec) -> float:
    if spec.value is not None:
        return spec.value
    exact = decimal_of(base) * decimal_of(spec.multiplier if spec.multiplier is not None else 1)
    return float(exact.quantize(_RATE_QUANTUM))


def price(
    item: str,
    ctx: PriceContext,
    product_params: dict[str, Any],
    rules: list[tuple[str, PricingRule]],
    terms: int | None = None,
) -> Price:
    """Resolve one price: the catalogue default, then at most one rule per layer, least specific
    first (``rules`` in creation order); see the module docstring."""
    value = _default(item, terms, product_params)
    trace: list[dict[str, Any]] = [
        {
            "layer": "catalogue",
            "rule_id": None,
            "name": f"product {ctx.product_code} default",
            "value": value,
            "applied": True,
        }
    ]
    # the step each applied step stands on: a value rule stands on nothing below it
    chain: list[int] = [0]
    for layer in ("product", "account", "transaction"):
        matching = [(rule_id, rule) for rule_id, rule in rules if rule.layer == layer]
        matching = [(rule_id, rule) for rule_id, rule in matching if _matches(rule, item, terms, ctx)]
        if not matching:
            continue
        offers = [(rule_id, rule, _apply(value, rule.price)) for rule_id, rule in matching]
        if layer == "transaction":
            winner = min(range(len(offers)), key=lambda index: offers[index][2])
        else:
            winner = len(offers) - 1  # the newest supersedes
        for index, (rule_id, rule, offered) in enumerate(offers):
            step: dict[str, Any] = {
                "layer": layer,
                "rule_id": rule_id,
                "name": rule.name,
                "value": offered,
                "applied": index == winner,
            }
            if rule.price.multiplier is not None:
                step["multiplier"] = rule.price.multiplier
            if index != winner:
                why = (
                    "another campaign gives this customer a price as low or lower"
                    if layer == "transaction"
                    else "superseded by a newer rule of the same layer"
                )
                step["reason"] = f"{why}: rules of one layer do not stack"
            trace.append(step)
            if index == winner:
                if rule.price.value is not None:
                    for below in chain:
                        trace[below]["applied"] = False
                        trace[below]["reason"] = f"replaced by the {layer} rule {rule.name!r}"
                    chain = []
                chain.append(len(trace) - 1)
                value = offered
    return Price(value, trace)
