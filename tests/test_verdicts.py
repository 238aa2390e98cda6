"""The drill's verdicts on synthetic timelines and ledgers: each one is shown able to pass and to
fail (a lost acknowledged transaction, a slow recovery, a cell that never recovers, an isolation
breach, a broken ledger, a split brain)."""

from __future__ import annotations

from typing import Any

import pytest

from watertight import verdicts
from watertight.verdicts import Sample

FAULT_AT = 100.0


def steady(cell: int, start: float, end: float, ok: bool = True, step: float = 0.1) -> list[Sample]:
    """One sample every ``step`` seconds from ``start`` up to (not including) ``end``."""
    count = round((end - start) / step)
    return [(start + i * step, cell, ok) for i in range(count)]


def failover(cell: int, down_from: float, up_at: float, end: float = 160.0) -> list[Sample]:
    return steady(cell, 90.0, down_from) + steady(cell, down_from, up_at, ok=False) + steady(cell, up_at, end)


def judge(**changes: Any) -> dict[str, Any]:
    """A drill where everything held, with ``changes`` applied."""
    arguments: dict[str, Any] = {
        "rto": {1: 21.4},
        "rpo_result": {"acknowledged": 1000, "missing": 0, "missing_keys": []},
        "unaffected_cells": [2],
        "unaffected_error_rate": 0.0,
        "unaffected_requests": 600,
        "invariants_result": {
            "journal_balanced": True,
            "balances_match_postings": True,
            "limits_respected": True,
        },
        "split_brain_seen": False,
        "slo_rto_seconds": 30.0,
        "slo_rpo_missing": 0,
    }
    arguments.update(changes)
    return verdicts.verdict(**arguments)


# ---- RTO ------------------------------------------------------------------------------------------


def test_rto_is_the_time_from_the_fault_to_the_first_success_after_the_last_failure() -> None:
    timeline = failover(1, down_from=100.5, up_at=121.4)
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT) == pytest.approx(21.4)


def test_a_cell_that_never_failed_recovered_in_zero_seconds() -> None:
    timeline = steady(2, 90.0, 160.0) + failover(1, 100.5, 121.4)
    assert verdicts.rto_seconds(timeline, 2, FAULT_AT) == 0.0


def test_a_slow_recovery_is_measured_and_fails_the_rto_slo() -> None:
    timeline = failover(1, down_from=100.5, up_at=145.0)
    rto = verdicts.rto_seconds(timeline, 1, FAULT_AT)
    assert rto == pytest.approx(45.0)
    result = judge(rto={1: rto})
    assert result["passed"] is False
    assert result["reasons"] == ["cell-1 recovered 45.0 s after the fault, above the RTO of 30 s"]
    assert result["rto_seconds"] == {"cell-1": 45.0}


def test_a_cell_that_never_recovers_has_no_rto_and_fails() -> None:
    timeline = steady(1, 90.0, 100.5) + steady(1, 100.5, 160.0, ok=False)
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT) is None
    result = judge(rto={1: None})
    assert result["passed"] is False
    assert "cell-1 never recovered after the fault" in result["reasons"]
    assert result["rto_seconds"] == {"cell-1": None}


def test_successes_shorter_than_the_sustained_span_do_not_count_as_recovery() -> None:
    timeline = steady(1, 90.0, 100.5) + steady(1, 100.5, 120.0, ok=False) + steady(1, 120.0, 121.0)
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT, sustained_s=2.0) is None
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT, sustained_s=0.5) == pytest.approx(20.0)


def test_a_flap_after_a_first_recovery_counts_until_the_last_failure() -> None:
    timeline = (
        failover(1, 100.5, 110.0, end=115.0) + steady(1, 115.0, 118.0, ok=False) + steady(1, 118.0, 140.0)
    )
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT) == pytest.approx(18.0)


def test_failures_before_the_fault_and_after_the_window_are_not_this_faults() -> None:
    timeline = (
        steady(1, 80.0, 85.0, ok=False)
        + steady(1, 85.0, 100.5)
        + steady(1, 100.5, 105.0, ok=False)
        + steady(1, 105.0, 150.0)
        + steady(1, 150.0, 151.0, ok=False)
        + steady(1, 151.0, 160.0)
    )
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT, until=149.0) == pytest.approx(5.0)
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT) == pytest.approx(51.0)


