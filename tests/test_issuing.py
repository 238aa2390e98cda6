"""Issuing: real-time account opening, the card life cycle, replacement and the customer view."""

from __future__ import annotations

import re
from datetime import UTC, date, datetime, timedelta
from typing import Any

import httpx
import pytest

from tests.cards import (
    authorize,
    database_fingerprint,
    lines,
    new_id_number,
    open_account,
)
from tests.fixtures_core import CoreStack

STD_INCOME_SHARE = 0.3
LIMIT_STEP_FEN = 10_000
STD_LIMIT_MIN_FEN = 200_000
STD_LIMIT_MAX_FEN = 10_000_000
INCOME_MIN_FEN = 2_400_000


def today() -> date:
    return datetime.now(UTC).date()


def born_years_ago(years: int, days_later: int = 0) -> str:
    """The birth date of someone who turns ``years`` today (``days_later`` days later if > 0)."""
    now = today()
    try:
        birthday = now.replace(year=now.year - years)
    except ValueError:  # 29 February in a year that has none
        birthday = now.replace(year=now.year - years, day=28)
    return (birthday + timedelta(days=days_later)).isoformat()


def application(
    id_number: str | None = None,
    annual_income: int = 30_000_000,
    birth_date: str = "1990-01-01",
    name: str = "张三",
    **extra: Any,
) -> dict[str, Any]:
    return {
        "applicant": {
            "name": name,
            "id_number": id_number or new_id_number(),
            "mobile": "13800138000",
            "birth_date": birth_date,
            "annual_income": annual_income,
        },
        **extra,
    }


