"""Customer tags (manual and rule-based) and three-layer pricing with its trace.

Rules that reprice every account (product and transaction layers) or tag every customer (new rule
tags) change the world for every other test, so those tests run on a private stack of their own.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

import httpx
import pytest

from tests.cards import (
    approved,
    clear,
    customers_in_each_cell,
    database_fingerprint,
    key,
    open_account,
    purchase,
)
from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer

STD_FEE_RATES = {3: 0.0075, 6: 0.007, 12: 0.006, 24: 0.0065}
GOLD_FEE_RATES = {3: 0.007, 6: 0.0065, 12: 0.0055, 24: 0.006}
CAMPAIGN_NAME = "first installment at half fee"
PRINCIPAL = 120_000  # divides evenly by 3, 6, 12 and 24


@pytest.fixture(scope="module")
def isolated_core(postgres: PostgresServer) -> Iterator[CoreStack]:
    """Two cells behind their own app server and gateway, for rules that touch every account."""
    stack = new_stack(postgres)
    try:
        app = stack.start_app([1, 2])
        stack.start_gateway({1: [app.url], 2: [app.url]})
        yield stack
    finally:
        stack.close()


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def total_fee(principal: int, rate: float, terms: int) -> int:
    exact = Decimal(principal) * Decimal(str(rate)) * terms
    return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def real_apr(principal: int, payments: list[int]) -> float:
    """12 x the monthly internal rate of return of the schedule."""

    def present_value(rate: float) -> float:
        return sum(p / (1 + rate) ** k for k, p in enumerate(payments, start=1))

    low, high = 0.0, 1.0
    for _ in range(100):
        middle = (low + high) / 2
        low, high = (middle, high) if present_value(middle) > principal else (low, middle)
    return 12 * (low + high) / 2


def quote(client: httpx.Client, account_id: str, terms: list[int], amount: int = PRINCIPAL) -> dict[int, Any]:
    response = client.post(
        "/v1/installments/quote", json={"account_id": account_id, "amount": amount, "terms": terms}
    )
    assert response.status_code == 200, response.text
    return {option["terms"]: option for option in response.json()["options"]}


def assert_priced_at(option: dict[str, Any], rate: float, principal: int = PRINCIPAL) -> None:
    terms = option["terms"]
    fee = total_fee(principal, rate, terms)
    assert option["total_fee"] == fee, (option["total_fee"], fee, option["pricing_trace"])
    assert option["fee_per_period"] == fee // terms
    assert option["first_payment"] == principal // terms + fee // terms


def applied_step(option: dict[str, Any]) -> dict[str, Any]:
    """The step that gives the price: the trace's last step, which must be applied. A step below
    it is applied only when the price is a multiple of it (a multiplier stands on it); every
    step left out says why."""
    trace = option["pricing_trace"]
    assert trace, option
    assert trace[-1]["applied"] is True, trace
    step: dict[str, Any] = trace[-1]
    assert all(below.get("reason") for below in trace[:-1] if not below["applied"]), trace
    if "multiplier" not in step:  # a value replaces everything below it
        assert not any(below["applied"] for below in trace[:-1]), trace
    return step


def layers(option: dict[str, Any]) -> list[str]:
    return [step["layer"] for step in option["pricing_trace"]]


def add_rule(client: httpx.Client, rule: dict[str, Any], status: int = 201) -> str:
    response = client.post("/v1/pricing/rules", json=rule)
    assert response.status_code == status, response.text
    rule_id: str = response.json()["rule_id"]
    return rule_id


def tag_names(client: httpx.Client, customer_id: str) -> dict[str, str | None]:
    """The customer's tags (name -> source, when the view tells it)."""
    response = client.get(f"/v1/customers/{customer_id}/tags")
    assert response.status_code == 200, response.text
    tags = response.json()["tags"]
    names = {t["tag"]: t.get("source") if isinstance(t, dict) else None for t in tags}
    listed = client.get(f"/v1/customers/{customer_id}").json()["tags"]
    assert sorted(t["tag"] if isinstance(t, dict) else t for t in listed) == sorted(names)
    return names


def customers_tagged(client: httpx.Client, tag: str) -> list[str]:
    response = client.get(f"/v1/tags/{tag}/customers")
    assert response.status_code == 200, response.text
    customers: list[str] = response.json()["customers"]
    return customers