def test_a_cell_with_no_sample_after_the_fault_is_not_shown_to_recover() -> None:
    assert verdicts.rto_seconds(steady(1, 90.0, 99.0), 1, FAULT_AT) is None
    assert verdicts.rto_seconds([], 1, FAULT_AT) is None


def test_an_unordered_timeline_is_judged_like_an_ordered_one() -> None:
    timeline = failover(1, 100.5, 121.4)
    assert verdicts.rto_seconds(list(reversed(timeline)), 1, FAULT_AT) == pytest.approx(21.4)


# ---- RPO ------------------------------------------------------------------------------------------


def acked(count: int) -> list[dict[str, Any]]:
    return [
        {"idempotency_key": f"k{i}", "endpoint": "POST /v1/repayments", "cell": 1, "transaction_id": f"TX{i}"}
        for i in range(count)
    ]


def test_every_acknowledged_transaction_found_by_id_or_key_means_nothing_missing() -> None:
    entries = acked(10)
    found = {f"TX{i}" for i in range(5)} | {f"k{i}" for i in range(5, 10)}
    assert verdicts.rpo(entries, found) == {"acknowledged": 10, "missing": 0, "missing_keys": []}


def test_a_lost_acknowledged_transaction_is_counted_named_and_fails_the_drill() -> None:
    entries = acked(10)
    found = {f"TX{i}" for i in range(10) if i != 7}
    result = verdicts.rpo(entries, found)
    assert result == {"acknowledged": 10, "missing": 1, "missing_keys": ["k7"]}
    judged = judge(rpo_result=result)
    assert judged["passed"] is False
    assert judged["reasons"] == [
        "1 acknowledged transactions missing from the ledgers (at most 0 allowed): k7"
    ]


def test_rpo_takes_a_lookup_function_and_shows_only_the_first_missing_keys() -> None:
    entries = acked(20)
    result = verdicts.rpo(entries, lambda entry: entry["idempotency_key"] in {"k0", "k1"})
    assert result["acknowledged"] == 20 and result["missing"] == 18
    assert result["missing_keys"] == ["k2", "k3", "k4", "k5", "k6"]


def test_an_rpo_slo_that_allows_losses_passes_within_it() -> None:
    result = {"acknowledged": 10, "missing": 2, "missing_keys": ["k1", "k2"]}
    assert judge(rpo_result=result, slo_rpo_missing=2)["passed"] is True
    assert judge(rpo_result=result, slo_rpo_missing=1)["passed"] is False


# ---- isolation ------------------------------------------------------------------------------------


def test_cells_that_kept_answering_had_no_errors() -> None:
    timeline = failover(1, 100.5, 121.4) + steady(2, 90.0, 160.0)
    assert verdicts.isolation(timeline, [2], (FAULT_AT, 160.0)) == 0.0
    assert verdicts.requests_in(timeline, [2], (FAULT_AT, 160.0)) == 600


def test_an_isolation_breach_is_the_error_ratio_of_the_cells_that_should_not_notice() -> None:
    timeline = failover(1, 100.5, 121.4) + steady(2, 90.0, 110.0) + steady(2, 110.0, 113.0, ok=False)
    timeline += steady(2, 113.0, 160.0)
    ratio = verdicts.isolation(timeline, [2], (FAULT_AT, 160.0))
    assert ratio == pytest.approx(30 / 600)
    judged = judge(unaffected_error_rate=ratio)
    assert judged["passed"] is False
    assert judged["reasons"] == [
        "cells that should not notice (cell-2) had an error rate of 0.0500 (at most 0 allowed)"
    ]
    assert judged["unaffected_cells"]["error_rate"] == pytest.approx(0.05)


def test_isolation_counts_only_the_window() -> None:
    timeline = steady(2, 80.0, 90.0, ok=False) + steady(2, 90.0, 160.0)
    assert verdicts.isolation(timeline, [2], (FAULT_AT, 160.0)) == 0.0
    assert verdicts.isolation(timeline, [2], (80.0, 160.0)) == pytest.approx(100 / 800)


def test_isolation_without_traffic_on_the_unaffected_cells_is_not_shown() -> None:
    assert verdicts.isolation([], [2], (0.0, 1.0)) == 0.0
    judged = judge(unaffected_requests=0)
    assert judged["passed"] is False
    assert "isolation not shown" in judged["reasons"][0]


