"""The local three-site topology for real: etcd, Patroni and PostgreSQL per cell, app servers,
gateways and the entry as processes; the loss of the prod site under financial writes."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests import topologies
from tests.cards import customers_in_each_cell
from tests.topologies import moved
from tests.writers import Writers, ledger_transactions
from watertight import bench, pg, tls
from watertight import topology as topology_module
from watertight.chaos import network
from watertight.pg import service_tempdir
from watertight.runtime import processes
from watertight.runtime.local import LocalRuntime, http_json

RTO_S = 30.0
RSS_MAX_BYTES = (
    2.5 * 1024**3
)  # 2 GiB of the sites and ~0.3 GiB of monitoring (Prometheus, Alertmanager, 6 exporters)

# its own addresses and ports, so a developer's running topology is left alone
TEST_TOPOLOGY = moved(20, 2)


@pytest.fixture(scope="module")
def runtime() -> Iterator[LocalRuntime]:
    run_dir = service_tempdir("watertight-topology-")
    run_dir.chmod(0o755)
    topology = topology_module.parse(TEST_TOPOLOGY, "test topology")
    local = LocalRuntime(run_dir, topology, TEST_TOPOLOGY)
    try:
        started = time.monotonic()
        result = local.up(progress=print)
        local.up_seconds = time.monotonic() - started  # type: ignore[attr-defined]
        assert set(result["started"]) == {c.name for c in local.components if not c.on_dr_activation}
        yield local
    finally:
        local.down(purge=True)


def test_up_brings_every_cell_a_leader_and_a_sync_standby_in_the_other_center(runtime: LocalRuntime) -> None:
    # how long `up` took is printed, not asserted: a shared 2-core machine is no stopwatch (its
    # waits are bounded by the runtime's own stage timeouts, which fail it when exceeded)
    print(f"up took {runtime.up_seconds:.1f} s")  # type: ignore[attr-defined]
    status = runtime.status()
    assert all(site["up"] for site in status["sites"].values()), status["sites"]
    for cell in runtime.topology.cell_numbers:
        view = status["cells"][str(cell)]
        assert view["leader_site"] == runtime.topology.leader_site(cell)
        assert view["sync_standby"] == runtime.topology.standby_site(cell)
        assert view["dr_copy"]["role"] == "standby_leader"
        assert view["dr_copy"]["state"] == "streaming"
    assert status["entry"] == runtime.topology.entry_url
    for component in status["components"]:
        if component["name"] in ("app-dr", "gateway-dr"):  # idle until the activate-dr runbook
            assert not component["expected"] and not component["alive"], component
            continue
        assert component["alive"], component
        assert component["pid"] and component["site"] in (None, "prod", "samecity", "dr")
    assert status["sites"]["dr"]["up"] is True and status["mode"] == {
        "dr_active": False,
        "fenced_sites": [],
        "centers_follow_dr": False,
    }
    assert 0 < status["rss_total_bytes"] < RSS_MAX_BYTES


def test_postgresql_speaks_tls_only_and_every_client_verifies_it(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    """Issue 16: links between sites are encrypted. A member refuses a connection in clear; the
    app servers' sessions and replication (to the other center and to dr) run over TLS; a client
    that verifies with another CA refuses the member."""
    root_cert = runtime.root_cert()
    assert root_cert is not None and Path(root_cert).stat().st_mode & 0o777 == 0o644
    password = runtime.superuser_password()
    leader = runtime.topology.leader_site(1)
    member = next(m for m in runtime.members(1) if m.site == leader)
    with pytest.raises(psycopg.OperationalError, match=r"no pg_hba\.conf entry"):
        pg.connect_superuser(member.postgres_host, member.postgres_port, password, 2).close()
    other = tmp_path / "other-ca.crt"
    other.write_text(tls.make_ca()["cert"])
    with pytest.raises(psycopg.OperationalError, match="certificate verify failed"):
        pg.connect_superuser(member.postgres_host, member.postgres_port, password, 2, str(other)).close()
    with pg.connect_superuser(member.postgres_host, member.postgres_port, password, 2, root_cert) as conn:
        rows = conn.execute(
            "SELECT a.backend_type, a.application_name, s.ssl, s.version FROM pg_stat_activity a"
            " JOIN pg_stat_ssl s USING (pid) WHERE a.client_addr IS NOT NULL"
        ).fetchall()
    kinds = {(kind, name.split("-")[0] if kind == "client backend" else name) for kind, name, _, _ in rows}
    print(f"TCP sessions on {member.name}: {sorted(kinds)}")
    assert ("walsender", f"pg-cell1-{runtime.topology.standby_site(1)}") in kinds, rows
    assert any(kind == "walsender" and name.startswith("pg-cell1-dr") for kind, name, _, _ in rows), rows
    assert ("client backend", "cardcore") in kinds, rows
    assert all(encrypted and version == "TLSv1.3" for _, _, encrypted, version in rows), rows


def test_patronis_rest_api_speaks_tls_only_and_its_clients_verify_it(
    runtime: LocalRuntime, tmp_path: Path
) -> None:
    """Issue 16: Patroni's REST API between sites (the leader race, the app servers' leader-lock
    probe, the probes, the runbooks, Prometheus) is TLS, verified with the run's CA: in clear it
    answers nothing, another CA refuses it, and every member advertises an https:// URL."""
    root_cert = runtime.root_cert()
    member = next(m for m in runtime.members(1) if m.site == runtime.topology.leader_site(1))
    assert member.patroni_url.startswith("https://"), member.patroni_url
    status, body = http_json(member.patroni_url + "/cluster", timeout_s=5.0, ca_file=root_cert)
    assert status == 200, body
    assert all(m["api_url"].startswith("https://") for m in body["members"]), body
    clear = member.patroni_url.replace("https://", "http://")
    assert http_json(clear + "/patroni", timeout_s=2.0)[0] == 0
    other = tmp_path / "other-ca.crt"
    other.write_text(tls.make_ca()["cert"])
    assert http_json(member.patroni_url + "/patroni", timeout_s=2.0, ca_file=str(other))[0] == 0
    # the app servers serve (their leader-lock probe verifies Patroni) and Prometheus scrapes it
    assert runtime.cell_view(1)["leader_site"] == runtime.topology.leader_site(1)
    status, body = http_json(f"{runtime.topology.prometheus_url}/api/v1/targets?state=active", timeout_s=5.0)
    assert status == 200, body
    patroni = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "patroni"]
    assert patroni and all(t["scrapeUrl"].startswith("https://") for t in patroni), patroni
    deadline = time.monotonic() + 30
    while any(t["health"] != "up" for t in patroni) and time.monotonic() < deadline:
        time.sleep(1)
        body = http_json(f"{runtime.topology.prometheus_url}/api/v1/targets?state=active", timeout_s=5.0)[1]
        patroni = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "patroni"]
    assert all(t["health"] == "up" for t in patroni), [(t["scrapeUrl"], t["lastError"]) for t in patroni]


