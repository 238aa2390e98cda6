"""The runbooks through ansible-runner against a real local topology under light load: a planned
switchover of a center loses nothing, draining a cell leaves the other untouched, and activating dr
after the loss of both centers serves every cell again and reports the RPO. Every runbook run a
second time changes nothing; check mode changes nothing."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import msgspec
import pytest

from tests.ansible_tasks import ansible_template, kubernetes_task
from tests.api_auth import ANONYMOUS
from tests.cards import customers_in_each_cell
from tests.topologies import moved
from tests.writers import Writers, ledger_transactions
from watertight import pg, render, verdicts
from watertight import topology as topology_module
from watertight.monitoring import config as monitoring_config
from watertight.runbooks import ops, runner
from watertight.runtime.local import LocalRuntime, http_json

# its own addresses and entry port: other test modules' topologies are left alone
TEST_TOPOLOGY = moved(50, 2).replace("port: 28080", "port: 28180").replace("_port: 2809", "_port: 2819")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = pg.service_tempdir("watertight-runbooks-")
    run_dir.chmod(0o755)
    topology = topology_module.parse(TEST_TOPOLOGY, "runbook test topology")
    local = LocalRuntime(run_dir, topology, TEST_TOPOLOGY)
    try:
        local.up(progress=print)
        yield local
    finally:
        LocalRuntime(run_dir).down(purge=True)


@pytest.fixture(scope="module")
def accounts(runtime: LocalRuntime) -> dict[int, str]:
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        return {cell: opened["account_id"] for cell, opened in customers_in_each_cell(client).items()}


def leaders(runtime: LocalRuntime) -> dict[int, str | None]:
    return {cell: runtime.cell_view(cell)["leader_site"] for cell in runtime.topology.cell_numbers}


def assert_nothing_lost(runtime: LocalRuntime, writers: Writers, accounts: dict[int, str]) -> None:
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        for cell, account_id in accounts.items():
            acked = writers.acked_ids(cell)
            assert acked, f"cell {cell}: nothing was acknowledged"
            missing = set(acked) - ledger_transactions(client, account_id)
            assert not missing, f"cell {cell}: {len(missing)} acknowledged transactions missing"


def serving_diagnostics(runtime: LocalRuntime) -> str:
    """What the entry, the gateways and the app servers report, and the app servers' last lines."""
    lines = []
    for component in runtime.components:
        if component.kind in ("entry", "gateway", "app") and runtime.expected(component):
            lines.append(f"{component.name} readyz: {http_json(component.ready_url or '', timeout_s=2.0)}")
            if component.kind == "app":
                log = runtime.log_path(component).read_text(errors="replace").splitlines()
                lines += [f"  | {line}" for line in log[-15:]]
    return "\n".join(lines)


def gateway_drain_state(runtime: LocalRuntime, cell: int) -> dict[str, Any]:
    """``python -m cardcore.gateway.drain`` against prod's gateway."""
    gateway = next(c for c in runtime.components if c.name == "gateway-prod")
    address = urlsplit(gateway.ready_url or "")
    result = subprocess.run(
        [sys.executable, "-m", "cardcore.gateway.drain", "--host", str(address.hostname),
         "--port", str(address.port), "--cell", str(cell)],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout))


# ---- without a topology -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name", ["switchover-site", "activate-dr", "failback", "drain-cell", "rotate-api-tokens", "rotate-keys"]
)
def test_every_runbook_passes_the_ansible_syntax_check(name: str) -> None:
    assert name in runner.names()
    rc, output = runner.syntax_check(name)
    assert rc == 0, output


def test_a_broken_playbook_fails_the_syntax_check(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "broken.yml").write_text(
        "- hosts: localhost\n  tasks:\n    - name: x\n      no_such_module_anywhere: {}\n"
    )
    monkeypatch.setattr(runner, "RUNBOOKS_DIR", tmp_path)
    rc, output = runner.syntax_check("broken")
    assert rc != 0 and "no_such_module_anywhere" in output


