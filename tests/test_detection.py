"""Time to detect, false alarms and resolution, judged on synthetic Alertmanager notifications;
and the drill's receiver taking a real webhook POST."""

from __future__ import annotations

import json
import urllib.request

import pytest

from tests.topologies import on_test_net
from watertight import verdicts
from watertight.monitoring.receiver import AlertReceiver, parse_time

STEADY_FROM, FAULT_AT, RECOVERED_AT = 1000.0, 1020.0, 1080.0


def note(
    name: str, status: str, starts_at: float, received_at: float, ends_at: float | None = None, **labels: str
) -> dict:
    return {
        "received_at": received_at,
        "status": status,
        "alertname": name,
        "labels": {"alertname": name, "class": "slo", **labels},
        "starts_at": starts_at,
        "ends_at": ends_at,
        "fingerprint": f"{name}{sorted(labels.items())}",
    }


def judge(notes: list[dict], required: bool = True) -> tuple[dict, list[str]]:
    return verdicts.detection(
        notes,
        steady_from=STEADY_FROM,
        fault_at=FAULT_AT,
        recovered_at=RECOVERED_AT,
        detection_required=required,
    )


def test_a_lost_site_told_within_15_seconds_and_quiet_after_recovery_passes() -> None:
    notes = [
        note("CellLeaderMissing", "firing", 1026.0, 1027.5, cell="1"),
        note("PatroniMemberDown", "firing", 1027.0, 1028.0, cell="1", site="prod"),
        note("CellLeaderMissing", "resolved", 1026.0, 1060.0, ends_at=1058.0, cell="1"),
        note("PatroniMemberDown", "resolved", 1027.0, 1100.0, ends_at=1098.0, cell="1", site="prod"),
    ]
    result, reasons = judge(notes)
    assert reasons == []
    assert result["first_alert"] == "CellLeaderMissing" and result["seconds_to_detect"] == 7.5
    assert result["false_alarms"] == 0 and result["unresolved"] == []
    assert [a["resolved_s"] for a in result["alerts"]] == [-22.0, 18.0]


def test_an_alert_later_than_15_seconds_fails_naming_it() -> None:
    result, reasons = judge([note("CellLeaderMissing", "firing", 1038.0, 1040.0, cell="1")])
    assert result["seconds_to_detect"] == 20.0
    assert any("CellLeaderMissing" in r and "20.0 s" in r for r in reasons)


def test_no_alert_fails_only_where_detection_is_required() -> None:
    assert judge([])[1] == ["no alert was delivered after the fault: monitoring did not notice it"]
    assert judge([], required=False)[1] == []


def test_an_alert_of_the_steady_part_is_a_false_alarm_but_one_resolved_before_it_is_not() -> None:
    before = note("CellLatencyP99High", "resolved", 900.0, 990.0, ends_at=980.0, cell="1", site="entry")
    during = note("CellApprovalRatioDropping", "firing", 1010.0, 1011.0, cell="2")
    left_over = note("CellSyncStandbyMissing", "firing", 950.0, 951.0, cell="2")
    result, reasons = judge(
        [before, during, left_over, note("CellLeaderMissing", "firing", 1025.0, 1026.0, cell="1")]
    )
    assert result["false_alarms"] == 2
    assert {a["alert"] for a in result["false_alarm_alerts"]} == {
        "CellApprovalRatioDropping",
        "CellSyncStandbyMissing",
    }
    assert any("false alarms" in r for r in reasons)


def test_an_alert_still_firing_60_seconds_after_recovery_fails() -> None:
    notes = [
        note("CellSyncStandbyMissing", "firing", 1030.0, 1031.0, cell="2"),
        note("CellSyncStandbyMissing", "resolved", 1030.0, 1150.0, ends_at=1145.0, cell="2"),
        note("EtcdMemberDown", "firing", 1025.0, 1026.0, component="etcd-prod"),
    ]
    result, reasons = judge(notes)
    assert {a["alert"] for a in result["unresolved"]} == {"CellSyncStandbyMissing", "EtcdMemberDown"}
    assert any("not resolved within 60 s" in r for r in reasons)


def test_a_second_firing_of_the_same_alert_is_its_own_episode() -> None:
    notes = [
        note("CellNotServed", "firing", 1025.0, 1026.0, cell="1"),
        note("CellNotServed", "resolved", 1025.0, 1040.0, ends_at=1039.0, cell="1"),
        note("CellNotServed", "firing", 1050.0, 1051.0, cell="1"),
        note("CellNotServed", "resolved", 1050.0, 1070.0, ends_at=1069.0, cell="1"),
    ]
    assert len(verdicts.alert_episodes(notes)) == 2
    assert judge(notes)[1] == []


def test_alertmanager_times_with_nanoseconds_and_its_zero_time() -> None:
    assert parse_time("2026-11-30T19:18:48.847748123Z") == pytest.approx(1796066328.847748)
    assert parse_time("0001-01-01T00:00:00Z") is None


def test_the_receiver_records_what_alertmanager_posts() -> None:
    url = on_test_net("http://127.0.0.1:18994/alerts")
    receiver = AlertReceiver(url).start()
    try:
        payload = {
            "version": "4",
            "status": "firing",
            "alerts": [
                {
                    "status": "firing",
                    "labels": {"alertname": "CellLeaderMissing", "cell": "1", "class": "slo"},
                    "startsAt": "2026-11-30T19:18:48.5Z",
                    "endsAt": "0001-01-01T00:00:00Z",
                    "fingerprint": "abc",
                }
            ],
        }
        request = urllib.request.Request(
            url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=5) as answer:
            assert answer.status == 200
        (record,) = receiver.records()
        assert record["alertname"] == "CellLeaderMissing" and record["status"] == "firing"
        assert (
            record["labels"]["cell"] == "1" and record["ends_at"] is None and record["fingerprint"] == "abc"
        )
        with pytest.raises(OSError, match="another drill"):
            AlertReceiver(url)
    finally:
        receiver.stop()
