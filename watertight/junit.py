"""JUnit XML of drill reports, for CI: one test suite per experiment, one test case per verdict
(RTO per cell, RPO, isolation, each ledger invariant, split brain, stale reads, indeterminate
requests, detection), the figures in each case's message.

Owns: turning report dicts (the fields of CONTRACT.md's report.json) into the JUnit format CI
systems read (Jenkins, GitLab, GitHub actions' test reporters): ``testsuites > testsuite >
testcase`` with ``failure`` or ``error`` or ``skipped``. Never: judge anything itself (the drill
did), read a file or look at the clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from xml.etree import ElementTree

CLASS_PREFIX = "watertight.drill"


@dataclass(frozen=True)
class Case:
    name: str
    message: str
    outcome: str = "passed"  # passed | failure | error | skipped


def cases(report: Mapping[str, Any]) -> list[Case]:
    """The verdicts of one experiment's report as test cases."""
    found: list[Case] = []
    reasons = [str(r) for r in report.get("reasons", [])]
    slo = report.get("slo") or {}
    rto_slo = slo.get("rto_seconds")
    measured_from = report.get("rto_measured_from", "fault")
    affected = set(report.get("affected_cells") or [])
    unaffected = set((report.get("unaffected_cells") or {}).get("cells", []))
    for cell, seconds in sorted((report.get("rto_seconds") or {}).items()):
        if cell in unaffected and cell not in affected:
            continue  # judged by isolation, not by RTO
        if seconds is None:
            found.append(Case(f"rto {cell}", f"{cell} never recovered after the {measured_from}", "failure"))
        elif rto_slo is not None and seconds > rto_slo:
            found.append(
                Case(
                    f"rto {cell}", f"{cell} recovered in {seconds} s, above the RTO of {rto_slo} s", "failure"
                )
            )
        else:
            found.append(Case(f"rto {cell}", f"{cell} recovered in {seconds} s (RTO {rto_slo} s)"))
    rpo = report.get("rpo")
    if rpo is not None:
        missing = int(rpo.get("missing", 0))
        allowed = int(slo.get("rpo_missing", 0))
        text = f"{missing} of {rpo.get('acknowledged')} acknowledged transactions missing (at most {allowed})"
        found.append(Case("rpo", text, "failure" if missing > allowed else "passed"))
    isolation = report.get("unaffected_cells") or {}
    if isolation.get("cells"):
        failed = any("should not notice" in r or "no traffic on the cells" in r for r in reasons)
        text = (
            f"cells {', '.join(isolation['cells'])}: error rate {isolation.get('error_rate')} over "
            f"{isolation.get('requests')} requests"
        )
        found.append(Case("isolation", text, "failure" if failed else "passed"))
    for name, held in sorted((report.get("invariants") or {}).items()):
        found.append(
            Case(
                f"invariant {name}",
                f"{name}: {'holds' if held else 'does not hold'}",
                "passed" if held else "failure",
            )
        )
    writable = report.get("writable_primaries_max")
    if writable is not None or report.get("split_brain") is not None:
        most = max((int(v) for v in (writable or {}).values()), default=0)
        split = bool(report.get("split_brain")) or most > 1
        text = (
            f"most writable primaries per cell: {writable}" if writable is not None else "split brain sampled"
        )
        found.append(Case("split brain", text, "failure" if split else "passed"))
    stale = report.get("stale_reads")
    if stale is not None:
        detail = report.get("stale_reads_detail") or {}
        text = f"{stale} of {detail.get('reads', '?')} reads stale"
        found.append(Case("stale reads", text, "failure" if int(stale) > 0 else "passed"))
    indeterminate = report.get("indeterminate")
    if indeterminate is not None:
        detail = report.get("indeterminate_detail") or {}
        bad = int(indeterminate.get("partial", 0)) + int(detail.get("unresolved", 0))
        text = (
            f"{indeterminate.get('requests')} indeterminate: {indeterminate.get('applied')} applied, "
            f"{indeterminate.get('absent')} absent, {indeterminate.get('partial')} partial"
        )
        found.append(Case("indeterminate requests", text, "failure" if bad else "passed"))
    detection = report.get("detection")
    if isinstance(detection, Mapping):
        failed = any(r.startswith("detection") or "alert" in r for r in reasons)
        text = ", ".join(f"{k}={v}" for k, v in detection.items() if not isinstance(v, (dict, list)))
        found.append(Case("detection", text or "no alert", "failure" if failed else "passed"))
    aborted = report.get("aborted")
    if aborted:
        found.append(Case("aborted", f"aborted at {aborted.get('at')}: {aborted.get('reason')}", "error"))
    if report.get("status") not in (None, "completed") and not aborted:
        found.append(Case("experiment", f"the experiment ended {report.get('status')}", "error"))
    return found


def junit_xml(reports: Iterable[Mapping[str, Any]]) -> str:
    """One ``testsuites`` document for every experiment's report."""
    root = ElementTree.Element("testsuites", name="watertight drill")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for report in reports:
        experiment = str(report.get("experiment", "drill"))
        found = cases(report)
        counts = {
            "tests": len(found),
            "failures": sum(1 for c in found if c.outcome == "failure"),
            "errors": sum(1 for c in found if c.outcome == "error"),
            "skipped": sum(1 for c in found if c.outcome == "skipped"),
        }
        for key, value in counts.items():
            totals[key] += value
        attributes = {key: str(value) for key, value in counts.items()}
        attributes["timestamp"] = str((report.get("fault") or {}).get("injected_at", ""))
        suite = ElementTree.SubElement(root, "testsuite", attributes, name=experiment)
        for case in found:
            element = ElementTree.SubElement(
                suite, "testcase", name=case.name, classname=f"{CLASS_PREFIX}.{experiment}"
            )
            if case.outcome == "passed":
                ElementTree.SubElement(element, "system-out").text = case.message
            else:
                ElementTree.SubElement(
                    element, case.outcome, message=case.message, type=case.outcome
                ).text = case.message
    for key, value in totals.items():
        root.set(key, str(value))
    ElementTree.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ElementTree.tostring(root, encoding="unicode") + "\n"