def test_bad_extras_and_unknown_runbooks_are_refused_before_anything_runs(tmp_path: Path) -> None:
    with pytest.raises(runner.RunbookError, match="KEY=VALUE"):
        runner.parse_extras(["site"])
    with pytest.raises(runner.RunbookError, match="set by watertight"):
        runner.parse_extras(["watertight_run_dir=/tmp"])
    assert runner.parse_extras(["site=prod", "ack_log=a=b"]) == {"site": "prod", "ack_log": "a=b"}
    result = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "runbook", "no-such-runbook", "--run-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "no runbook named 'no-such-runbook'" in result.stderr and "switchover-site" in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_the_step_summary_reads_ansible_runner_events() -> None:
    event = {
        "event": "runner_on_ok",
        "event_data": {
            "task": "Promote each cell's dr copy",
            "duration": 3.21,
            "res": {"changed": True, "results": [{"msg": "cell 1 promoted"}, {"msg": "cell 2 promoted"}]},
        },
    }
    step = runner.step_of(event)
    assert step is not None
    assert (step["status"], step["changed"], step["seconds"]) == ("ok", True, 3.21)
    assert step["msg"] == "cell 1 promoted; cell 2 promoted"
    assert runner.step_of({"event": "playbook_on_task_start", "event_data": {}}) is None