def test_etcd_speaks_tls_to_clients_and_mutual_tls_to_peers(runtime: LocalRuntime, tmp_path: Path) -> None:
    """Issue 16: the consensus between sites is encrypted. etcd answers its clients over TLS only,
    verified with the run's CA; clients and peers must present a certificate the CA signed (one
    without is refused at the handshake); Patroni reaches it (every cell has its leader), and so
    does Prometheus (every etcd target is up)."""
    root_cert = runtime.root_cert()
    assert root_cert is not None
    topology = runtime.topology
    address = topology.address("samecity")
    client_url = f"https://{address}:{topology.ports.etcd_client}"
    status, body = http_json(client_url + "/health", timeout_s=5.0, ca_file=root_cert)
    assert status == 200 and body.get("health") == "true", body
    assert http_json(f"http://{address}:{topology.ports.etcd_client}/health", timeout_s=2.0)[0] == 0
    other = tmp_path / "other-ca.crt"
    other.write_text(tls.make_ca()["cert"])
    assert http_json(client_url + "/health", timeout_s=2.0, ca_file=str(other))[0] == 0
    anonymous = ssl.create_default_context(cafile=root_cert)  # verifies the peer, presents nothing
    # a client without a certificate the CA signed is refused: it could write a cell's leader key
    with pytest.raises((urllib.error.URLError, ssl.SSLError, ConnectionResetError)):
        urllib.request.urlopen(
            client_url + "/v3/kv/range", data=b'{"key": "Lw=="}', timeout=5.0, context=anonymous
        )
    with socket.create_connection((address, topology.ports.etcd_peer), timeout=5) as raw:
        with pytest.raises((ssl.SSLError, ConnectionResetError, BrokenPipeError)):
            with anonymous.wrap_socket(raw, server_hostname=address) as wrapped:
                wrapped.sendall(b"GET /members HTTP/1.1\r\nhost: x\r\n\r\n")
                if not wrapped.recv(1):  # TLS 1.3: the refusal arrives after the handshake
                    raise ConnectionResetError("closed")
    for cell in topology.cell_numbers:
        assert runtime.cell_view(cell)["leader_site"] == topology.leader_site(cell)
    targets: list[dict[str, Any]] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        body = http_json(f"{topology.prometheus_url}/api/v1/targets?state=active", timeout_s=5.0)[1]
        targets = [t for t in body["data"]["activeTargets"] if t["labels"].get("job") == "etcd"]
        if targets and all(t["health"] == "up" for t in targets):
            break
        time.sleep(1)
    assert targets and all(t["health"] == "up" for t in targets), [
        (t["scrapeUrl"], t["lastError"]) for t in targets
    ]


