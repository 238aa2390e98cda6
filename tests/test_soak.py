"""The soak, short: the whole card mix under Locust while the statement cycle runs for 35
business dates (every account crosses its statement date, some a second one), then the drills'
invariants, every acknowledged transaction in the ledgers, every cycle answered.

``watertight soak`` runs the same for 10 minutes against the local topology (README, "Soak").
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures_core import CoreStack, new_stack
from watertight import soak, verdicts
from watertight.pg import PostgresServer

CELLS = [1, 2]


@pytest.fixture
def stack(postgres: PostgresServer) -> Iterator[CoreStack]:
    own = new_stack(postgres)
    try:
        first = own.start_app([1])
        second = own.start_app([2])
        own.start_gateway({1: [first.url], 2: [second.url]})
        yield own
    finally:
        own.close()


def keys_in(stack: CoreStack) -> soak.KeysFound:
    def found(acked: list[dict[str, Any]]) -> set[str]:
        keys: set[str] = set()
        for cell in CELLS:
            mine = [str(e["idempotency_key"]) for e in acked if e["cell"] == cell]
            keys |= {
                row[0] for row in stack.psql(cell, "SELECT key FROM idempotency WHERE key = ANY($1)", mine)
            }
        return keys

    return found


def test_a_short_soak_crossing_statement_dates_under_load_keeps_every_invariant(
    stack: CoreStack, tmp_path: Path
) -> None:
    plan = soak.Plan(
        seconds=40,
        rate_financial=40,
        rate_nonfinancial=40,
        business_days=35,
        customers=30,
        first_business_date=date(2061, 3, 1),
    )
    population = tmp_path / "population.json"
    result = soak.run(
        stack.url,
        CELLS,
        plan,
        tmp_path / "report",
        population,
        keys_in(stack),
        print,
        stack.api_tokens,
        stack.secrets_file,
    )
    assert result["passed"] is True, result["reasons"]
    assert result["invariants"] == {
        "journal_balanced": True,
        "balances_match_postings": True,
        "limits_respected": True,
    }
    assert result["customers_checked"] >= 30
    assert result["rpo"]["acknowledged"] > 500 and result["rpo"]["missing"] == 0
    acknowledged = result["acknowledged_by_endpoint"]
    for endpoint in (
        "POST /v1/authorizations",
        "POST /v1/clearing",
        "POST /v1/repayments",
        "POST /v1/refunds",
    ):
        assert acknowledged.get(endpoint, 0) > 0, acknowledged
    cycles = result["cycles"]
    assert (cycles["run"], cycles["answered"]) == (35, 35)
    # 35 days cover every cycle day: each customer got a statement (some a second one)
    assert cycles["statements"] >= result["customers_checked"]
    assert (tmp_path / "report" / "soak.json").exists()

    # the checks have teeth: a hold the lines forgot is caught
    stack.psql(1, "UPDATE lines SET held_fen = held_fen + 1 WHERE ctid = (SELECT ctid FROM lines LIMIT 1)")
    balances, views = soak.ledger_checks(stack.url, CELLS, population, stack.api_tokens)
    assert verdicts.invariants(balances, views)["balances_match_postings"] is False


def test_the_cycles_of_a_soak_are_spread_over_the_middle_of_the_run() -> None:
    offsets = soak.cycle_offsets(600, 56)
    assert len(offsets) == 56
    assert offsets[0] == pytest.approx(90) and offsets[-1] == pytest.approx(510)
    assert all(later > earlier for earlier, later in itertools.pairwise(offsets))
    with pytest.raises(ValueError, match="financial"):
        soak.Plan(rate_financial=0)