# ---- invariants -----------------------------------------------------------------------------------


def trial_balance(cell: int, **changes: Any) -> dict[str, Any]:
    return {
        "cell": cell,
        "debits": 1000,
        "credits": 1000,
        "balanced": True,
        "entries_unbalanced": 0,
        "balances_match_postings": True,
        "holds_match_lines": True,
    } | changes


def limits_view(**total: int) -> dict[str, Any]:
    """A Gold customer: 500,000 CNY total, cash half of it; ``total`` overrides the total line."""
    amounts = {"limit": 50_000_000, "temporary": 0, "used": 1_000_000, "held": 200_000} | total
    root_own = amounts["limit"] + amounts["temporary"] - amounts["used"] - amounts["held"]
    purchase = {"limit": 50_000_000, "temporary": 0, "used": 1_000_000, "held": 200_000}
    cash = {"limit": 25_000_000, "temporary": 0, "used": 0, "held": 0}
    lines: list[dict[str, Any]] = [{"line": "total", **amounts, "available": max(0, root_own)}]
    for name, line in (("purchase", purchase), ("cash", cash)):
        own = line["limit"] + line["temporary"] - line["used"] - line["held"]
        lines.append({"line": name, **line, "available": max(0, min(own, root_own))})
    return {"lines": lines}


def test_balanced_ledgers_and_consistent_lines_hold_every_invariant() -> None:
    result = verdicts.invariants([trial_balance(1), trial_balance(2)], [limits_view(), limits_view()])
    assert result == {"journal_balanced": True, "balances_match_postings": True, "limits_respected": True}
    assert judge(invariants_result=result)["passed"] is True


@pytest.mark.parametrize(
    ("changes", "broken"),
    [
        ({"balanced": False}, "journal_balanced"),
        ({"entries_unbalanced": 3}, "journal_balanced"),
        ({"balances_match_postings": False}, "balances_match_postings"),
        ({"holds_match_lines": False}, "balances_match_postings"),
    ],
)
def test_a_broken_trial_balance_breaks_its_invariant(changes: dict[str, Any], broken: str) -> None:
    result = verdicts.invariants([trial_balance(1), trial_balance(2, **changes)], [limits_view()])
    assert result[broken] is False
    assert all(held for name, held in result.items() if name != broken)
    judged = judge(invariants_result=result)
    assert judged["passed"] is False
    assert judged["reasons"] == [f"ledger invariant {broken} does not hold"]


def test_no_trial_balance_at_all_proves_nothing() -> None:
    result = verdicts.invariants([], [])
    assert result["journal_balanced"] is False and result["balances_match_postings"] is False


def test_a_line_over_its_limit_breaks_the_limits_invariant() -> None:
    over = limits_view(used=49_900_000, held=200_000)
    assert verdicts.invariants([trial_balance(1)], [limits_view(), over])["limits_respected"] is False


def test_a_line_showing_more_available_than_it_has_breaks_the_limits_invariant() -> None:
    view = limits_view()
    view["lines"][1]["available"] += 1
    assert verdicts.invariants([trial_balance(1)], [view])["limits_respected"] is False


def test_a_child_line_showing_more_than_its_parent_breaks_the_limits_invariant() -> None:
    view = limits_view(used=49_000_000, held=0)
    purchase = view["lines"][1]
    purchase["available"] = purchase["limit"] - purchase["used"] - purchase["held"]
    assert verdicts.invariants([trial_balance(1)], [view])["limits_respected"] is False


def test_a_temporary_raise_counts_toward_the_limit() -> None:
    view = limits_view(used=50_500_000, held=0, temporary=1_000_000)
    assert verdicts.invariants([trial_balance(1)], [view])["limits_respected"] is True


# ---- split brain ----------------------------------------------------------------------------------


def test_one_writable_primary_per_cell_or_none_during_a_failover_is_not_split_brain() -> None:
    samples = [(100.0, 1, 1), (100.0, 2, 1), (110.0, 1, 0), (121.0, 1, 1)]
    assert verdicts.split_brain(samples) is False
    assert verdicts.split_brain_cells(samples) == {}


