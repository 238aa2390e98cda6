"""The Locust card traffic (loadtests/) against a real core: gates that pass and gates that fail,
the ack log proven against the ledgers (also after a SIGKILL), per-cell statistics, the web UI,
several processes; and the pacing, verdict and naming pieces on their own."""

from __future__ import annotations

import csv
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from watertight_load.ack_log import ack_log_files, read_ack_log
from watertight_load.outstanding import LostAnswer, Outstanding
from watertight_load.pacing import Pacer
from watertight_load.population import Customer, Population, population_for_run
from watertight_load.tokens import Tokens
from watertight_load.traffic import (
    failure_reason,
    indeterminate,
    mask_pan,
    parse_request_name,
    request_name,
    traffic_class,
)

from tests.fixtures_core import CoreStack, new_stack
from watertight.pg import PostgresServer, free_port

LOCUSTFILE = Path(__file__).resolve().parents[1] / "loadtests" / "locustfile.py"
LOCUST = Path(sys.executable).parent / "locust"
RUN_S = 8
LOCUST_TIMEOUT_S = 60
FULL_PAN = re.compile(r"625977\d{10}")
# loose enough for a busy 2-core machine; the gates are what is under test, not the machine
GATES = ["--max-error-ratio", "0.01", "--max-p99-ms", "1000", "--min-tps-ratio", "0.8"]