def submit(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/v1/applications", json=body)
    assert response.status_code == 201, response.text
    answer: dict[str, Any] = response.json()
    return answer


def luhn_valid(digits: str) -> bool:
    total = 0
    for index, char in enumerate(reversed(digits)):
        value = int(char)
        if index % 2 == 1:
            value *= 2
            if value > 9:
                value -= 9
        total += value
    return total % 10 == 0


def expected_std_limit(annual_income: int) -> int:
    raw = int(annual_income * STD_INCOME_SHARE) // LIMIT_STEP_FEN * LIMIT_STEP_FEN
    return max(STD_LIMIT_MIN_FEN, min(STD_LIMIT_MAX_FEN, raw))


def card(client: httpx.Client, card_id: str) -> dict[str, Any]:
    response = client.get(f"/v1/cards/{card_id}")
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def set_status(client: httpx.Client, card_id: str, status: str) -> httpx.Response:
    return client.post(f"/v1/cards/{card_id}/status", json={"status": status})


def customer_rows(core: CoreStack) -> int:
    return sum(core.psql(cell, "SELECT count(*) FROM customers")[0][0] for cell in (1, 2))


# ---- the catalogue ------------------------------------------------------------------------------


def test_the_catalogue_offers_standard_by_default_and_gold(core: CoreStack) -> None:
    response = core.client.get("/v1/products")
    assert response.status_code == 200, response.text
    products = {p["product_code"]: p for p in response.json()["products"]}
    assert {"STD", "GOLD"} <= set(products)
    assert products["STD"]["default"] is True
    assert products["GOLD"]["default"] is False
    for product in products.values():
        assert product["name"]


# ---- account opening ----------------------------------------------------------------------------


def test_an_adult_with_enough_income_gets_an_account_a_card_and_a_pan_of_the_issuer(core: CoreStack) -> None:
    answer = submit(core.client, application(annual_income=30_000_000))
    assert answer["decision"] == "approved"
    assert answer["reasons"] and all(isinstance(r, str) for r in answer["reasons"])
    assert answer["credit_limit"] == 9_000_000
    for field in ("customer_id", "account_id", "card_id"):
        assert isinstance(answer[field], str) and answer[field]
    pan = answer["pan"]
    assert re.fullmatch(r"\d{16}", pan), pan
    assert pan.startswith("625977")
    cell = answer["customer_id"][2:4]
    assert pan[6:8] == cell
    assert luhn_valid(pan), pan
    assert re.fullmatch(r"(0[1-9]|1[0-2])/\d{2}", answer["expiry"]), answer["expiry"]
    month, year = int(answer["expiry"][:2]), 2000 + int(answer["expiry"][3:])
    assert date(year, month, 1) > today() + timedelta(days=365), "a new card is valid for years"


def test_a_new_account_has_every_line_at_the_limit_and_cash_at_half(core: CoreStack) -> None:
    answer = submit(core.client, application(annual_income=20_000_000))
    limit = answer["credit_limit"]
    assert limit == 6_000_000
    by_line = lines(core.client, answer["customer_id"])
    assert set(by_line) == {"total", "purchase", "cash", "installment"}
    assert by_line["total"]["limit"] == limit
    assert by_line["purchase"]["limit"] == limit
    assert by_line["installment"]["limit"] == limit
    assert by_line["cash"]["limit"] == limit // 2
    for line in by_line.values():
        assert line["used"] == 0 and line["held"] == 0 and line["temporary"] == 0
        assert line["available"] == line["limit"]


@pytest.mark.parametrize(
    "annual_income",
    [
        INCOME_MIN_FEN,  # exactly the floor: 720,000
        12_345_678,  # 3,703,703.4 -> rounded down to 3,700,000
        33_329_999,  # 9,998,999.7 -> 9,990,000, just under the cap
        33_340_000,  # 10,002,000 -> capped at 10,000,000
        900_000_000,  # far above: capped
    ],
)
def test_the_standard_limit_is_30_percent_of_income_rounded_down_to_100_cny_within_the_bounds(
    core: CoreStack, annual_income: int
) -> None:
    answer = submit(core.client, application(annual_income=annual_income))
    assert answer["decision"] == "approved", answer
    assert answer["credit_limit"] == expected_std_limit(annual_income)
    assert lines(core.client, answer["customer_id"])["total"]["limit"] == answer["credit_limit"]


def test_a_gold_application_opens_a_gold_account(core: CoreStack) -> None:
    answer = submit(core.client, application(annual_income=30_000_000, product_code="GOLD"))
    assert answer["decision"] == "approved"
    customer = core.client.get(f"/v1/customers/{answer['customer_id']}").json()
    assert [a["product_code"] for a in customer["accounts"]] == ["GOLD"]


def test_without_a_product_code_the_account_is_standard(core: CoreStack) -> None:
    answer = submit(core.client, application())
    customer = core.client.get(f"/v1/customers/{answer['customer_id']}").json()
    assert [a["product_code"] for a in customer["accounts"]] == ["STD"]


def decided_on_one_date(
    core: CoreStack, years: int, days_later: int, annual_income: int
) -> tuple[dict[str, Any], int]:
    """Apply as someone who turns ``years`` today (or ``days_later`` days later), with the dates
    taken when the test runs, not when it is collected, and again if the UTC date turned while the
    request was in flight (a CI run that crosses midnight). Returns the answer and the customer rows
    taken just before it."""
    for _ in range(2):
        day = today()
        before = customer_rows(core)
        birth_date = born_years_ago(years, days_later=days_later)
        answer = submit(core.client, application(birth_date=birth_date, annual_income=annual_income))
        if today() == day:
            return answer, before
    raise AssertionError("the UTC date turned during two applications in a row")


@pytest.mark.parametrize(
    ("years", "days_later", "annual_income", "reason_word"),
    [
        (18, 1, 30_000_000, "age"),  # 17, turns 18 tomorrow
        (71, 0, 30_000_000, "age"),
        (30, 0, INCOME_MIN_FEN - 1, "income"),
        (16, 0, 100_000, "age"),
    ],
    ids=["seventeen", "seventy-one", "income-below-24000-cny", "young-and-poor"],
)
def test_an_applicant_outside_the_age_or_income_rules_is_declined_with_reasons_and_no_account(
    core: CoreStack, years: int, days_later: int, annual_income: int, reason_word: str
) -> None:
    answer, before = decided_on_one_date(core, years, days_later, annual_income)
    assert answer["decision"] == "declined"
    assert any(reason_word in reason for reason in answer["reasons"]), answer["reasons"]
    for field in ("customer_id", "account_id", "card_id", "pan"):
        assert answer.get(field) is None, field
    assert customer_rows(core) == before


@pytest.mark.parametrize(
    ("years", "days_later"),
    [(18, 0), (70, 0), (71, 1)],
    ids=["eighteen-today", "seventy-today", "seventy-until-tomorrow"],
)
def test_the_age_bounds_18_and_70_are_inclusive(core: CoreStack, years: int, days_later: int) -> None:
    answer, _ = decided_on_one_date(core, years, days_later, 30_000_000)
    assert answer["decision"] == "approved", answer["reasons"]


def test_a_second_application_with_the_same_id_number_is_declined_as_an_existing_customer(
    core: CoreStack,
) -> None:
    id_number = new_id_number()
    first = submit(core.client, application(id_number=id_number))
    assert first["decision"] == "approved"
    before = customer_rows(core)
    second = submit(core.client, application(id_number=id_number, name="李四"))
    assert second["decision"] == "declined"
    assert second["reasons"]
    assert second.get("customer_id") is None and second.get("pan") is None
    assert customer_rows(core) == before


# ---- what reads show ----------------------------------------------------------------------------


def test_a_card_read_shows_the_masked_pan_only(core: CoreStack) -> None:
    opened = open_account(core.client, activate=False)
    pan = opened["pan"]
    response = core.client.get(f"/v1/cards/{opened['card_id']}")
    assert response.status_code == 200
    view = response.json()
    assert view["card_id"] == opened["card_id"]
    assert view["customer_id"] == opened["customer_id"]
    assert view["account_id"] == opened["account_id"]
    assert view["expiry"] == opened["expiry"]
    assert view["status"] == "inactive"
    assert view["pan_masked"] == pan[:6] + "******" + pan[-4:]
    assert "pan" not in view
    assert pan not in response.text


def test_the_customer_view_has_the_cell_a_masked_name_masked_cards_accounts_and_tags(
    core: CoreStack,
) -> None:
    opened = open_account(core.client)
    response = core.client.get(f"/v1/customers/{opened['customer_id']}")
    assert response.status_code == 200, response.text
    customer = response.json()
    assert customer["customer_id"] == opened["customer_id"]
    assert customer["cell"] == int(opened["customer_id"][2:4])
    assert customer["name_masked"] == "张*"
    assert "张三" not in response.text
    assert [c["card_id"] for c in customer["cards"]] == [opened["card_id"]]
    assert customer["cards"][0]["pan_masked"] == opened["pan"][:6] + "******" + opened["pan"][-4:]
    assert customer["cards"][0]["status"] == "active"
    assert opened["pan"] not in response.text
    assert [a["account_id"] for a in customer["accounts"]] == [opened["account_id"]]
    assert customer["tags"] == []


def test_a_long_name_is_masked_after_its_first_character(core: CoreStack) -> None:
    answer = submit(core.client, application(name="Maria Schmidt"))
    customer = core.client.get(f"/v1/customers/{answer['customer_id']}").json()
    assert customer["name_masked"] == "M" + "*" * 12


# ---- the card life cycle ------------------------------------------------------------------------


def test_a_new_card_is_inactive_and_activation_makes_it_active_once(core: CoreStack) -> None:
    opened = open_account(core.client, activate=False)
    assert card(core.client, opened["card_id"])["status"] == "inactive"
    assert authorize(core.client, opened, 1_000).json()["response_code"] == "05"
    first = core.client.post(f"/v1/cards/{opened['card_id']}/activate")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "active"
    again = core.client.post(f"/v1/cards/{opened['card_id']}/activate")
    assert again.status_code == 200, again.text
    assert again.json()["status"] == "active"
    assert card(core.client, opened["card_id"])["status"] == "active"
    assert authorize(core.client, opened, 1_000).json()["response_code"] == "00"


def test_an_active_card_can_be_locked_and_unlocked(core: CoreStack) -> None:
    opened = open_account(core.client)
    locked = set_status(core.client, opened["card_id"], "locked")
    assert locked.status_code == 200, locked.text
    assert locked.json()["status"] == "locked"
    assert card(core.client, opened["card_id"])["status"] == "locked"
    assert authorize(core.client, opened, 1_000).json()["response_code"] == "05"
    unlocked = set_status(core.client, opened["card_id"], "active")
    assert unlocked.status_code == 200, unlocked.text
    assert card(core.client, opened["card_id"])["status"] == "active"


@pytest.mark.parametrize("start", ["inactive", "active", "locked"])
@pytest.mark.parametrize("end", ["lost", "stolen", "closed"])
def test_a_live_card_can_be_reported_lost_or_stolen_or_closed(core: CoreStack, start: str, end: str) -> None:
    opened = open_account(core.client, activate=start != "inactive")
    if start == "locked":
        assert set_status(core.client, opened["card_id"], "locked").status_code == 200
    response = set_status(core.client, opened["card_id"], end)
    assert response.status_code == 200, response.text
    assert response.json()["status"] == end
    assert card(core.client, opened["card_id"])["status"] == end


@pytest.mark.parametrize("terminal", ["lost", "stolen", "closed"])
def test_a_lost_stolen_or_closed_card_never_comes_back(core: CoreStack, terminal: str) -> None:
    opened = open_account(core.client)
    assert set_status(core.client, opened["card_id"], terminal).status_code == 200
    before = database_fingerprint(core)
    for target in ["active", "locked", "lost", "stolen", "closed"]:
        if target == terminal:
            continue
        response = set_status(core.client, opened["card_id"], target)
        assert response.status_code == 409, (terminal, target, response.text)
        error = response.json()["error"]
        assert error["code"] == "invalid_transition", error
    activate = core.client.post(f"/v1/cards/{opened['card_id']}/activate")
    assert activate.status_code == 409, activate.text
    assert activate.json()["error"]["code"] == "invalid_transition"
    assert card(core.client, opened["card_id"])["status"] == terminal
    assert database_fingerprint(core) == before


# ---- replacement --------------------------------------------------------------------------------


def test_replacing_a_card_issues_a_new_inactive_card_and_closes_the_old_one(core: CoreStack) -> None:
    opened = open_account(core.client)
    response = core.client.post(f"/v1/cards/{opened['card_id']}/replace")
    assert response.status_code == 201, response.text
    new = response.json()
    assert new["card_id"] != opened["card_id"]
    assert new["replaces"] == opened["card_id"]
    assert new["status"] == "inactive"
    assert new["customer_id"] == opened["customer_id"]
    assert new["account_id"] == opened["account_id"]
    assert new["pan_masked"].startswith("625977")
    # the new card's number and CVV2 are in this answer, and only here (CONTRACT)
    assert new["pan_masked"] == new["pan"][:6] + "******" + new["pan"][-4:] and new["pan"] != opened["pan"]
    assert re.fullmatch(r"\d{3}", new["cvv2"])
    assert "pan" not in card(core.client, new["card_id"]) and "cvv2" not in card(core.client, new["card_id"])
    old = card(core.client, opened["card_id"])
    assert old["status"] == "closed"
    assert old["replaced_by"] == new["card_id"]
    assert card(core.client, new["card_id"])["status"] == "inactive"
    customer = core.client.get(f"/v1/customers/{opened['customer_id']}").json()
    assert {c["card_id"] for c in customer["cards"]} == {opened["card_id"], new["card_id"]}
    # the old plastic no longer pays
    assert authorize(core.client, opened, 1_000).json()["response_code"] == "14"
    # and the new card can be activated
    activated = core.client.post(f"/v1/cards/{new['card_id']}/activate")
    assert activated.status_code == 200 and activated.json()["status"] == "active"
    replacement = {**opened, "pan": new["pan"], "cvv2": new["cvv2"], "expiry": new["expiry"]}
    assert authorize(core.client, replacement, 1_000, channel="online").json()["response_code"] == "00"


def test_a_card_reported_lost_can_be_replaced(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert set_status(core.client, opened["card_id"], "lost").status_code == 200
    response = core.client.post(f"/v1/cards/{opened['card_id']}/replace")
    assert response.status_code == 201, response.text
    assert card(core.client, opened["card_id"])["replaced_by"] == response.json()["card_id"]


@pytest.mark.parametrize(("reported", "code"), [("lost", "41"), ("stolen", "43")])
def test_a_lost_or_stolen_card_keeps_its_status_once_replaced_so_the_old_number_answers_for_it(
    core: CoreStack, reported: str, code: str
) -> None:
    opened = open_account(core.client)
    assert set_status(core.client, opened["card_id"], reported).status_code == 200
    response = core.client.post(f"/v1/cards/{opened['card_id']}/replace")
    assert response.status_code == 201, response.text
    old = card(core.client, opened["card_id"])
    assert (old["status"], old["replaced_by"]) == (reported, response.json()["card_id"])
    assert authorize(core.client, opened, 1_000).json()["response_code"] == code


def test_a_card_cannot_be_replaced_twice(core: CoreStack) -> None:
    opened = open_account(core.client)
    assert core.client.post(f"/v1/cards/{opened['card_id']}/replace").status_code == 201
    before = database_fingerprint(core)
    again = core.client.post(f"/v1/cards/{opened['card_id']}/replace")
    assert again.status_code == 409, again.text
    assert again.json()["error"]["field"] == "card_id"
    assert database_fingerprint(core) == before
    customer = core.client.get(f"/v1/customers/{opened['customer_id']}").json()
    assert len(customer["cards"]) == 2