def put_tag(client: httpx.Client, customer_id: str, tag: str) -> httpx.Response:
    return client.put(f"/v1/customers/{customer_id}/tags/{tag}")


def delete_tag(client: httpx.Client, customer_id: str, tag: str) -> httpx.Response:
    return client.delete(f"/v1/customers/{customer_id}/tags/{tag}")


# ---- manual tags --------------------------------------------------------------------------------


def test_a_manual_tag_is_set_listed_found_and_removed(core: CoreStack) -> None:
    opened = open_account(core.client)
    customer_id = opened["customer_id"]
    assert tag_names(core.client, customer_id) == {}
    for _ in range(2):  # setting it again changes nothing
        response = put_tag(core.client, customer_id, "vip")
        assert response.status_code == 200, response.text
    assert tag_names(core.client, customer_id) == {"vip": "manual"}
    assert customer_id in customers_tagged(core.client, "vip")

    removed = delete_tag(core.client, customer_id, "vip")
    assert removed.status_code == 200, removed.text
    assert tag_names(core.client, customer_id) == {}
    assert customer_id not in customers_tagged(core.client, "vip")


def test_customers_with_a_tag_are_found_in_every_cell(core: CoreStack) -> None:
    tag = unique("club")
    response = core.client.post("/v1/tags", json={"tag": tag, "description": "members of the club"})
    assert response.status_code == 201, response.text
    by_cell = customers_in_each_cell(core.client)
    for opened in by_cell.values():
        assert put_tag(core.client, opened["customer_id"], tag).status_code == 200
    assert sorted(customers_tagged(core.client, tag)) == sorted(o["customer_id"] for o in by_cell.values())


@pytest.mark.parametrize("tag", ["first_installment_candidate", "high_spender"])
def test_a_rule_tag_cannot_be_set_or_removed_by_hand(core: CoreStack, tag: str) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    for response in (
        put_tag(core.client, opened["customer_id"], tag),
        delete_tag(core.client, opened["customer_id"], tag),
    ):
        assert response.status_code == 409, response.text
        assert response.json()["error"]["field"] == "tag"
    assert database_fingerprint(core) == before
    assert tag_names(core.client, opened["customer_id"]) == {}


def test_an_undefined_tag_cannot_be_set(core: CoreStack) -> None:
    opened = open_account(core.client)
    before = database_fingerprint(core)
    response = put_tag(core.client, opened["customer_id"], unique("never_defined"))
    assert response.status_code == 404, response.text
    assert response.json()["error"]["field"] == "tag"
    assert database_fingerprint(core) == before


def test_a_tag_is_defined_once_and_a_different_definition_is_a_conflict(core: CoreStack) -> None:
    tag = unique("wine_club")
    body = {"tag": tag, "description": "likes wine"}
    first = core.client.post("/v1/tags", json=body)
    assert first.status_code == 201, first.text
    assert first.json()["tag"] == tag
    again = core.client.post("/v1/tags", json=body)
    assert again.status_code == 200, again.text

    before = database_fingerprint(core)
    different = core.client.post("/v1/tags", json={"tag": tag, "description": "likes beer"})
    assert different.status_code == 409, different.text
    assert different.json()["error"]["field"] == "tag"
    with_rule = core.client.post(
        "/v1/tags",
        json={**body, "rule": {"all": [{"metric": "age", "op": ">=", "value": 18}]}},
    )
    assert with_rule.status_code == 409, with_rule.text
    assert database_fingerprint(core) == before

    opened = open_account(core.client)
    assert put_tag(core.client, opened["customer_id"], tag).status_code == 200
    assert tag_names(core.client, opened["customer_id"]) == {tag: "manual"}


def test_a_tag_one_cell_has_already_is_defined_in_every_cell_and_then_answers_200(core: CoreStack) -> None:
    """A retry after a partial failure: the cell that has the definition (the same one) is no
    conflict; the other cell gets it (201); asked again, every cell has it (200)."""
    tag = unique("half_defined")
    body = {"tag": tag, "description": "defined in cell 1 first"}
    assert core.client.post("/v1/tags", params={"cell": 1}, json=body).status_code == 201
    everywhere = core.client.post("/v1/tags", json=body)
    assert everywhere.status_code == 201, everywhere.text
    assert core.client.post("/v1/tags", json=body).status_code == 200
    assert core.client.post("/v1/tags", params={"cell": 2}, json=body).status_code == 200
    by_cell = customers_in_each_cell(core.client)
    for opened in by_cell.values():
        assert put_tag(core.client, opened["customer_id"], tag).status_code == 200