def locust(
    stack: CoreStack, *args: str, run_s: int = RUN_S, users: int = 20
) -> subprocess.CompletedProcess[str]:
    command = [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", str(users)]
    command += ["-t", f"{run_s}s", "--host", stack.url, "--api-tokens", str(stack.secrets_file)]
    command += ["--only-summary", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=LOCUST_TIMEOUT_S, check=False)


def stats_rows(csv_prefix: Path) -> list[dict[str, str]]:
    with open(f"{csv_prefix}_stats.csv", newline="") as file:
        return [row for row in csv.DictReader(file) if row["Name"] != "Aggregated"]


def found_in_ledgers(stack: CoreStack, entries: list[dict[str, object]]) -> dict[str, int]:
    """How many ack log entries each cell's database holds (by idempotency key and answered id)."""
    found: dict[str, int] = {}
    for cell in range(1, stack.cell_count + 1):
        mine = [entry for entry in entries if entry["cell"] == cell]
        keys = [str(entry["idempotency_key"]) for entry in mine]
        present = {
            row[0] for row in stack.psql(cell, "SELECT key FROM idempotency WHERE key = ANY($1)", keys)
        }
        for column, table in (
            ("auth_id", "authorizations"),
            ("transaction_id", "transactions"),
            ("plan_id", "installment_plans"),
        ):
            ids = {str(entry[column]) for entry in mine if column in entry}  # a reversal repeats its auth_id
            rows = stack.psql(cell, f"SELECT {column} FROM {table} WHERE {column} = ANY($1)", list(ids))
            missing = ids - {row[0] for row in rows}
            assert not missing, f"cell {cell}: acknowledged {column}s missing: {sorted(missing)}"
        found[str(cell)] = sum(1 for key in keys if key in present)
    return found


@pytest.fixture(scope="module")
def load_stack(postgres: PostgresServer) -> Iterator[CoreStack]:
    """Two cells, an app server each, one gateway: shared by the passing runs of this module."""
    stack = new_stack(postgres)
    try:
        first = stack.start_app([1])
        second = stack.start_app([2])
        stack.start_gateway({1: [first.url], 2: [second.url]})
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def population_file(load_stack: CoreStack, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("population") / "population.json"
    population_for_run(load_stack.url, 30, Tokens(load_stack.api_tokens), str(path))
    return path


def test_a_short_run_passes_its_gates_and_every_acknowledged_transaction_is_in_the_ledgers(
    load_stack: CoreStack, tmp_path: Path
) -> None:
    ack_log = tmp_path / "ack.jsonl"
    population = tmp_path / "population.json"
    summary = tmp_path / "summary.json"
    result = locust(
        load_stack,
        "--rate-financial", "50", "--rate-nonfinancial", "100", "--customers", "30",
        "--population", str(population), "--ack-log", str(ack_log), "--csv", str(tmp_path / "run"),
        "--summary-json", str(summary), *GATES,
    )  # fmt: skip
    assert result.returncode == 0, [line for line in result.stderr.splitlines() if "gate" in line.lower()]
    assert "SLA gates passed" in result.stderr

    # the population was opened through the API, spread over both cells, and kept private
    opened = Population.load(population)
    assert len(opened.customers) >= 30 and set(opened.cells()) == {1, 2}
    assert population.stat().st_mode & 0o777 == 0o600

    entries = read_ack_log(ack_log)
    endpoints = {entry["endpoint"] for entry in entries}
    assert {
        "POST /v1/authorizations",
        "POST /v1/clearing",
        "POST /v1/authorizations/{auth_id}/increment",
        "POST /v1/refunds",
    } <= endpoints, endpoints
    assert all(entry["status"] != "declined" or entry["response_code"] != "91" for entry in entries)
    assert found_in_ledgers(load_stack, entries) == {
        str(cell): sum(1 for entry in entries if entry["cell"] == cell) for cell in (1, 2)
    }
    assert not FULL_PAN.search(ack_log.read_text() + result.stdout + result.stderr)

    figures = json.loads(summary.read_text())
    assert figures["passed"] is True
    assert 40 <= figures["load"]["financial_tps"] <= 60, figures["load"]
    assert 80 <= figures["load"]["nonfinancial_tps"] <= 120, figures["load"]
    names = {row["Name"] for row in stats_rows(tmp_path / "run")}
    assert {"/v1/authorizations [cell 1]", "/v1/authorizations [cell 2]"} <= names, names


def test_the_same_run_with_one_cell_down_fails_its_gates_and_the_stats_name_the_cell(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    stack = new_stack(postgres)
    try:
        first = stack.start_app([1])
        second = stack.start_app([2])
        stack.start_gateway({1: [first.url], 2: [second.url]})
        population = tmp_path / "population.json"
        population_for_run(stack.url, 20, Tokens(stack.api_tokens), str(population))
        second.stop()
        result = locust(
            stack,
            "--rate-financial", "50", "--rate-nonfinancial", "100", "--population", str(population),
            "--ack-log", str(tmp_path / "ack.jsonl"), "--csv", str(tmp_path / "run"), *GATES,
        )  # fmt: skip
    finally:
        stack.close()
    assert result.returncode == 1, result.stderr[-4000:]
    gate_lines = [line for line in result.stderr.splitlines() if "SLA gate" in line]
    error_gate = [line for line in gate_lines if "error ratio" in line]
    assert error_gate and re.search(r"cell 2: \d+ of \d+ failed", error_gate[0]), gate_lines
    assert "cell 1:" not in error_gate[0], error_gate
    rows = stats_rows(tmp_path / "run")
    for cell, failing in ((1, False), (2, True)):
        # the gateway answers routing lookups itself: they go on working for a cell that is down
        mine = [
            row
            for row in rows
            if parse_request_name(row["Name"])[1] == cell and "/routing/" not in row["Name"]
        ]
        assert mine, f"no requests named for cell {cell}"
        failures = sum(int(row["Failure Count"]) for row in mine)
        requests = sum(int(row["Request Count"]) for row in mine)
        assert (failures == requests) if failing else (failures == 0), (cell, failures, requests)
    # nothing of cell 2 was acknowledged: its authorizations were declined with 91 (a failure)
    assert all(entry["cell"] == 1 for entry in read_ack_log(tmp_path / "ack.jsonl"))


def test_authorizations_whose_answers_an_outage_lost_are_reversed_by_their_key_once_it_ends(
    postgres: PostgresServer, tmp_path: Path
) -> None:
    stack = new_stack(postgres)
    try:
        first = stack.start_app([1])
        second = stack.start_app([2])
        stack.start_gateway({1: [first.url], 2: [second.url]})
        population = tmp_path / "population.json"
        population_for_run(stack.url, 20, Tokens(stack.api_tokens), str(population))
        port = int(second.url.rsplit(":", 1)[1])
        second.stop()  # cell 2 answers nothing: its authorizations are declined 91 by the gateway
        ack_log = tmp_path / "ack.jsonl"
        command = [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10", "-t", "16s"]
        command += ["--host", stack.url, "--population", str(population), "--ack-log", str(ack_log)]
        command += ["--api-tokens", str(stack.secrets_file)]
        command += ["--rate-financial", "40", "--rate-nonfinancial", "0", "--only-summary", "Cardholder"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(5)
            stack.start_app([2], port=port)  # the outage ends
            process.wait(timeout=LOCUST_TIMEOUT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait(timeout=10)
        entries = read_ack_log(ack_log)
        reversals = [e for e in entries if e["endpoint"] == "POST /v1/authorizations/reversal"]
        assert reversals, "no lost answer was reversed"
        assert {e["cell"] for e in reversals} == {2}
        keys = sorted({str(e["original_idempotency_key"]) for e in reversals})
        # the originals never reached cell 2: each key is claimed, so a late original is declined
        rows = stack.psql(
            2,
            "SELECT key, convert_from(response, 'UTF8')::json->>'response_code' FROM idempotency WHERE key = ANY($1)",
            keys,
        )
        assert sorted(row[0] for row in rows) == keys
        assert {row[1] for row in rows} == {"05"}
        assert all(e["status"] == "recorded" for e in reversals)
        assert found_in_ledgers(stack, entries) == {
            str(cell): sum(1 for entry in entries if entry["cell"] == cell) for cell in (1, 2)
        }
    finally:
        stack.close()


def test_the_web_ui_starts_a_swarm_with_rates_from_the_form_and_serves_stats(
    load_stack: CoreStack, population_file: Path, tmp_path: Path
) -> None:
    port = free_port()
    command = [str(LOCUST), "-f", str(LOCUSTFILE), "--web-host", "127.0.0.1", "--web-port", str(port)]
    command += ["--host", load_stack.url, "--population", str(population_file)]
    command += ["--api-tokens", str(load_stack.secrets_file)]
    log = (tmp_path / "locust.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    web = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: httpx.get(web + "/", timeout=1.0).status_code == 200, 20.0)
        # the custom arguments are form fields too: only financial traffic this time
        swarm = httpx.post(
            web + "/swarm",
            data={
                "user_count": 10,
                "spawn_rate": 10,
                "host": load_stack.url,
                "rate_financial": "30",
                "rate_nonfinancial": "0",
            },
            timeout=5.0,
        )
        assert swarm.status_code == 200 and swarm.json()["success"], swarm.text

        def financial_requests() -> int:
            stats = httpx.get(web + "/stats/requests", timeout=2.0).json()["stats"]
            return sum(s["num_requests"] for s in stats if s["name"].startswith("/v1/authorizations [cell"))

        wait_for(lambda: financial_requests() >= 30, 20.0)
        stats = httpx.get(web + "/stats/requests", timeout=2.0).json()["stats"]
        named = [s for s in stats if s["name"] != "Aggregated"]
        assert all(traffic_class(s["method"], s["name"]) == "financial" for s in named), named
        assert all(parse_request_name(s["name"])[1] in (1, 2) for s in named), named
        httpx.get(web + "/stop", timeout=5.0)
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=20)
        log.close()


def test_several_processes_write_one_ack_log_each_and_the_reader_merges_them(
    load_stack: CoreStack, population_file: Path, tmp_path: Path
) -> None:
    ack_log = tmp_path / "ack.jsonl"
    result = locust(
        load_stack,
        "--processes", "2", "--rate-financial", "40", "--rate-nonfinancial", "0",
        "--population", str(population_file), "--ack-log", str(ack_log), *GATES, "Cardholder",
        users=4,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    files = ack_log_files(ack_log)
    assert len(files) == 2 and not ack_log.exists(), files
    per_file = [len(file.read_text().splitlines()) for file in files]
    assert all(count > 0 for count in per_file), per_file
    entries = read_ack_log(ack_log)
    assert len(entries) == sum(per_file)
    assert [entry["time"] for entry in entries] == sorted(entry["time"] for entry in entries)
    assert len({entry["idempotency_key"] for entry in entries}) == len(entries)
    assert found_in_ledgers(load_stack, entries) == {
        str(cell): sum(1 for entry in entries if entry["cell"] == cell) for cell in (1, 2)
    }


def test_the_ack_log_keeps_what_was_acknowledged_when_locust_is_killed(
    load_stack: CoreStack, population_file: Path, tmp_path: Path
) -> None:
    ack_log = tmp_path / "ack.jsonl"
    command = [str(LOCUST), "-f", str(LOCUSTFILE), "--headless", "-u", "10", "-r", "10", "-t", "60s"]
    command += ["--host", load_stack.url, "--population", str(population_file), "--ack-log", str(ack_log)]
    command += ["--api-tokens", str(load_stack.secrets_file)]
    command += ["--rate-financial", "100", "--rate-nonfinancial", "0", "Cardholder"]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: ack_log.exists() and len(ack_log.read_bytes().splitlines()) >= 200, 20.0)
    finally:
        process.send_signal(signal.SIGKILL)  # no quitting event, no flush, no close
        process.wait(timeout=10)
    entries = read_ack_log(ack_log)
    assert len(entries) >= 200
    assert found_in_ledgers(load_stack, entries) == {
        str(cell): sum(1 for entry in entries if entry["cell"] == cell) for cell in (1, 2)
    }


def wait_for(condition: Callable[[], bool], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if condition():
                return
        except (httpx.HTTPError, ValueError, KeyError):
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout_s} s")
        time.sleep(0.2)


# the pieces, without a core


def test_the_schedule_offers_a_fixed_rate_and_serves_late_slots_as_a_bounded_burst() -> None:
    now = [100.0]
    pacer = Pacer("financial", clock=lambda: now[0])
    pacer.configure(10.0)
    assert [pacer.claim() for _ in range(3)] == pytest.approx([0.0, 0.1, 0.2])
    now[0] += 0.5  # every user was busy: the slots at +0.3 and +0.4 are late, +0.5 is due now
    assert [pacer.claim() for _ in range(4)] == pytest.approx([0.0, 0.0, 0.0, 0.1])
    assert pacer.slots_late == 2 and pacer.slots_dropped == 0
    now[0] += 10.0  # a stall: what is more than a second late is dropped, not sent as a flood
    waits = [pacer.claim() for _ in range(13)]
    assert waits[:10] == pytest.approx([0.0] * 10, abs=1e-9) and waits[-1] > 0  # a 1 s burst at most
    assert 88 <= pacer.slots_dropped <= 90 and pacer.lateness_max_s <= 1.0 + 1e-9


def test_declines_are_answers_but_91_and_http_errors_are_failures() -> None:
    assert failure_reason("/v1/authorizations", 200, {"approved": False, "response_code": "51"}) is None
    assert failure_reason("/v1/authorizations", 200, {"approved": False, "response_code": "91"})
    assert (
        failure_reason("/v1/clearing", 503, {"error": {"code": "cell_unavailable"}})
        == "HTTP 503 cell_unavailable"
    )
    assert failure_reason("/v1/clearing", 0, None)
    assert failure_reason("/v1/cards/{card_id}", 200, {"card_id": "CD01"}) is None
    # a purchase the load's own repayments paid off is not converted: the customer is told so
    repaid = {"error": {"code": "already_repaid"}}
    assert failure_reason("/v1/installments", 422, repaid) is None
    assert failure_reason("/v1/installments", 422, {"error": {"code": "invalid"}}) == "HTTP 422 invalid"
    assert failure_reason("/v1/repayments", 422, repaid) == "HTTP 422 already_repaid"


def test_a_failure_that_may_hide_a_commit_is_indeterminate_and_a_refusal_is_not() -> None:
    route = "/v1/authorizations"
    assert indeterminate(route, 200, {"approved": False, "response_code": "91"})
    assert indeterminate(route, 0, None)  # no answer: a timeout, a reset
    assert indeterminate(route, 503, {"error": {"code": "cell_unavailable"}})
    assert indeterminate(route, 504, {"error": {"code": "upstream_timeout"}})
    assert not indeterminate(route, 409, {"error": {"code": "idempotency_key_reused"}})
    assert not indeterminate(route, 200, {"approved": False, "response_code": "51"})
    assert not indeterminate(route, 200, {"approved": True, "response_code": "00"})


def test_a_lost_answer_is_reversed_at_once_then_after_growing_waits_and_never_in_two_slots_in_a_row() -> None:
    customer = Customer(
        "CU01" + "A" * 16, "AC01" + "A" * 16, "CD01" + "A" * 16, "6259770100000018", "01/30", 1
    )
    outstanding = Outstanding()
    outstanding.lost_answer(LostAnswer("lt-original", "lt-reversal", customer, 1_000))
    lost = outstanding.next_lost_answer(now_s=100.0)
    assert lost is not None and lost.original_key == "lt-original"
    outstanding.lost_answer(lost.again(100.0))
    assert outstanding.next_lost_answer(now_s=100.0) is None  # every other slot at most
    assert outstanding.next_lost_answer(now_s=100.5) is None  # not due before a second
    again = outstanding.next_lost_answer(now_s=101.0)
    assert again is not None and (again.reversal_key, again.tries) == ("lt-reversal", 1)
    waits = []
    for _ in range(8):
        later = again.again(0.0)
        waits.append(later.due_s)
        again = later
    assert waits == [2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0, 30.0]


def test_request_names_carry_the_route_and_cell_and_never_an_id() -> None:
    name = request_name("/v1/authorizations/{auth_id}/reversal", 2)
    assert name == "/v1/authorizations/{auth_id}/reversal [cell 2]"
    assert parse_request_name(name) == ("/v1/authorizations/{auth_id}/reversal", 2)
    assert traffic_class("POST", name) == "financial"
    assert traffic_class("POST", request_name("/v1/installments/quote", 1)) == "nonfinancial"
    assert mask_pan("6259770200000019") == "625977******0019"


def test_the_ack_log_reader_skips_a_line_torn_by_a_kill_and_refuses_a_corrupt_one(tmp_path: Path) -> None:
    path = tmp_path / "ack.jsonl"
    (tmp_path / "ack.jsonl.worker-a").write_text('{"time": "2"}\n{"time": "1"}\n{"time": "3", "idem')
    (tmp_path / "ack.jsonl.worker-b").write_text('{"time": "0"}\n')
    assert [entry["time"] for entry in read_ack_log(path)] == ["0", "1", "2"]
    (tmp_path / "ack.jsonl.worker-b").write_text('{"time": \n{"time": "0"}\n')
    with pytest.raises(ValueError, match="worker-b:1"):
        read_ack_log(path)