def test_a_gateway_reaches_the_other_centers_app_server_over_tls_only(runtime: LocalRuntime) -> None:
    """Issue 16: PANs cross sites in a gateway's requests. prod's gateway sends a cell that
    samecity leads to samecity's app server, over TLS 1.3 (its TLS listener, verified with the
    run's CA): every connection prod's gateway holds to samecity goes to that port; to its own
    site's app server it stays in clear."""
    topology = runtime.topology
    led_by_samecity = next(c for c in topology.cell_numbers if topology.leader_site(c) == "samecity")
    client = httpx.Client(base_url=topology.entry_url, timeout=10.0)
    card_id = customers_in_each_cell(client)[led_by_samecity]["card_id"]
    through_prod = httpx.Client(base_url=topology.gateway_url("prod"), timeout=10.0)
    for _ in range(5):
        response = through_prod.get(f"/v1/cards/{card_id}")
        assert response.status_code == 200, response.text
    gateway = runtime.records["gateway-prod"].pid
    owners = network.socket_owners({"prod": [gateway]})
    remotes = {(t[2], t[3]) for inode, t in network.tcp_sockets().items() if inode in owners}
    samecity, prod = topology.address("samecity"), topology.address("prod")
    assert {port for address, port in remotes if address == samecity} == {topology.ports.app_tls}, remotes
    assert (prod, topology.ports.app) in remotes, remotes
    with pytest.raises(httpx.HTTPError):  # the TLS port answers nothing in clear
        httpx.get(f"http://{samecity}:{topology.ports.app_tls}/healthz", timeout=2.0)


def cgroup_of(pid: int) -> str:
    """The cgroup v2 path of a process (its "0::" line)."""
    lines = Path(f"/proc/{pid}/cgroup").read_text().splitlines()
    return next(line.removeprefix("0::") for line in lines if line.startswith("0::"))


