"""The verdicts of a drill: recovery time, lost acknowledged transactions, isolation, ledger
invariants, split brain, stale reads and indeterminate requests, judged against the SLOs.

Owns: the arithmetic of judging, over data the drill has already gathered (a success timeline per
cell, the ack log, what the ledgers hold, trial balances, limits views, samples of writable
primaries). Never: read a file, call the network or look at the clock, so every verdict can be
shown to fail on synthetic data.

The success timeline is a list of ``(t_seconds, cell, ok)``: ``t_seconds`` when the answer (or the
failure) came, on any clock shared with ``fault_at``; ``ok`` false for an HTTP error, no answer or
an issuer-unavailable decline (``91``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

Sample = tuple[float, int, bool]
WritableSample = tuple[float, int, int]  # (t_seconds, cell, writable primaries seen)

SUSTAINED_SECONDS_DEFAULT = 2.0
MISSING_KEYS_SHOWN_MAX = 5
ID_FIELDS = ("transaction_id", "auth_id", "plan_id")
ROOT_LINE = "total"


def cell_key(cell: int) -> str:
    """How the report names a cell: ``cell-1``."""
    return f"cell-{cell}"


# ---- recovery time --------------------------------------------------------------------------------


def rto_seconds(
    timeline: Iterable[Sample],
    cell: int,
    fault_at: float,
    sustained_s: float = SUSTAINED_SECONDS_DEFAULT,
    until: float | None = None,
) -> float | None:
    """Seconds from ``fault_at`` to the start of the run of successes that follows the cell's last
    failure, provided that run lasts at least ``sustained_s``.

    0.0 when the cell saw no failure after the fault; None when it never recovered: it has no
    sample after the fault, its last sample failed, or its successes after the last failure span
    less than ``sustained_s`` (recovery not shown). ``until`` ends the window (e.g. when the
    rollback began), so a later blip is not counted against this fault.
    """
    assert sustained_s >= 0, sustained_s
    samples = sorted(
        (t, ok) for t, c, ok in timeline if c == cell and t >= fault_at and (until is None or t <= until)
    )
    if not samples:
        return None
    last_failure = max((i for i, (_, ok) in enumerate(samples) if not ok), default=None)
    if last_failure is None:
        return 0.0
    after = samples[last_failure + 1 :]
    if not after:
        return None
    recovered_at = after[0][0]
    if after[-1][0] - recovered_at < sustained_s:
        return None
    return recovered_at - fault_at


# ---- acknowledged transactions lost ---------------------------------------------------------------


def rpo(
    acked_entries: Iterable[Mapping[str, Any]],
    ledger_lookup: Callable[[Mapping[str, Any]], bool] | Iterable[str],
    missing_keys_shown: int = MISSING_KEYS_SHOWN_MAX,
) -> dict[str, Any]:
    """How many acknowledged financial transactions the ledgers no longer hold.

    ``acked_entries`` are ack-log entries (``idempotency_key`` and the id the core answered:
    ``transaction_id``, ``auth_id`` or ``plan_id``). ``ledger_lookup`` is either a callable that
    says whether the ledgers hold an entry, or the idempotency keys and ids found in the ledgers:
    an entry is present when its key or its id is among them.
    """
    if callable(ledger_lookup):
        present = ledger_lookup
    else:
        found = frozenset(ledger_lookup)

        def present(entry: Mapping[str, Any]) -> bool:
            if entry.get("idempotency_key") in found:
                return True
            return any(entry.get(name) in found for name in ID_FIELDS if entry.get(name))

    acknowledged = 0
    missing: list[str] = []
    for entry in acked_entries:
        acknowledged += 1
        if not present(entry):
            missing.append(str(entry.get("idempotency_key")))
    return {
        "acknowledged": acknowledged,
        "missing": len(missing),
        "missing_keys": missing[:missing_keys_shown],
    }


# ---- isolation ------------------------------------------------------------------------------------


def isolation(timeline: Iterable[Sample], cells: Iterable[int], window: tuple[float, float]) -> float:
    """Error ratio (failed / all) of ``cells`` within ``window`` (start, end inclusive): the cells
    that should not have noticed the fault. 0.0 when they had no request in the window (see
    ``requests_in``)."""
    chosen = set(cells)
    start, end = window
    total = failed = 0
    for t, cell, ok in timeline:
        if cell in chosen and start <= t <= end:
            total += 1
            failed += not ok
    return failed / total if total else 0.0


def requests_in(timeline: Iterable[Sample], cells: Iterable[int], window: tuple[float, float]) -> int:
    """How many samples of ``cells`` fall in ``window``: an isolation ratio over none proves nothing."""
    chosen = set(cells)
    start, end = window
    return sum(1 for t, cell, _ in timeline if cell in chosen and start <= t <= end)


# ---- ledger invariants ----------------------------------------------------------------------------


def invariants(
    trial_balances: Iterable[Mapping[str, Any]], lines_views: Iterable[Mapping[str, Any]]
) -> dict[str, bool]:
    """The ledger invariants over every cell's trial balance and every customer's limits view.

    - ``journal_balanced``: every trial balance says ``balanced`` with no unbalanced entry;
    - ``balances_match_postings``: balances equal the sum of postings, and holds match the lines;
    - ``limits_respected``: on every line, used + held stays within limit + temporary, and what is
      shown available is exactly limit + temporary - used - held, capped by the parent line and
      floored at 0.
    """
    balances = list(trial_balances)
    journal_balanced = bool(balances) and all(
        tb.get("balanced") is True and int(tb.get("entries_unbalanced", 0)) == 0 for tb in balances
    )
    match = bool(balances) and all(
        tb.get("balances_match_postings") is True and tb.get("holds_match_lines", True) is True
        for tb in balances
    )
    return {
        "journal_balanced": journal_balanced,
        "balances_match_postings": match,
        "limits_respected": all(_lines_respected(view) for view in lines_views),
    }


def _own_available(line: Mapping[str, Any]) -> int:
    return int(line["limit"]) + int(line.get("temporary", 0)) - int(line["used"]) - int(line["held"])


def _lines_respected(view: Mapping[str, Any]) -> bool:
    lines = {line["line"]: line for line in view.get("lines", [])}
    root = lines.get(ROOT_LINE)
    for name, line in lines.items():
        own = _own_available(line)
        if own < 0:  # used + held beyond limit + temporary
            return False
        expected = own if name == ROOT_LINE or root is None else min(own, _own_available(root))
        if int(line["available"]) != max(0, expected):
            return False
    return True


# ---- split brain ----------------------------------------------------------------------------------


def split_brain(samples: Iterable[WritableSample]) -> bool:
    """True if any sample saw two or more writable primaries for one cell."""
    return any(count >= 2 for _, _, count in samples)


def split_brain_cells(samples: Iterable[WritableSample]) -> dict[int, float]:
    """The cells that had two writable primaries, each with the first time it was seen."""
    seen: dict[int, float] = {}
    for t, cell, count in sorted(samples):
        if count >= 2 and cell not in seen:
            seen[cell] = t
    return seen


def writable_primaries_max(samples: Iterable[WritableSample], cells: Iterable[int]) -> dict[str, int]:
    """The most writable primaries any sample saw, per cell (0 for a cell never sampled): 1 is
    the design, 2 or more a split brain, 0 a cell that never had one to write to."""
    most = {cell: 0 for cell in cells}
    for _, cell, count in samples:
        most[cell] = max(most.get(cell, 0), count)
    return {cell_key(cell): count for cell, count in sorted(most.items())}


# ---- stale reads ----------------------------------------------------------------------------------

STALE_EXAMPLES_MAX = 5


def stale_reads(history: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Reads that missed a write acknowledged before they began, from the client's history (see
    watertight_load.history): read-your-writes and monotonic reads per account.

    A read of an account's newest transactions is stale when a transaction the read should show
    is not in it:
    - one whose write was acknowledged (to anyone) before the read was sent;
    - one that a read which had ended before this read was sent already showed (monotonic reads).
    A page with as many transactions as asked (``full``) may end before an older one: there the
    missing transaction counts only if the database's own time of it (known from any read that
    showed it, with its id breaking ties as the API orders them) sorts after the last transaction
    on the page. Writes whose time is unknown
    and that a full page does not show are not judged (never counted as stale).
    """
    entries = list(history)
    created: dict[str, float] = {}
    for entry in entries:
        if entry.get("op") == "read":
            for transaction_id, at in entry.get("transactions", []):
                if at is not None:
                    created[transaction_id] = float(at)
    writes: dict[str, list[tuple[float, str]]] = {}
    reads: dict[str, list[Mapping[str, Any]]] = {}
    for entry in entries:
        if entry.get("op") == "write":
            writes.setdefault(entry["account"], []).append((float(entry["done"]), entry["transaction_id"]))
        elif entry.get("op") == "read":
            reads.setdefault(entry["account"], []).append(entry)
    stale = 0
    judged = 0
    examples: list[dict[str, Any]] = []
    for account, account_reads in reads.items():
        # (when it became known that the transaction exists, id): acknowledged, or shown by a read
        known = sorted(writes.get(account, []))
        shown = sorted((float(r["done"]), t) for r in account_reads for t, _ in r.get("transactions", []))
        facts = sorted(known + shown)
        for read in account_reads:
            judged += 1
            sent = float(read["sent"])
            page = {t for t, _ in read.get("transactions", [])}
            # a page runs newest first by (time, id): what sorts below its last entry is beyond it
            keys = [(float(at), t) for t, at in read.get("transactions", []) if at is not None]
            oldest = min(keys) if read.get("full") and keys else None
            missing = None
            for known_at, transaction_id in facts:
                if known_at >= sent:
                    break
                if transaction_id in page:
                    continue
                if oldest is not None:
                    at = created.get(transaction_id)
                    if at is None or (at, transaction_id) <= oldest:
                        continue  # possibly beyond the page: not judged
                missing = transaction_id
                break
            if missing is not None:
                stale += 1
                if len(examples) < STALE_EXAMPLES_MAX:
                    examples.append({"account": account, "read_sent": sent, "missing": missing})
    return {"stale": stale, "reads": judged, "examples": examples}