def test_two_writable_primaries_for_one_cell_is_split_brain_and_fails_the_drill() -> None:
    samples = [(100.0, 1, 1), (105.0, 1, 2), (106.0, 1, 2), (101.0, 2, 1)]
    assert verdicts.split_brain(samples) is True
    assert verdicts.split_brain_cells(samples) == {1: 105.0}
    judged = judge(split_brain_seen=True)
    assert judged["passed"] is False
    assert judged["reasons"] == ["a cell had two writable primaries (split brain)"]


def test_split_brain_not_sampled_is_not_a_failure() -> None:
    assert judge(split_brain_seen=None)["passed"] is True


# ---- the verdict ----------------------------------------------------------------------------------


def test_a_drill_where_everything_held_passes_with_the_contract_fields() -> None:
    result = judge()
    assert result["passed"] is True and result["reasons"] == []
    assert result["rto_seconds"] == {"cell-1": 21.4}
    assert result["rto_measured_from"] == "fault"
    assert result["rpo"]["missing"] == 0
    assert result["unaffected_cells"] == {"cells": ["cell-2"], "error_rate": 0.0, "requests": 600}
    assert result["slo"] == {"rto_seconds": 30.0, "rpo_missing": 0}


def test_every_failure_is_named_at_once() -> None:
    result = judge(
        rto={1: None, 3: 31.0},
        rpo_result={"acknowledged": 5, "missing": 2, "missing_keys": ["a", "b"]},
        unaffected_error_rate=0.5,
        invariants_result={
            "journal_balanced": False,
            "balances_match_postings": True,
            "limits_respected": True,
        },
        split_brain_seen=True,
    )
    assert result["passed"] is False
    assert len(result["reasons"]) == 6, result["reasons"]


def test_the_rto_slo_boundary_is_inclusive() -> None:
    assert judge(rto={1: 30.0})["passed"] is True
    assert judge(rto={1: 30.05})["passed"] is False


def test_an_error_budget_for_unaffected_cells_is_respected() -> None:
    assert judge(unaffected_error_rate=0.001, error_rate_max=0.01)["passed"] is True


def test_the_loss_of_both_centers_affects_every_cell() -> None:
    from watertight import drill

    _, fault = drill.load_experiment("dr-activation")
    assert fault.kind == "dr-activation"
    assert fault.affected_cells({1: "prod", 2: "samecity", 3: "prod"}) == [1, 2, 3]
    _, one_site = drill.load_experiment("site-loss-prod")
    assert one_site.affected_cells({1: "prod", 2: "samecity", 3: "prod"}) == [1, 3]


# ---- faults only the rollback heals (a whole cell lost) -------------------------------------------


def cell_lost_then_restarted(rollback_at: float, back_at: float, end: float = 180.0) -> list[Sample]:
    """Cell 1 down from the fault until ``back_at``, after the rollback restarted its members."""
    return steady(1, 90.0, 100.5) + steady(1, 100.5, back_at, ok=False) + steady(1, back_at, end)


def test_a_whole_cell_lost_is_judged_on_recovery_after_the_rollback() -> None:
    from watertight import drill

    _, fault = drill.load_experiment("cell-loss")
    assert fault.recovery_from == "rollback"
    assert fault.affected_cells({1: "prod", 2: "samecity"}) == [1]
    rollback_at = 121.0
    timeline = cell_lost_then_restarted(rollback_at, back_at=133.0) + steady(2, 90.0, 180.0)
    # judged up to the rollback from the fault, as a failover is, the cell never comes back
    assert verdicts.rto_seconds(timeline, 1, FAULT_AT, until=rollback_at) is None
    rto = verdicts.rto_seconds(timeline, 1, rollback_at)
    assert rto == pytest.approx(12.0)
    result = judge(rto={1: rto}, rto_measured_from="rollback")
    assert result["passed"] is True, result["reasons"]
    assert result["rto_measured_from"] == "rollback"


def test_a_whole_cell_slow_to_come_back_after_the_rollback_fails() -> None:
    rollback_at = 121.0
    timeline = cell_lost_then_restarted(rollback_at, back_at=160.0)
    rto = verdicts.rto_seconds(timeline, 1, rollback_at)
    assert rto == pytest.approx(39.0)
    result = judge(rto={1: rto}, rto_measured_from="rollback")
    assert result["reasons"] == ["cell-1 recovered 39.0 s after the rollback began, above the RTO of 30 s"]
    never = judge(
        rto={1: verdicts.rto_seconds(steady(1, 100.5, 180.0, ok=False), 1, rollback_at)},
        rto_measured_from="rollback",
    )
    assert never["reasons"] == ["cell-1 never recovered after the rollback began"]