def test_every_process_starts_in_its_components_cgroup_inside_its_sites(runtime: LocalRuntime) -> None:
    """So a network fault covers a process started while it is in force (placed at spawn; the
    partition's own placement at fault time then only confirms it), and every process a component
    ever starts can be found and killed with it, even one reparented to init."""
    try:
        network.site_cgroup(runtime.run_dir, "prod")
    except network.NetworkFaultError as error:
        pytest.fail(f"no usable cgroup v2 hierarchy here: {error}")
    if os.geteuid() != 0:
        assert all(cgroup_of(r.pid) == cgroup_of(os.getpid()) for r in runtime.records.values())
        return
    for component in runtime.components:
        record = runtime.records.get(component.name)
        if record is None or not processes.alive(record):
            continue
        where = cgroup_of(record.pid)
        expected = network.component_cgroup(runtime.run_dir, component.site, component.name)
        assert where == "/" + str(expected.relative_to(network.cgroup2_mount())), (component.name, where)
        if component.site is not None:
            site = network.site_cgroup(runtime.run_dir, component.site).directory
            assert expected.parent == site, (component.name, expected)
        for pid in runtime.component_pids(component):  # Patroni, PostgreSQL: born inside it
            assert cgroup_of(pid) == where, (component.name, pid, cgroup_of(pid))


def test_up_again_changes_nothing(runtime: LocalRuntime) -> None:
    before = {name: record.pid for name, record in runtime.records.items()}
    result = runtime.up()
    assert result["started"] == []
    assert {name: record.pid for name, record in runtime.records.items()} == before


def test_status_and_up_on_the_command_line(runtime: LocalRuntime) -> None:
    env = {**os.environ, "WATERTIGHT_RUN_DIR": str(runtime.run_dir)}
    shown = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "status"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    assert "cell-1" in shown.stdout and "total RSS" in shown.stdout
    as_json = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "status", "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    )
    topology = runtime.topology  # the entry and monitoring at 127.0.20.1 (tests.topologies.moved)
    assert topology.entry_url.endswith(".20.1:28080") and topology.prometheus_url.endswith(".20.1:28090")
    assert f'"entry": "{topology.entry_url}"' in as_json.stdout
    assert f'"prometheus": "{topology.prometheus_url}"' in as_json.stdout
    assert f'"alertmanager": "{topology.alertmanager_url}"' in as_json.stdout
    assert "monitoring: Prometheus" in shown.stdout and "targets up" in shown.stdout


def test_up_starts_prometheus_and_alertmanager_with_every_target_up(runtime: LocalRuntime) -> None:
    status = runtime.status()
    monitoring = status["monitoring"]
    net = topologies.test_net()
    assert monitoring["prometheus"] == f"http://127.{net}.20.1:28090"
    assert monitoring["alertmanager"] == f"http://127.{net}.20.1:28093"
    targets = monitoring["targets"]
    expected = [t for t in targets if t["expected"]]
    assert expected and all(t["health"] == "up" for t in expected), [
        t for t in expected if t["health"] != "up"
    ]
    # dr's app server and gateway idle until the activate-dr runbook: scraped, not expected
    assert {t["component"] for t in targets if not t["expected"]} == {"app-dr", "gateway-dr"}
    cells = runtime.topology.cell_numbers
    for kind, per_site in (("patroni", len(cells)), ("postgres", len(cells)), ("app", 1), ("gateway", 1)):
        for site in runtime.topology.sites:
            mine = [t for t in targets if t["kind"] == kind and t["site"] == site]
            assert len(mine) == per_site, (kind, site, mine)
            if kind in ("patroni", "postgres"):
                assert sorted(int(t["cell"]) for t in mine) == cells
    assert {t["component"] for t in targets if t["kind"] == "etcd"} == {
        "etcd-prod",
        "etcd-samecity",
        "etcd-dr",
        "etcd-dr-local",
    }
    assert [t["site"] for t in targets if t["kind"] == "entry"] == ["entry"]
    # the rules are loaded, and a healthy topology raises none of them
    rules_status, body = http_json(f"{monitoring['prometheus']}/api/v1/rules", timeout_s=5)
    assert rules_status == 200
    names = {rule["name"] for group in body["data"]["groups"] for rule in group["rules"]}
    assert {"CellLeaderMissing", "CellApprovalRatioDropping"} <= names
    alerts_status, body = http_json(f"{monitoring['alertmanager']}/api/v2/alerts?active=true", timeout_s=5)
    assert alerts_status == 200 and body == [], body
    # their data and config live in the run directory
    assert (runtime.run_dir / "data" / "prometheus").is_dir()
    assert (runtime.run_dir / "components" / "prometheus" / "rules.yml").exists()