def test_a_tag_defined_differently_in_one_cell_is_a_conflict_that_writes_no_cell(core: CoreStack) -> None:
    tag = unique("split_tag")
    assert (
        core.client.post("/v1/tags", params={"cell": 1}, json={"tag": tag, "description": "one"}).status_code
        == 201
    )
    before = database_fingerprint(core)
    different = core.client.post("/v1/tags", json={"tag": tag, "description": "two"})
    assert different.status_code == 409, different.text
    assert different.json()["error"]["code"] == "tag_exists"
    assert database_fingerprint(core) == before
    # the customers of a tag only cell 1 defines: cell 2 has none (not a 503)
    listed = core.client.get(f"/v1/tags/{tag}/customers")
    assert listed.status_code == 200, listed.text
    assert listed.json()["customers"] == []


# ---- rule tags ----------------------------------------------------------------------------------


def test_first_installment_candidate_is_set_when_cleared_purchases_reach_500_cny(core: CoreStack) -> None:
    opened = open_account(core.client)
    customer_id = opened["customer_id"]
    held = approved(core.client, opened, 60_000)
    assert "first_installment_candidate" not in tag_names(core.client, customer_id), "a hold is no spend"
    clear(core.client, held["auth_id"], 49_999)
    assert "first_installment_candidate" not in tag_names(core.client, customer_id)
    purchase(core.client, opened, 1)
    assert tag_names(core.client, customer_id) == {"first_installment_candidate": "rule"}
    assert customer_id in customers_tagged(core.client, "first_installment_candidate")


def test_high_spender_is_set_when_cleared_purchases_reach_20000_cny(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 1_999_999)
    assert "high_spender" not in tag_names(core.client, opened["customer_id"])
    purchase(core.client, opened, 1)
    assert tag_names(core.client, opened["customer_id"]) == {
        "first_installment_candidate": "rule",
        "high_spender": "rule",
    }


def test_a_first_installment_plan_ends_the_candidacy(core: CoreStack) -> None:
    opened = open_account(core.client)
    cleared = purchase(core.client, opened, PRINCIPAL)
    assert "first_installment_candidate" in tag_names(core.client, opened["customer_id"])
    response = core.client.post(
        "/v1/installments",
        json={
            "idempotency_key": key(),
            "account_id": opened["account_id"],
            "transaction_id": cleared["transaction_id"],
            "terms": 3,
        },
    )
    assert response.status_code in (200, 201), response.text
    assert "first_installment_candidate" not in tag_names(core.client, opened["customer_id"])
    assert_priced_at(quote(core.client, opened["account_id"], [12])[12], STD_FEE_RATES[12])


def test_a_new_rule_tag_is_applied_at_once_to_existing_customers_and_follows_limit_changes(
    isolated_core: CoreStack,
) -> None:
    client = isolated_core.client
    rich = open_account(client, annual_income=30_000_000)  # 9,000,000
    modest = open_account(client, annual_income=10_000_000)  # 3,000,000
    tag = unique("big_limit")
    rule = {"all": [{"metric": "credit_limit_fen", "op": ">=", "value": 8_000_000}]}
    response = client.post("/v1/tags", json={"tag": tag, "description": "limit of 80,000 CNY+", "rule": rule})
    assert response.status_code == 201, response.text
    assert tag_names(client, rich["customer_id"]) == {tag: "rule"}
    assert tag_names(client, modest["customer_id"]) == {}
    tagged = customers_tagged(client, tag)
    assert rich["customer_id"] in tagged and modest["customer_id"] not in tagged

    # the same definition again is fine; setting the new rule tag by hand is not
    again = client.post("/v1/tags", json={"tag": tag, "description": "limit of 80,000 CNY+", "rule": rule})
    assert again.status_code == 200, again.text
    assert put_tag(client, modest["customer_id"], tag).status_code == 409

    limits = client.post(
        f"/v1/customers/{modest['customer_id']}/limits", json={"line": "total", "limit": 8_000_000}
    )
    assert limits.status_code == 200, limits.text
    assert tag_names(client, modest["customer_id"]) == {tag: "rule"}
    lowered = client.post(
        f"/v1/customers/{rich['customer_id']}/limits", json={"line": "total", "limit": 7_990_000}
    )
    assert lowered.status_code == 200, lowered.text
    assert tag_names(client, rich["customer_id"]) == {}
    tagged = customers_tagged(client, tag)
    assert modest["customer_id"] in tagged and rich["customer_id"] not in tagged