# ---- indeterminate requests -----------------------------------------------------------------------


def indeterminate(requests: Iterable[Mapping[str, Any]], outcomes: Mapping[str, str]) -> dict[str, Any]:
    """Requests whose outcome their client could not know (``op: indeterminate`` of the history),
    resolved against the ledgers: ``outcomes`` maps each idempotency key to ``applied`` (committed,
    everything it wrote is there), ``absent`` (nothing of it is there) or ``partial`` (committed
    in part: a bug). A key the ledgers were not asked about counts as unresolved."""
    counts = {"requests": 0, "applied": 0, "absent": 0, "partial": 0, "unresolved": 0}
    partial_keys: list[str] = []
    for request in requests:
        counts["requests"] += 1
        outcome = outcomes.get(str(request.get("key")), "unresolved")
        if outcome not in counts:
            outcome = "unresolved"
        counts[outcome] += 1
        if outcome == "partial" and len(partial_keys) < MISSING_KEYS_SHOWN_MAX:
            partial_keys.append(str(request.get("key")))
    return {**counts, "partial_keys": partial_keys}


# ---- the verdict ----------------------------------------------------------------------------------


def verdict(
    *,
    rto: Mapping[int, float | None],
    rpo_result: Mapping[str, Any],
    unaffected_cells: Sequence[int],
    unaffected_error_rate: float,
    unaffected_requests: int,
    invariants_result: Mapping[str, bool],
    split_brain_seen: bool | None,
    slo_rto_seconds: float,
    slo_rpo_missing: int,
    error_rate_max: float = 0.0,
    unaffected_rto: Mapping[int, float | None] | None = None,
    rto_measured_from: str = "fault",
    stale: Mapping[str, Any] | None = None,
    indeterminate_result: Mapping[str, Any] | None = None,
    writable_max: Mapping[str, int] | None = None,
) -> dict[str, Any]:
    """Combine the measures into the report's fields and judge them against the SLOs.

    ``rto`` holds the affected cells (None: never recovered), measured from ``rto_measured_from``
    ("fault", or "rollback" for a fault nothing takes over from until the rollback heals it).
    ``unaffected_rto`` is reported beside it but not judged: those cells are judged on their
    error ratio (isolation), which is stricter. ``split_brain_seen`` None means it
    was not sampled (not a failure). ``passed`` is true only when every affected cell recovered
    within ``slo_rto_seconds``, at most ``slo_rpo_missing`` acknowledged transactions are missing,
    the unaffected cells erred at most ``error_rate_max`` (and had traffic to judge), every
    invariant holds, no cell had two writable primaries (``split_brain_seen``, or a
    ``writable_max`` above 1), no read was stale (``stale``, from ``stale_reads``; None: no history)
    and no indeterminate request was partially applied or left unresolved
    (``indeterminate_result``, from ``indeterminate``); ``reasons`` says why not.
    """
    reasons: list[str] = []
    assert rto_measured_from in ("fault", "rollback"), rto_measured_from
    after = "the fault" if rto_measured_from == "fault" else "the rollback began"
    for cell, seconds in sorted(rto.items()):
        if seconds is None:
            reasons.append(f"{cell_key(cell)} never recovered after {after}")
        elif seconds > slo_rto_seconds:
            reasons.append(
                f"{cell_key(cell)} recovered {seconds:.1f} s after {after}, above the RTO of {slo_rto_seconds:g} s"
            )
    missing = int(rpo_result["missing"])
    if missing > slo_rpo_missing:
        shown = ", ".join(rpo_result.get("missing_keys", []))
        reasons.append(
            f"{missing} acknowledged transactions missing from the ledgers (at most {slo_rpo_missing} allowed)"
            + (f": {shown}" if shown else "")
        )
    if unaffected_cells:
        names = ", ".join(cell_key(c) for c in unaffected_cells)
        if unaffected_requests == 0:
            reasons.append(f"no traffic on the cells that should not notice ({names}): isolation not shown")
        elif unaffected_error_rate > error_rate_max:
            reasons.append(
                f"cells that should not notice ({names}) had an error rate of {unaffected_error_rate:.4f} (at most {error_rate_max:g} allowed)"
            )
    for name, held in invariants_result.items():
        if not held:
            reasons.append(f"ledger invariant {name} does not hold")
    if split_brain_seen:
        reasons.append("a cell had two writable primaries (split brain)")
    for name, count in sorted((writable_max or {}).items()):
        if count > 1 and not split_brain_seen:
            reasons.append(f"{name} had {count} writable primaries at once (split brain)")
    if stale is not None and int(stale["stale"]) > 0:
        shown = "; ".join(f"account {e['account']} missed {e['missing']}" for e in stale.get("examples", []))
        reasons.append(
            f"{stale['stale']} of {stale['reads']} reads were stale (missed a write acknowledged, or "
            f"a transaction shown, before they began)" + (f": {shown}" if shown else "")
        )
    if indeterminate_result is not None:
        if int(indeterminate_result["partial"]) > 0:
            reasons.append(
                f"{indeterminate_result['partial']} indeterminate requests were applied in part: "
                + ", ".join(indeterminate_result.get("partial_keys", []))
            )
        if int(indeterminate_result.get("unresolved", 0)) > 0:
            reasons.append(
                f"{indeterminate_result['unresolved']} indeterminate requests could not be resolved against the ledgers"
            )
    return {
        "passed": not reasons,
        "reasons": reasons,
        "rto_seconds": {
            cell_key(c): (None if s is None else round(s, 1))
            for c, s in sorted({**(unaffected_rto or {}), **rto}.items())
        },
        "rto_measured_from": rto_measured_from,
        "rpo": dict(rpo_result),
        "unaffected_cells": {
            "cells": [cell_key(c) for c in unaffected_cells],
            "error_rate": round(unaffected_error_rate, 6),
            "requests": unaffected_requests,
        },
        "invariants": dict(invariants_result),
        "split_brain": split_brain_seen,
        "stale_reads": None if stale is None else int(stale["stale"]),
        "stale_reads_detail": None if stale is None else dict(stale),
        "indeterminate": None
        if indeterminate_result is None
        else {k: indeterminate_result[k] for k in ("requests", "applied", "absent", "partial")},
        "indeterminate_detail": None if indeterminate_result is None else dict(indeterminate_result),
        "writable_primaries_max": dict(writable_max) if writable_max is not None else None,
        "slo": {"rto_seconds": slo_rto_seconds, "rpo_missing": slo_rpo_missing},
    }