def test_freeze_and_thaw_a_gateway(runtime: LocalRuntime) -> None:
    assert runtime.freeze(component="gateway-samecity") == ["gateway-samecity"]
    record = runtime.records["gateway-samecity"]
    try:
        assert processes.frozen(record)
        assert runtime.status()["sites"]["samecity"]["up"] is False
    finally:
        runtime.thaw(component="gateway-samecity")
    assert not processes.frozen(record)
    assert runtime.pids(component="gateway-samecity")[0] == record.pid


def test_bench_reports_cpu_per_transaction_within_sane_bounds(runtime: LocalRuntime) -> None:
    result = bench.run(
        runtime, seconds=3, rate_financial=100, rate_nonfinancial=300, customers=20, saturation_seconds=1
    )
    for name, row in (("financial", result["financial"]), ("nonfinancial", result["nonfinancial"])):
        assert sum(row["errors_by_kind"].values()) == row["errors"], row
        assert row["errors"] == 0, (name, row["errors_by_kind"], row["achieved_tps"], row["p99_ms"])
        assert row["completed"] >= 0.8 * row["offered_tps"] * 3, (name, row)
        # a transaction costs some CPU, and less than 50 ms of it even on a loaded 2-core machine
        assert 10 < row["us_per_txn"] < 50_000, (name, row)
        assert row["us_per_txn"] <= row["us_per_txn_gross"]
        assert {"app", "gateway", "postgres", "patroni"} <= set(row["us_per_txn_by_kind"]), row
        assert sum(row["us_per_txn_by_kind"].values()) == pytest.approx(row["us_per_txn"], abs=0.5)
        # the load generator and the entry (load sent to the site gateways) are apart, not counted
        assert {"loadgen", "entry"} <= set(row["us_per_txn_not_counted"]), row
        assert row["loadgen_us_per_txn"] > 0
        assert row["p50_ms"] is not None and row["p50_ms"] <= row["p99_ms"]
    assert "entry" not in result["kinds_counted"] and "loadgen" in result["kinds_not_counted"]
    assert result["processes_by_kind"]["app"] == 2 and result["processes_by_kind"]["postgres"] > 4
    expected = (10_000 * result["financial_us"] + 50_000 * result["nonfinancial_us"]) / 1e6
    assert result["cores_for_headline"] == pytest.approx(expected, abs=0.1)
    saturation = result["saturation"]
    for name in ("financial", "nonfinancial"):
        found = saturation[name]
        assert 1 <= len(found["steps"]) <= bench.SATURATION_STEPS_MAX, found
        held = [step for step in found["steps"] if step["sustained"]]
        if found["rate_tps"] is None:  # a loaded machine may hold no step at all: then none is named
            assert not held and saturation[f"{name}_us"] is None
        else:
            assert found["rate_tps"] == max(step["offered_tps"] for step in held)
            assert found["row"]["p99_ms"] <= bench.P99_MS_MAX and found["row"]["errors"] == 0
    if saturation["financial_us"] is not None and saturation["nonfinancial_us"] is not None:
        expected = (10_000 * saturation["financial_us"] + 50_000 * saturation["nonfinancial_us"]) / 1e6
        assert saturation["cores_for_headline"] == pytest.approx(expected, abs=0.1)
    assert result["machine"]["cores"] and result["machine"]["cpu"]
    shown = bench.table(result)
    assert "cores for 10,000 financial" in shown and "saturation" in shown and "not counted" in shown