# ---- against the topology ---------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_switchover_site_moves_every_cell_prod_leads_and_loses_nothing(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    before = leaders(runtime)
    led_by_prod = [cell for cell, site in before.items() if site == "prod"]
    assert led_by_prod and set(before.values()) == {"prod", "samecity"}

    checked = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir, check=True)
    assert checked["rc"] == 0 and checked["status"] == "successful", checked
    assert any("would switch cell" in s["msg"] for s in checked["steps"])
    assert leaders(runtime) == before  # check mode changed nothing

    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(1)
        summary = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir)
        time.sleep(2)
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    assert leaders(runtime) == dict.fromkeys(runtime.topology.cell_numbers, "samecity")
    (switch,) = [s for s in summary["steps"] if s["task"].startswith("Switch each cell")]
    assert switch["changed"] and switch["seconds"] is not None
    print(f"switchover-site prod: {switch['seconds']} s for {len(led_by_prod)} cell(s); {switch['msg']}")
    assert Path(summary["artifacts"]).is_dir()
    assert json.loads((Path(summary["artifacts"]).parents[1] / "summary.json").read_text())["rc"] == 0
    assert_nothing_lost(runtime, writers, accounts)

    again = runner.run("switchover-site", {"site": "prod"}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again

    # back as the topology spreads them, for the tests that follow
    for cell in led_by_prod:
        ops.switchover_cell(str(runtime.run_dir), cell, "prod")
    assert leaders(runtime) == before


@pytest.mark.timeout(300)
def test_drain_cell_stops_one_cell_and_the_other_never_notices(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(1)
        drained_at = time.time()
        summary = runner.run("drain-cell", {"cell": "2"}, runtime.run_dir)
        assert summary["rc"] == 0 and summary["changed"] == 1, summary
        with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
            refused = client.post(
                "/v1/repayments",
                json={"idempotency_key": "drained-1", "account_id": accounts[2], "amount": 1},
            )
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "cell_drained"
        # what the kubernetes target's drain-cell runs inside each gateway pod, against a real gateway
        assert gateway_drain_state(runtime, 2) == {"drained": True, "in_flight": 0}
        serving = gateway_drain_state(runtime, 1)  # under the writers' load: requests may be in flight
        assert serving["drained"] is False and isinstance(serving["in_flight"], int), serving
        again = runner.run("drain-cell", {"cell": "2"}, runtime.run_dir)
        assert again["rc"] == 0 and again["changed"] == 0, again
        time.sleep(1)
        back = runner.run("drain-cell", {"cell": "2", "state": "serving"}, runtime.run_dir)
        assert back["rc"] == 0 and back["changed"] == 1, back
        restored_at = time.time()
        time.sleep(1.5)
    window = (drained_at, restored_at)
    assert verdicts.isolation(writers.timeline, [1], window) == 0.0
    assert verdicts.requests_in(writers.timeline, [1], window) > 20
    assert any(not ok for t, cell, ok in writers.timeline if cell == 2 and drained_at < t < restored_at)
    assert all(ok for t, cell, ok in writers.timeline if cell == 2 and t > restored_at + 0.5)
    assert_nothing_lost(runtime, writers, accounts)

    assert gateway_drain_state(runtime, 2) == {"drained": False, "in_flight": 0}
    with pytest.raises(AssertionError, match="reports no cell 9"):
        gateway_drain_state(runtime, 9)

    bad = runner.run("drain-cell", {"cell": "9"}, runtime.run_dir)
    assert bad["rc"] != 0 and "no cell 9" in str(bad["error"])
    missing = runner.run("drain-cell", {}, runtime.run_dir)
    assert missing["rc"] != 0 and "pass cell=N" in str(missing["error"])


def keys_listed_as_on_kubernetes(runtime: LocalRuntime, ack_log: Path) -> list[str]:
    """What activate-dr on kubernetes hands its RPO step: its listing task's psql command, run here
    against each cell's dr member (the pod's socket replaced by dr's address), its results put
    through the step's found_keys expression."""
    listing = kubernetes_task("activate-dr", "List the idempotency keys")
    count = kubernetes_task("activate-dr", "Count acknowledged")
    window = ops.ack_log_window(str(runtime.run_dir), str(ack_log))
    password = runtime.superuser_password()
    variables: dict[str, Any] = {
        "ack_window": window,
        "kube_cells": [{"cell": cell} for cell in runtime.topology.cell_numbers],
        "kube": {
            "postgres_socket_dir": runtime.topology.address("dr"),
            "superuser": pg.SUPERUSER,
            "database": render.DATABASE,
        },
    }
    results = []
    for item in ansible_template(listing["loop"], variables):
        argv = shlex.split(
            ansible_template(listing["kubernetes.core.k8s_exec"]["command"], {**variables, "item": item})
        )
        assert argv[0] == "psql", argv
        env = {
            **os.environ,
            "PGPORT": str(runtime.topology.postgres_port(item["cell"])),
            "PGPASSWORD": password,
        }
        done = subprocess.run(
            [str(pg.pg_bindir() / "psql"), *argv[1:]], env=env, capture_output=True, text=True, timeout=60
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        results.append({"item": item, "rc": done.returncode, "stdout_lines": done.stdout.splitlines()})
    found = ansible_template(count["watertight_step"]["found_keys"], {"dr_keys": {"results": results}})
    assert isinstance(found, list)
    return found


@pytest.mark.timeout(300)
def test_rotating_the_api_tokens_loses_no_request_and_retires_the_old_tokens(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    old = runtime.api_tokens()
    pids = {name: record.pid for name, record in runtime.records.items()}

    def status(token: str, path: str = "/v1/products") -> int:
        with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0, auth=ANONYMOUS) as client:
            return client.get(path, headers={"authorization": f"Bearer {token}"}).status_code

    checked = runner.run("rotate-api-tokens", {}, runtime.run_dir, check=True)
    assert checked["rc"] == 0 and runtime.api_tokens() == old  # check mode changed nothing
    # the writers read the secrets file on every request: they move to the new tokens the moment
    # they are handed out, which must be after every server accepts them
    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(1)
        begun = runner.run("rotate-api-tokens", {}, runtime.run_dir)
        time.sleep(1.5)
    assert begun["rc"] == 0 and begun["changed"] == 1, begun
    new = runtime.api_tokens()
    assert set(new.values()).isdisjoint(old.values())
    assert all(ok for _, _, ok in writers.timeline), [f for f in writers.failed.values() if f]
    assert status(old["channel"]) == 200 and status(new["channel"]) == 200  # both during the change
    again = runner.run("rotate-api-tokens", {}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0 and runtime.api_tokens() == new, again

    finished = runner.run("rotate-api-tokens", {"phase": "finish"}, runtime.run_dir)
    assert finished["rc"] == 0 and finished["changed"] == 1, finished
    assert status(old["channel"]) == 401 and status(new["channel"]) == 200
    assert status(old["operator"], "/metrics") == 401
    # straight to an app server too
    app = render.LocalEndpoints(runtime.topology).app_url("prod")
    with httpx.Client(base_url=app, timeout=10.0, auth=ANONYMOUS) as client:
        assert (
            client.get("/metrics", headers={"authorization": f"Bearer {old['operator']}"}).status_code == 401
        )
        assert (
            client.get("/metrics", headers={"authorization": f"Bearer {new['operator']}"}).status_code == 200
        )
    runtime.reload()
    assert {name: record.pid for name, record in runtime.records.items()} == pids  # nothing restarted
    assert runner.run("rotate-api-tokens", {"phase": "finish"}, runtime.run_dir)["changed"] == 0
    # Prometheus scrapes with the new operator token (its own 0600 file, rewritten by the
    # rotation): every target it should scrape is still up with the old token retired
    scrape_token = runtime.run_dir / "components" / "prometheus" / monitoring_config.TOKEN_FILE
    assert scrape_token.read_text() == new["operator"] and scrape_token.stat().st_mode & 0o777 == 0o600
    deadline = time.monotonic() + 30
    while True:
        targets = runtime.monitoring_targets() or []
        down = [t for t in targets if t["expected"] and t["health"] != "up"]
        if targets and not down:
            break
        assert time.monotonic() < deadline, down or "Prometheus lists no target"
        time.sleep(1)
    # the tokens are in no log and no file of the run but the secrets file (and Prometheus' token)
    for path in runtime.run_dir.rglob("*"):
        if path == scrape_token:
            continue
        if path.is_file() and path != runtime.secrets_path and path.stat().st_size < 50_000_000:
            data = path.read_bytes()
            assert not any(token.encode() in data for token in (*old.values(), *new.values())), path
    assert runtime.secrets_path.stat().st_mode & 0o777 == 0o600


# ---- card data ----------------------------------------------------------------------------------------


@dataclass
class Issued:
    """What the tests sent and got for card data, to look for afterwards."""

    cards: list[dict[str, Any]] = field(default_factory=list)
    id_numbers: list[str] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)  # authorization requests sent


@pytest.fixture(scope="module")
def issued(runtime: LocalRuntime) -> Issued:
    """Customers in every cell, their cards used at the point of sale and online (a wrong CVV2 too),
    one card replaced: card data in every table that can hold some."""
    found = Issued()
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        for _ in range(3):
            for opened in customers_in_each_cell(client).values():
                found.cards.append(opened)
        for opened in found.cards:
            for channel, cvv2 in (("pos", None), ("online", opened["cvv2"]), ("online", wrong_cvv2(opened))):
                body = authorization_body(opened, channel, cvv2)
                answer = client.post("/v1/authorizations", json=body)
                assert answer.status_code == 200, answer.text
                found.bodies.append(body)
        replaced = client.post(f"/v1/cards/{found.cards[0]['card_id']}/replace").json()
        found.cards.append({**found.cards[0], "pan": replaced["pan"], "cvv2": replaced["cvv2"]})
    found.id_numbers = [c["id_number"] for c in found.cards if "id_number" in c]
    return found


def wrong_cvv2(card: dict[str, Any]) -> str:
    return f"{(int(card['cvv2']) + 1) % 1000:03d}"


def authorization_body(card: dict[str, Any], channel: str, cvv2: str | None) -> dict[str, Any]:
    body = {
        "idempotency_key": uuid.uuid4().hex,
        "pan": card["pan"],
        "expiry": card["expiry"],
        "amount": 1_000,
        "currency": "CNY",
        "mcc": "5411",
        "merchant_id": "M-SCAN",
        "channel": channel,
        "kind": "purchase",
    }
    if cvv2 is not None:
        body["cvv2"] = cvv2
    return body


def key_versions(runtime: LocalRuntime, client: httpx.Client) -> dict[int, dict[str, Any]]:
    return {cell: client.get(f"/v1/admin/keys?cell={cell}").json() for cell in runtime.topology.cell_numbers}


@pytest.mark.timeout(420)
def test_rotating_the_keys_rewraps_every_card_while_cards_keep_paying(
    runtime: LocalRuntime, issued: Issued
) -> None:
    cards = [
        c for c in issued.cards if c["card_id"] != issued.cards[0]["card_id"]
    ]  # the replaced one is closed
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        before = key_versions(runtime, client)
        assert all(view["current"] == 1 and view["remaining"]["cards"] == 0 for view in before.values()), (
            before
        )
        # online payments all through the rotation: found by either token, CVV2 unchanged
        answers: list[str] = []
        stopping = threading.Event()

        def pay() -> None:
            with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as payer:
                while not stopping.is_set():
                    for card in cards:
                        body = authorization_body(card, "online", card["cvv2"])
                        answers.append(payer.post("/v1/authorizations", json=body).json()["response_code"])

        payer = threading.Thread(target=pay, daemon=True)
        payer.start()
        try:
            checked = runner.run("rotate-keys", {}, runtime.run_dir, check=True)
            assert checked["rc"] == 0 and key_versions(runtime, client)[1]["current"] == 1, checked
            summary = runner.run("rotate-keys", {}, runtime.run_dir)
            time.sleep(1)
        finally:
            stopping.set()
            payer.join(timeout=30)
        assert summary["rc"] == 0 and summary["changed"] == 1, summary
        print(f"rotate-keys: {summary['steps'][-1]['msg']} in {summary['steps'][-1]['seconds']} s")
        assert answers and set(answers) == {"00"}, sorted(set(answers))
        after = key_versions(runtime, client)
        for cell, view in after.items():
            assert view["current"] == 2 and view["remaining"] == {"cards": 0, "customers": 0}, (cell, view)
            assert set(view["rows_by_version"]["cards"]) == {"2"}, view
            assert set(view["rows_by_version"]["customers"]) == {"2"}, view
        # a returning applicant is still recognised (national id hashed again under the new key)
        again = client.post(
            "/v1/applications",
            json={
                "applicant": {
                    "name": "张三",
                    "id_number": issued.cards[1]["id_number"],
                    "mobile": "13800138000",
                    "birth_date": "1990-01-01",
                    "annual_income": 30_000_000,
                }
            },
        ).json()
        assert again["decision"] == "declined" and "already holds" in again["reasons"][0], again


@pytest.mark.timeout(600)
def test_no_table_or_file_of_the_topology_holds_a_pan_or_an_unkeyed_hash_of_card_data(
    runtime: LocalRuntime, issued: Issued, tmp_path: Path
) -> None:
    """Finding 1: every PAN issued, and every unkeyed hash it could be found again from (of the PAN,
    of an authorization request carrying it, of a national id), looked for in every row of every
    table of every cell and in every file the topology wrote (data directories and WAL of every
    member, logs, configuration, runbook artifacts) and in every server's /metrics."""
    secrets = json.loads(runtime.secrets_path.read_text())
    wanted: dict[bytes, str] = {}
    for card in issued.cards:
        pan = card["pan"]
        wanted[pan.encode()] = f"PAN {pan[:6]}…"
        digest = hashlib.sha256(pan.encode()).digest()
        wanted[digest] = "unkeyed SHA-256 of a PAN"
        wanted[digest.hex().encode()] = "unkeyed SHA-256 of a PAN (hex)"
    for number in issued.id_numbers:
        wanted[number.encode()] = "a national id in clear"
        for raw in (b"id:" + number.upper().encode(), number.upper().encode()):
            digest = hashlib.sha256(raw).digest()
            wanted[digest] = "unkeyed SHA-256 of a national id"
            wanted[digest.hex().encode()] = "unkeyed SHA-256 of a national id (hex)"
    for body in issued.bodies:
        for digest in unkeyed_request_digests(body):
            wanted[digest] = "unkeyed SHA-256 of an authorization request"
            wanted[digest.hex().encode()] = "unkeyed SHA-256 of an authorization request (hex)"
    assert len(wanted) > 50

    found: list[str] = []
    password = secrets[render.SECRET_SUPERUSER_PASSWORD]
    for cell in runtime.topology.cell_numbers:
        for row in table_rows(runtime, cell, password):
            found += [f"cell {cell} {row[:30]}: {what}" for needle, what in wanted.items() if needle in row]
    files = [
        path
        for path in runtime.run_dir.rglob("*")
        # the secrets file holds keys and tokens, no card data; load/ is a load generator's
        # population (the acquirer's side: it holds the cards it pays with)
        if path.is_file()
        and path != runtime.secrets_path
        and path.relative_to(runtime.run_dir).parts[0] != "load"
    ]
    for path in files_holding_any(files, list(wanted), tmp_path):
        data = path.read_bytes()
        found += [f"{path}: {what}" for needle, what in wanted.items() if needle in data]
    for component in runtime.components:
        if (
            component.kind in ("app", "gateway", "entry")
            and runtime.running(component)
            and component.ready_url
        ):
            metrics = httpx.get(component.ready_url.rsplit("/", 1)[0] + "/metrics", timeout=10).content
            found += [
                f"{component.name} /metrics: {what}" for needle, what in wanted.items() if needle in metrics
            ]
    assert len(files) > 100
    assert not found, "\n".join(found[:20])


def files_holding_any(files: list[Path], needles: list[bytes], tmp_path: Path) -> list[Path]:
    """The files in which any needle may be (grep -F over them all at once: the data and WAL of
    every member are too much for one Python search per needle); each needle by its longest run
    without a line break or NUL, so a binary digest is a pattern grep can take."""
    patterns = []
    for needle in needles:
        runs = [run for run in re.split(rb"[\n\r\x00]", needle) if run]
        patterns.append(max(runs, key=len))
    assert all(len(pattern) >= 6 for pattern in patterns), "a needle too short to look for"
    pattern_file = tmp_path / "needles"
    pattern_file.write_bytes(b"\n".join(patterns) + b"\n")
    listed = tmp_path / "files"
    listed.write_bytes(b"\0".join(str(path).encode() for path in files))
    result = subprocess.run(
        ["xargs", "-0", "grep", "-l", "-a", "-F", "-f", str(pattern_file), "--"],
        stdin=listed.open("rb"), capture_output=True, timeout=600, check=False,
        # bytes, not characters: in a UTF-8 locale grep takes minutes over binary patterns
        env={**os.environ, "LC_ALL": "C"},
    )  # fmt: skip
    assert result.returncode in (0, 1, 123), result.stderr[-2000:]  # 123: some file matched nothing
    return [Path(line.decode()) for line in result.stdout.splitlines() if line]


def unkeyed_request_digests(body: dict[str, Any]) -> list[bytes]:
    """The idempotency digest the first release kept (SHA-256 of the operation, its path id and the
    request as the core encodes it), for the request layouts it and this release decode."""
    from cardcore.authorization.ops import AuthorizationRequest

    class FirstReleaseRequest(msgspec.Struct):
        idempotency_key: str
        pan: str
        expiry: str
        amount: int
        mcc: str
        merchant_id: str
        channel: str
        kind: str = "purchase"
        currency: str = "CNY"

    fields = {k: v for k, v in body.items() if k != "cvv2"}
    encoded = [
        msgspec.json.encode(msgspec.convert(body, AuthorizationRequest)),
        msgspec.json.encode(msgspec.convert(fields, FirstReleaseRequest)),
    ]
    return [hashlib.sha256(b"authorize\0\0" + data).digest() for data in encoded]


def table_rows(runtime: LocalRuntime, cell: int, password: str) -> list[bytes]:
    """Every row of every table of the cell's primary, as PostgreSQL prints it (bytea as hex)."""
    import psycopg

    leader = runtime.cell_view(cell)["leader_site"]
    assert leader is not None
    with psycopg.connect(
        host=runtime.topology.address(leader),
        port=runtime.topology.postgres_port(cell),
        user="postgres",
        password=password,
        dbname=render.DATABASE,
        connect_timeout=10,
        autocommit=True,
    ) as conn:
        tables = [
            r[0]
            for r in conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = 'public'").fetchall()
        ]
        rows: list[bytes] = []
        for table in tables:
            for (text,) in conn.execute(f'SELECT t::text FROM "{table}" t').fetchall():
                rows.append(text.encode())
                rows.append(text.replace("\\x", "").encode())  # bytea hex without its prefix
    assert len(tables) >= 15
    return rows


@pytest.mark.timeout(420)
def test_activate_dr_after_losing_both_centers_serves_every_cell_from_dr(
    runtime: LocalRuntime, accounts: dict[int, str], tmp_path: Path
) -> None:
    ack_log = tmp_path / "ack.jsonl"
    checked = runner.run("activate-dr", {}, runtime.run_dir, check=True)
    assert checked["rc"] == 0, checked
    assert runtime.fenced_sites == [] and not runtime.dr_active
    # an ack log that is not there stops the run before it fences anything
    bad = runner.run("activate-dr", {"ack_log": str(tmp_path / "none.jsonl")}, runtime.run_dir)
    assert bad["rc"] != 0 and "does not exist" in str(bad["error"]), bad
    reread = LocalRuntime(runtime.run_dir)
    assert reread.fenced_sites == [] and not reread.dr_active and reread.pids(site="prod")

    with Writers(runtime.topology.entry_url, accounts, ack_log=ack_log) as writers:
        time.sleep(2)
        lost_at = time.time()
        runtime.kill(site="prod")
        runtime.kill(site="samecity")
        summary = runner.run("activate-dr", {"ack_log": str(ack_log)}, runtime.run_dir)
        time.sleep(3)  # writes go on, now on dr
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    print(f"activate-dr took {summary['seconds']} s: " + "; ".join(s["msg"] for s in summary["steps"]))

    reloaded = LocalRuntime(runtime.run_dir)
    assert reloaded.dr_active and reloaded.fenced_sites == ["prod", "samecity"]
    assert reloaded.pids(site="prod") == [] and reloaded.pids(site="samecity") == []
    for cell in runtime.topology.cell_numbers:
        dr_copy = reloaded.cell_view(cell)["dr_copy"]
        assert dr_copy["role"] == "leader" and dr_copy["state"] == "running", dr_copy
        served_after = [t for t, c, ok in writers.timeline if c == cell and ok and t > lost_at]
        assert served_after, f"cell {cell} never served again after the loss"

    # the RPO the runbook reported is the one the ledgers show
    (rpo_step,) = [s for s in summary["steps"] if s["task"].startswith("Count acknowledged")]
    reported = rpo_step["result"]["rpo"]
    with httpx.Client(base_url=runtime.topology.entry_url, timeout=10.0) as client:
        found = set().union(*(ledger_transactions(client, account) for account in accounts.values()))
    at_the_end = verdicts.rpo(writers.acked, found)
    assert reported["acknowledged"] <= at_the_end["acknowledged"]
    assert reported["missing"] <= at_the_end["missing"]  # acked after the runbook counted are on dr
    print(f"activate-dr RPO: {reported}")

    # the kubernetes target counts the same RPO from the keys psql lists in each cell's dr member:
    # its tasks, templated by Ansible with this topology's dr addresses, against the same ledgers
    counted_here = ops.rpo_of_ack_log(str(runtime.run_dir), str(ack_log))["rpo"]
    listed = keys_listed_as_on_kubernetes(runtime, ack_log)
    assert len(listed) >= counted_here["acknowledged"] - counted_here["missing"] > 0
    counted_there = ops.rpo_of_ack_log(str(runtime.run_dir), str(ack_log), found_keys=listed)["rpo"]
    assert counted_there == counted_here

    again = runner.run("activate-dr", {}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again
    # a plain `up` keeps the fenced centers down and dr serving
    assert reloaded.up()["started"] == []
    assert reloaded.pids(site="prod") == []


@pytest.mark.timeout(600)
def test_failback_brings_the_centers_back_spread_as_before_and_loses_nothing_dr_acknowledged(
    runtime: LocalRuntime, accounts: dict[int, str]
) -> None:
    assert LocalRuntime(runtime.run_dir).dr_active, "runs after the activate-dr test"
    checked = runner.run("failback", {}, runtime.run_dir, check=True)
    assert checked["rc"] == 0, checked
    assert LocalRuntime(runtime.run_dir).dr_active  # check mode changed nothing

    with Writers(runtime.topology.entry_url, accounts) as writers:
        time.sleep(2)
        summary = runner.run("failback", {}, runtime.run_dir)
        time.sleep(3)  # writes go on, on the centers again
    assert summary["rc"] == 0 and summary["status"] == "successful", summary
    print(f"failback took {summary['seconds']} s: " + "; ".join(s["msg"] for s in summary["steps"]))

    after = LocalRuntime(runtime.run_dir)
    assert not after.dr_active and after.fenced_sites == []
    for cell in runtime.topology.cell_numbers:
        view = after.cell_view(cell)
        assert view["leader_site"] == runtime.topology.leader_site(cell), view
        assert view["sync_standby"] == runtime.topology.standby_site(cell), view
        assert view["dr_copy"]["role"] == "standby_leader", view
        last = [ok for t, c, ok in writers.timeline if c == cell][-5:]
        assert last and all(last), (
            f"cell {cell} does not serve at the end: {writers.failed[cell][-3:]}\n{serving_diagnostics(after)}"
        )
    assert not after.running(after.component("gateway-dr")) and not after.running(after.component("app-dr"))
    assert_nothing_lost(runtime, writers, accounts)

    again = runner.run("failback", {}, runtime.run_dir)
    assert again["rc"] == 0 and again["changed"] == 0, again