# ---- detection (monitoring) -----------------------------------------------------------------------

DETECT_SECONDS_MAX = 15.0
RESOLVE_SECONDS_MAX = 60.0
# faults every monitoring worth the name must notice within DETECT_SECONDS_MAX
DETECTION_REQUIRED = frozenset(
    {"site-loss", "site-freeze", "partition", "patroni-crash", "cell-primary-kill"}
)
ALERTS_LISTED_MAX = 50


def alert_episodes(notifications: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Alertmanager's notifications (watertight.monitoring.receiver records) folded into episodes:
    one per alert per firing (fingerprint and start), with when it was first delivered and when
    it ended (None: not resolved when the records end)."""
    episodes: dict[tuple[str, float], dict[str, Any]] = {}
    for note in sorted(notifications, key=lambda n: float(n["received_at"])):
        starts_at = note.get("starts_at")
        if starts_at is None:
            continue
        key = (str(note["fingerprint"]), float(starts_at))
        episode = episodes.get(key)
        if episode is None:
            episode = episodes[key] = {
                "alertname": note["alertname"],
                "labels": dict(note.get("labels") or {}),
                "starts_at": float(starts_at),
                "delivered_at": float(note["received_at"]),
                "ends_at": None,
            }
        if note.get("status") == "resolved" and note.get("ends_at") is not None:
            episode["ends_at"] = float(note["ends_at"])
    return sorted(episodes.values(), key=lambda e: (e["starts_at"], e["alertname"]))


def detection(
    notifications: Iterable[Mapping[str, Any]],
    *,
    steady_from: float,
    fault_at: float,
    recovered_at: float,
    detection_required: bool,
    detect_seconds_max: float = DETECT_SECONDS_MAX,
    resolve_seconds_max: float = RESOLVE_SECONDS_MAX,
) -> tuple[dict[str, Any], list[str]]:
    """How soon monitoring told of the fault, whether it cried wolf before it, and whether it fell
    silent once the topology was whole again. Returns the report's ``detection`` and the reasons
    it fails.

    - ``seconds_to_detect``: from ``fault_at`` to the delivery of the first alert that started
      firing at or after the fault (``first_alert``); required within ``detect_seconds_max`` when
      ``detection_required``;
    - ``false_alarms``: alerts firing at some moment of the steady part of the run (from
      ``steady_from`` to the fault) that started before the fault: must be 0;
    - every alert of the run resolved within ``resolve_seconds_max`` of ``recovered_at`` (the
      rollback done).
    Times are epoch seconds on one clock; per alert, ``fired_s`` and ``delivered_s`` are relative
    to the fault and ``resolved_s`` to the recovery.
    """
    episodes = alert_episodes(notifications)
    false = [
        e
        for e in episodes
        if e["starts_at"] < fault_at and (e["ends_at"] is None or e["ends_at"] > steady_from)
    ]
    after = [e for e in episodes if e["starts_at"] >= fault_at]
    first = min(after, key=lambda e: e["delivered_at"], default=None)
    deadline = recovered_at + resolve_seconds_max
    unresolved = [e for e in false + after if e["ends_at"] is None or e["ends_at"] > deadline]

    def described(episode: Mapping[str, Any]) -> dict[str, Any]:
        labels = {
            k: v
            for k, v in episode["labels"].items()
            if k in ("cell", "site", "upstream_site", "component", "response_code")
        }
        return {
            "alert": episode["alertname"],
            "class": episode["labels"].get("class"),
            **labels,
            "fired_s": round(episode["starts_at"] - fault_at, 1),
            "delivered_s": round(episode["delivered_at"] - fault_at, 1),
            "resolved_s": None if episode["ends_at"] is None else round(episode["ends_at"] - recovered_at, 1),
        }

    seconds = None if first is None else round(first["delivered_at"] - fault_at, 1)
    result = {
        "first_alert": None if first is None else first["alertname"],
        "seconds_to_detect": seconds,
        "false_alarms": len(false),
        "required": detection_required,
        "seconds_to_detect_max": detect_seconds_max,
        "resolved_within_s": resolve_seconds_max,
        "alerts": [described(e) for e in after][:ALERTS_LISTED_MAX],
        "false_alarm_alerts": [described(e) for e in false][:ALERTS_LISTED_MAX],
        "unresolved": [described(e) for e in unresolved][:ALERTS_LISTED_MAX],
    }
    reasons = []
    if detection_required and seconds is None:
        reasons.append("no alert was delivered after the fault: monitoring did not notice it")
    elif detection_required and seconds is not None and seconds > detect_seconds_max:
        reasons.append(
            f"the first alert ({result['first_alert']}) came {seconds:.1f} s after the fault, above {detect_seconds_max:g} s"
        )
    if false:
        names = ", ".join(sorted({e["alertname"] for e in false}))
        reasons.append(f"{len(false)} alerts fired during the steady part of the run (false alarms): {names}")
    if unresolved:
        names = ", ".join(sorted({e["alertname"] for e in unresolved}))
        reasons.append(
            f"{len(unresolved)} alerts were not resolved within {resolve_seconds_max:g} s of the recovery: {names}"
        )
    return result, reasons