def test_faults_a_standby_takes_over_from_are_judged_from_the_fault() -> None:
    from watertight import drill

    for name in (
        "site-loss-prod",
        "site-freeze-prod",
        "partition-prod",
        "cell-primary-kill",
        "dr-activation",
    ):
        assert drill.load_experiment(name)[1].recovery_from == "fault", name


def test_the_cells_that_should_not_notice_are_reported_with_their_rto_but_judged_on_errors() -> None:
    result = judge(unaffected_rto={2: 0.0})
    assert result["rto_seconds"] == {"cell-1": 21.4, "cell-2": 0.0}
    assert result["passed"] is True
    # a slow "recovery" of an unaffected cell fails through isolation, not twice through RTO
    breached = judge(unaffected_rto={2: 40.0}, unaffected_error_rate=0.2)
    assert [r for r in breached["reasons"] if "RTO" in r] == []
    assert any("should not notice" in r for r in breached["reasons"])


def test_the_drill_timeline_has_one_sample_per_request(tmp_path: Any) -> None:
    from watertight_load.traffic import request_name

    from watertight import drill

    header = "Timestamp,User Count,Type,Name,Requests/s,Failures/s,Total Request Count,Total Failure Count\n"
    name1, name2 = request_name("authorize", 1), request_name("authorize", 2)
    rows = [
        f"1000,4,POST,{name1},0,0,10,0",
        f"1000,4,POST,{name2},0,0,20,0",
        f"1001,4,POST,{name1},0,0,25,3",
        f"1001,4,POST,{name2},0,0,41,0",
        "1001,4,,Aggregated,0,0,66,3",
    ]
    path = tmp_path / "history.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    samples, series = drill.timeline_of(path)
    assert verdicts.requests_in(samples, [2], (1000.0, 1001.0)) == 41
    assert verdicts.requests_in(samples, [1], (1001.0, 1001.0)) == 15
    assert verdicts.isolation(samples, [1], (1001.0, 1001.0)) == pytest.approx(3 / 15)
    assert series["cell-1"] == [(0.0, 10.0, 0.0), (1.0, 12.0, 3.0)]


# ---- writable primaries, stale reads, indeterminate requests (issue 13) ----------------------------


def test_the_most_writable_primaries_per_cell_are_reported_and_two_fail_the_drill() -> None:
    samples = [(100.0, 1, 1), (101.0, 1, 0), (102.0, 1, 2), (100.0, 2, 1)]
    most = verdicts.writable_primaries_max(samples, [1, 2, 3])
    assert most == {"cell-1": 2, "cell-2": 1, "cell-3": 0}
    judged = judge(writable_max=most)
    assert judged["passed"] is False
    assert judged["reasons"] == ["cell-1 had 2 writable primaries at once (split brain)"]
    assert judge(writable_max={"cell-1": 1, "cell-2": 1})["passed"] is True


def write(account: str, done: float, transaction_id: str) -> dict[str, Any]:
    return {
        "op": "write",
        "account": account,
        "sent": done - 0.01,
        "done": done,
        "transaction_id": transaction_id,
    }


def read(
    account: str, sent: float, shown: list[tuple[str, float]], full: bool = False, done: float | None = None
) -> dict[str, Any]:
    return {
        "op": "read",
        "account": account,
        "sent": sent,
        "done": sent + 0.01 if done is None else done,
        "transactions": [list(t) for t in shown],
        "full": full,
    }


def test_reads_that_show_every_acknowledged_write_are_not_stale() -> None:
    history = [
        write("A", 10.0, "T1"),
        read("A", 10.5, [("T1", 9.99)]),
        write("A", 11.0, "T2"),
        read("A", 11.5, [("T2", 10.99), ("T1", 9.99)]),
        read("B", 11.5, []),  # nothing acknowledged for B
    ]
    assert verdicts.stale_reads(history) == {"stale": 0, "reads": 3, "examples": []}


def test_a_read_that_misses_a_write_acknowledged_before_it_began_is_stale() -> None:
    # the incident: the new primary acknowledged T2, a read served by the old one misses it
    history = [write("A", 10.0, "T1"), write("A", 20.0, "T2"), read("A", 21.0, [("T1", 9.99)])]
    result = verdicts.stale_reads(history)
    assert result["stale"] == 1
    assert result["examples"] == [{"account": "A", "read_sent": 21.0, "missing": "T2"}]
    judged = judge(stale=result)
    assert judged["passed"] is False and "1 of 1 reads were stale" in judged["reasons"][0]
    assert judged["stale_reads"] == 1