def test_a_rule_tag_on_age_tags_the_customers_of_that_age(isolated_core: CoreStack) -> None:
    client = isolated_core.client
    now = datetime.now(UTC).date()
    senior = open_account(client, birth_date=now.replace(year=now.year - 65, day=1).isoformat())
    young = open_account(client, birth_date=now.replace(year=now.year - 25, day=1).isoformat())
    tag = unique("silver_age")
    rule = {"all": [{"metric": "age", "op": ">=", "value": 60}, {"metric": "age", "op": "<", "value": 70}]}
    response = client.post("/v1/tags", json={"tag": tag, "description": "60 to 69", "rule": rule})
    assert response.status_code == 201, response.text
    assert tag in tag_names(client, senior["customer_id"])
    assert tag not in tag_names(client, young["customer_id"])


# ---- pricing: catalogue, account layer, the seeded campaign (shared stack) -----------------------


def test_a_quote_at_catalogue_prices_traces_the_product_default(core: CoreStack) -> None:
    opened = open_account(core.client)
    options = quote(core.client, opened["account_id"], [3, 6, 12, 24])
    assert sorted(options) == [3, 6, 12, 24]
    for terms, option in options.items():
        assert_priced_at(option, STD_FEE_RATES[terms])
        assert applied_step(option)["layer"] == "catalogue"
        payments = [option["first_payment"]] * terms
        assert option["apr"] == pytest.approx(real_apr(PRINCIPAL, payments), abs=1e-4)
        assert option["apr"] > 12 * STD_FEE_RATES[terms], "the real rate exceeds the flat fee rate"


def test_an_account_rule_reprices_only_that_account(core: CoreStack) -> None:
    chosen = open_account(core.client)
    other = open_account(core.client)
    rule = {
        "layer": "account",
        "name": unique("retention offer"),
        "account_id": chosen["account_id"],
        "price": {"item": "installment_fee_rate", "terms": 12, "value": 0.004},
    }
    rule_id = add_rule(core.client, rule, 201)
    assert add_rule(core.client, rule, 200) == rule_id

    mine = quote(core.client, chosen["account_id"], [3, 12])
    assert_priced_at(mine[12], 0.004)
    step = applied_step(mine[12])
    assert step["layer"] == "account" and step["rule_id"] == rule_id
    assert layers(mine[12]) == ["catalogue", "account"]
    assert_priced_at(mine[3], STD_FEE_RATES[3])  # the rule names 12 terms only
    assert applied_step(mine[3])["layer"] == "catalogue"

    theirs = quote(core.client, other["account_id"], [12])[12]
    assert_priced_at(theirs, STD_FEE_RATES[12])
    assert all(step["rule_id"] != rule_id for step in theirs["pricing_trace"])

    listed = core.client.get("/v1/pricing/rules")
    assert listed.status_code == 200, listed.text
    matching = [r for r in listed.json()["rules"] if r["rule_id"] == rule_id]
    assert len(matching) == 1
    assert matching[0]["account_id"] == chosen["account_id"]
    assert matching[0]["layer"] == "account"


def test_a_rule_outside_its_validity_window_does_not_apply(core: CoreStack) -> None:
    opened = open_account(core.client)
    now = datetime.now(UTC)
    for valid_from, valid_to in [
        (now + timedelta(days=1), now + timedelta(days=30)),  # not yet
        (now - timedelta(days=30), now - timedelta(days=1)),  # over
    ]:
        add_rule(
            core.client,
            {
                "layer": "account",
                "name": unique("seasonal"),
                "account_id": opened["account_id"],
                "price": {"item": "installment_fee_rate", "value": 0.001},
                "valid_from": valid_from.isoformat(),
                "valid_to": valid_to.isoformat(),
            },
        )
    option = quote(core.client, opened["account_id"], [6])[6]
    assert_priced_at(option, STD_FEE_RATES[6])
    assert layers(option) == ["catalogue"]