def test_loss_of_the_prod_site_fails_over_within_the_rto_and_loses_nothing(runtime: LocalRuntime) -> None:
    topology = runtime.topology
    led_by_prod = [c for c in topology.cell_numbers if topology.leader_site(c) == "prod"]
    led_by_samecity = [c for c in topology.cell_numbers if topology.leader_site(c) == "samecity"]
    assert led_by_prod and led_by_samecity
    client = httpx.Client(base_url=topology.entry_url, timeout=10.0)
    accounts = {cell: opened["account_id"] for cell, opened in customers_in_each_cell(client).items()}

    with Writers(topology.entry_url, accounts) as writers:
        time.sleep(2)
        killed_at = time.monotonic()
        hit = runtime.kill(site="prod")
        assert set(hit) == {c.name for c in runtime.components if c.site == "prod"}
        assert runtime.pids(site="prod") == []
        deadline = killed_at + RTO_S
        recovered: dict[int, float] = {}
        while time.monotonic() < deadline + 10 and len(recovered) < len(led_by_prod):
            for cell in led_by_prod:
                if cell not in recovered and runtime.cell_view(cell)["leader_site"] == "samecity":
                    recovered[cell] = time.monotonic() - killed_at
            time.sleep(0.2)
        acked_before_end = {cell: len(writers.acked_ids(cell)) for cell in accounts}
        time.sleep(3)  # writes go on after the failover
    for cell in led_by_prod:
        assert cell in recovered and recovered[cell] <= RTO_S, (
            f"cell {cell} recovered after {recovered.get(cell)} s"
        )
        assert len(writers.acked_ids(cell)) > acked_before_end[cell], "no write succeeded after the failover"
    for cell in led_by_samecity:
        assert writers.failed[cell] == [], (
            f"cell {cell} (led by samecity) saw errors: {writers.failed[cell][:5]}"
        )
    for cell, account_id in accounts.items():
        missing = set(writers.acked_ids(cell)) - ledger_transactions(client, account_id)
        assert not missing, f"cell {cell}: {len(missing)} acknowledged transactions missing"

    # prod comes back: its members rejoin as replicas of the samecity leaders
    runtime.start(site="prod")
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        views = [runtime.cell_view(cell) for cell in topology.cell_numbers]
        if all(v["leader_site"] == "samecity" and v["sync_standby"] == "prod" for v in views):
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"prod did not rejoin as replicas: {views}")
    client.close()


def test_down_leaves_no_process_behind(runtime: LocalRuntime) -> None:
    records = dict(runtime.records)
    stopped = runtime.down()
    assert stopped
    assert runtime.pids() == []
    for record in records.values():
        assert not processes.alive(record)
    # nothing of the run is left in the cgroup hierarchy (the sites' cgroups were emptied)
    if os.geteuid() == 0:
        assert not (network.cgroup2_mount() / network.CGROUP_TOP / network.run_id(runtime.run_dir)).exists()
    runtime.up()  # the fixture's down --purge must still work from a running topology


@pytest.mark.parametrize(
    ("change", "named"),
    [
        (("cells: 2", "cells: many"), "cells"),
        (("address: 127.0.2.1", "address: 10.1.2.3"), "sites.samecity.address"),
        (("  app: 18100", "  app: 18000"), "ports.gateway"),
        (("ttl: 20", "ttl: 10"), "patroni.ttl"),
        (("role: dr", "role: center"), "sites.dr.role"),
        (("slo:", "slo:\n  rto_minutes: 3"), "slo"),
        (("leaders: {}", "leaders: {7: prod}"), "leaders"),
    ],
)
def test_a_bad_topology_file_fails_naming_the_key_and_starts_nothing(
    tmp_path: Path, change: tuple[str, str], named: str
) -> None:
    text = topology_module.DEFAULT_PATH.read_text()
    assert change[0] in text
    bad = tmp_path / "bad.yaml"
    bad.write_text(text.replace(change[0], change[1], 1))
    run_dir = tmp_path / "run"
    env = {**os.environ, "WATERTIGHT_RUN_DIR": str(run_dir)}
    result = subprocess.run(
        [sys.executable, "-m", "watertight.cli", "up", "--topology", str(bad)],
        capture_output=True,
        text=True,
        env=env,
    )
    assert result.returncode == 1
    assert named in result.stderr, result.stderr
    assert not run_dir.exists()