def test_a_write_acknowledged_after_the_read_began_may_be_missing() -> None:
    history = [read("A", 10.0, [], done=12.0), write("A", 11.0, "T1")]
    assert verdicts.stale_reads(history)["stale"] == 0


def test_a_read_that_loses_what_an_earlier_read_showed_is_stale_monotonic_reads() -> None:
    # T9 was never acknowledged to this client (its answer was lost), but a read showed it
    history = [read("A", 10.0, [("T9", 9.0)]), read("A", 11.0, [])]
    assert verdicts.stale_reads(history)["stale"] == 1
    # reads overlapping in time are not ordered: not judged against each other
    overlapping = [read("A", 10.0, [("T9", 9.0)], done=11.5), read("A", 11.0, [])]
    assert verdicts.stale_reads(overlapping)["stale"] == 0


def test_a_full_page_is_judged_only_where_the_missing_one_would_be_on_it() -> None:
    older = [write("A", 5.0, "T0"), read("A", 5.5, [("T0", 4.99)])]
    # a full page of newer transactions: T0 is beyond it, not stale
    page = [("T3", 8.0), ("T2", 7.0), ("T1", 6.0)]
    assert verdicts.stale_reads([*older, read("A", 9.0, page, full=True)])["stale"] == 0
    # a full page whose oldest entry is older than T0, without T0: stale
    page = [("T3", 8.0), ("T2", 7.0), ("T1", 3.0)]
    assert verdicts.stale_reads([*older, read("A", 9.0, page, full=True)])["stale"] == 1
    # the database's time of T9 is unknown (no read showed it): a full page is not judged on it
    unknown = [write("A", 5.0, "T9"), read("A", 9.0, [("T3", 8.0)], full=True)]
    assert verdicts.stale_reads(unknown)["stale"] == 0


def test_indeterminate_requests_are_counted_by_what_the_ledgers_hold() -> None:
    requests = [{"key": k, "cell": 1} for k in ("a", "b", "c")]
    result = verdicts.indeterminate(requests, {"a": "applied", "b": "absent", "c": "absent"})
    assert {k: result[k] for k in ("requests", "applied", "absent", "partial")} == {
        "requests": 3,
        "applied": 1,
        "absent": 2,
        "partial": 0,
    }
    judged = judge(indeterminate_result=result)
    assert judged["passed"] is True
    assert judged["indeterminate"] == {"requests": 3, "applied": 1, "absent": 2, "partial": 0}


def test_an_indeterminate_request_applied_in_part_or_not_resolved_fails_the_drill() -> None:
    requests = [{"key": "a", "cell": 1}, {"key": "b", "cell": 1}]
    partial = verdicts.indeterminate(requests, {"a": "partial", "b": "absent"})
    assert partial["partial"] == 1 and partial["partial_keys"] == ["a"]
    assert judge(indeterminate_result=partial)["reasons"] == [
        "1 indeterminate requests were applied in part: a"
    ]
    unresolved = verdicts.indeterminate(requests, {"a": "applied"})
    assert unresolved["unresolved"] == 1
    assert judge(indeterminate_result=unresolved)["passed"] is False


def test_a_full_page_that_ends_in_a_tie_of_times_is_cut_by_the_id_as_the_api_orders_it() -> None:
    # one batch commits several transactions with one time; the page ends inside that batch
    older = [write("A", 5.0, "T2"), read("A", 5.5, [("T2", 4.0), ("T1", 4.0)])]
    # T2 sorts after T1 at the same time: a page that ends at T1 must show T2
    assert verdicts.stale_reads([*older, read("A", 9.0, [("T3", 8.0), ("T1", 4.0)], full=True)])["stale"] == 1
    # a page that ends at T2 itself or at a later one may leave T1 out
    tail = [write("A", 5.0, "T1"), read("A", 5.5, [("T2", 4.0), ("T1", 4.0)])]
    assert verdicts.stale_reads([*tail, read("A", 9.0, [("T3", 8.0), ("T2", 4.0)], full=True)])["stale"] == 0