def test_the_seeded_campaign_halves_the_fee_of_a_first_installment_candidate(core: CoreStack) -> None:
    candidate = open_account(core.client)
    purchase(core.client, candidate, 50_000)
    newcomer = open_account(core.client)

    halved = quote(core.client, candidate["account_id"], [12])[12]
    assert_priced_at(halved, STD_FEE_RATES[12] * 0.5)
    step = applied_step(halved)
    assert step["layer"] == "transaction" and step["name"] == CAMPAIGN_NAME
    assert layers(halved) == ["catalogue", "transaction"]

    full = quote(core.client, newcomer["account_id"], [12])[12]
    assert_priced_at(full, STD_FEE_RATES[12])
    assert layers(full) == ["catalogue"]

    rules = core.client.get("/v1/pricing/rules", params={"layer": "transaction"}).json()["rules"]
    assert any(r["name"] == CAMPAIGN_NAME for r in rules)


def test_the_campaign_halves_the_accounts_own_price_and_is_traced_after_it(core: CoreStack) -> None:
    opened = open_account(core.client)
    purchase(core.client, opened, 50_000)
    rule_id = add_rule(
        core.client,
        {
            "layer": "account",
            "name": unique("negotiated"),
            "account_id": opened["account_id"],
            "price": {"item": "installment_fee_rate", "terms": 24, "value": 0.004},
        },
    )
    option = quote(core.client, opened["account_id"], [24])[24]
    assert_priced_at(option, 0.002)
    assert layers(option) == ["catalogue", "account", "transaction"]
    assert option["pricing_trace"][1]["rule_id"] == rule_id
    assert applied_step(option)["name"] == CAMPAIGN_NAME


def test_an_authorization_of_a_candidate_carries_the_half_fee_offer(core: CoreStack) -> None:
    opened = open_account(core.client)
    first = approved(core.client, opened, 50_000)
    assert "offer" not in first or first["offer"] is None, "not a candidate before any spend"
    clear(core.client, first["auth_id"], 50_000)
    answer = approved(core.client, opened, 60_000)
    offer = answer["offer"]
    assert offer["fee_rate"] == pytest.approx(STD_FEE_RATES[12] * 0.5)
    assert offer["pricing_trace"][-1]["layer"] == "transaction"
    assert offer["pricing_trace"][-1]["applied"] is True
    small = approved(core.client, opened, 49_999)
    assert "offer" not in small or small["offer"] is None, "below the campaign's 500 CNY"


# ---- pricing: product and transaction layers (private stack) ------------------------------------


def test_a_product_rule_reprices_every_account_of_that_product(isolated_core: CoreStack) -> None:
    client = isolated_core.client
    standard = [open_account(client) for _ in range(2)]
    gold = open_account(client, product_code="GOLD")
    rule = {
        "layer": "product",
        "name": "standard 12 terms repriced",
        "product_code": "STD",
        "price": {"item": "installment_fee_rate", "terms": 12, "value": 0.005},
    }
    rule_id = add_rule(client, rule, 201)
    assert add_rule(client, rule, 200) == rule_id
    for opened in standard:
        option = quote(client, opened["account_id"], [12])[12]
        assert_priced_at(option, 0.005)
        assert layers(option) == ["catalogue", "product"]
        assert applied_step(option)["rule_id"] == rule_id
    gold_option = quote(client, gold["account_id"], [12])[12]
    assert_priced_at(gold_option, GOLD_FEE_RATES[12])
    assert layers(gold_option) == ["catalogue"]
    listed = [r for r in client.get("/v1/pricing/rules").json()["rules"] if r["rule_id"] == rule_id]
    assert len(listed) == 1, "listed once, however many cells hold it"
    assert listed[0]["product_code"] == "STD"


def test_the_account_layer_wins_over_the_product_layer(isolated_core: CoreStack) -> None:
    client = isolated_core.client
    special, ordinary = open_account(client), open_account(client)
    product_rule = add_rule(
        client,
        {
            "layer": "product",
            "name": "standard 24 terms repriced",
            "product_code": "STD",
            "price": {"item": "installment_fee_rate", "terms": 24, "value": 0.005},
        },
    )
    account_rule = add_rule(
        client,
        {
            "layer": "account",
            "name": "negotiated 24 terms",
            "account_id": special["account_id"],
            "price": {"item": "installment_fee_rate", "terms": 24, "value": 0.003},
        },
    )
    option = quote(client, special["account_id"], [24])[24]
    assert_priced_at(option, 0.003)
    assert [s["rule_id"] for s in option["pricing_trace"]] == [None, product_rule, account_rule]
    assert applied_step(option)["layer"] == "account"
    assert_priced_at(quote(client, ordinary["account_id"], [24])[24], 0.005)


def test_a_transaction_campaign_applies_only_when_all_its_conditions_hold(isolated_core: CoreStack) -> None:
    client = isolated_core.client
    staff_tag = unique("staff")
    assert client.post("/v1/tags", json={"tag": staff_tag, "description": "employees"}).status_code == 201
    staff, outsider = open_account(client), open_account(client)
    assert put_tag(client, staff["customer_id"], staff_tag).status_code == 200
    rule_id = add_rule(
        client,
        {
            "layer": "transaction",
            "name": "staff discount on large purchases",
            "price": {"item": "installment_fee_rate", "terms": 6, "multiplier": 0.8},
            "conditions": {"tags_all": [staff_tag], "min_amount_fen": 100_000, "kind": "purchase"},
        },
    )
    discounted = quote(client, staff["account_id"], [3, 6])
    assert_priced_at(discounted[6], STD_FEE_RATES[6] * 0.8)
    assert applied_step(discounted[6])["rule_id"] == rule_id
    assert layers(discounted[6]) == ["catalogue", "transaction"]
    assert_priced_at(discounted[3], STD_FEE_RATES[3])  # the campaign names 6 terms

    small = quote(client, staff["account_id"], [6], amount=99_999)[6]
    assert_priced_at(small, STD_FEE_RATES[6], principal=99_999)
    assert layers(small) == ["catalogue"]

    assert_priced_at(quote(client, outsider["account_id"], [6])[6], STD_FEE_RATES[6])


def test_campaigns_of_one_layer_do_not_stack_and_the_trace_says_which_rules_priced(
    isolated_core: CoreStack,
) -> None:
    client = isolated_core.client
    season = unique("season")
    assert client.post("/v1/tags", json={"tag": season, "description": "in season"}).status_code == 201
    opened = open_account(client)
    assert put_tag(client, opened["customer_id"], season).status_code == 200
    account_rule = add_rule(
        client,
        {
            "layer": "account",
            "name": unique("loyalty"),
            "account_id": opened["account_id"],
            "price": {"item": "installment_fee_rate", "terms": 3, "multiplier": 0.8},
        },
    )
    campaigns = [
        add_rule(
            client,
            {
                "layer": "transaction",
                "name": unique(f"season campaign {n}"),
                "price": {"item": "installment_fee_rate", "terms": 3, "multiplier": 0.5},
                "conditions": {"tags_all": [season]},
            },
        )
        for n in (1, 2)
    ]
    option = quote(client, opened["account_id"], [3])[3]
    # 0.0075 x 0.8 for the account, halved by one campaign: 0.003, not 0.0075 x 0.8 x 0.5 x 0.5
    assert_priced_at(option, 0.003)
    trace = {step["rule_id"]: step for step in option["pricing_trace"]}
    assert trace[None]["applied"] is True  # the product's default, which the account's x0.8 is of
    assert trace[account_rule]["applied"] is True
    assert trace[account_rule]["value"] == pytest.approx(0.006)
    assert [trace[rule]["applied"] for rule in campaigns] == [True, False]
    assert trace[campaigns[0]]["value"] == pytest.approx(0.003)
    assert "stack" in trace[campaigns[1]]["reason"]
    applied = [step for step in option["pricing_trace"] if step["applied"]]
    assert applied[-1]["value"] == pytest.approx(0.003), "the last rule applied gives the price"


def test_a_value_rule_of_a_more_specific_layer_replaces_what_the_layers_below_said(
    isolated_core: CoreStack,
) -> None:
    client = isolated_core.client
    opened = open_account(client)
    account_rule = add_rule(
        client,
        {
            "layer": "account",
            "name": unique("flat price"),
            "account_id": opened["account_id"],
            "price": {"item": "installment_fee_rate", "terms": 6, "value": 0.005},
        },
    )
    option = quote(client, opened["account_id"], [6])[6]
    assert_priced_at(option, 0.005)
    trace = {step["rule_id"]: step for step in option["pricing_trace"]}
    assert trace[None]["applied"] is False
    assert "replaced" in trace[None]["reason"]
    assert trace[account_rule]["applied"] is True
