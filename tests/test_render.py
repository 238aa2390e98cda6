"""The renderers of watertight.render, without starting anything: what each component is told."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import msgspec
import pytest
import yaml
from cardcore.gateway.settings import parse as parse_gateway
from cardcore.platform import auth
from cardcore.platform.settings import AppSettings

from watertight import pg, render, tls, topology
from watertight.topology import Topology

PYTHON = "/opt/venv/bin/python"
RUN_DIR = Path("/tmp/wt-run")

# every address and port differs from the defaults, so a hard-coded value shows up as a failure
CUSTOM = """
name: custom
cells: 3
sites:
  prod: {role: center, address: 127.0.11.1}
  samecity: {role: center, address: 127.0.12.1}
  dr: {role: dr, address: 127.0.13.1}
leaders: {3: samecity}
entry: {address: 127.0.10.1, port: 28080}
ports:
  etcd_client: 22379
  etcd_peer: 22380
  etcd_dr_client: 22479
  etcd_dr_peer: 22480
  postgres_base: 25500
  patroni_base: 28800
  app: 28100
  app_tls: 28143
  gateway: 28000
patroni: {ttl: 30, loop_wait: 2, retry_timeout: 7, maximum_lag_on_failover: 4096}
postgres: {shared_buffers: 48MB, max_connections: 60}
app: {batch_size_max: 64, batch_wait_ms_max: 2.0, hold_ttl_seconds: 3600}
"""


@pytest.fixture
def topo() -> Topology:
    return topology.parse(CUSTOM, "custom")


@pytest.fixture
def default_topo() -> Topology:
    return topology.load(topology.DEFAULT_PATH)


API_TOKENS = {"acquirer": "tok-acquirer-1", "channel": "tok-channel-2", "operator": "tok-operator-3"}


@pytest.fixture
def secrets() -> dict[str, Any]:
    return {
        render.SECRET_PAN_KEY: "ab" * 32,
        render.SECRET_SUPERUSER_PASSWORD: "super-Secret-1",
        render.SECRET_REPLICATION_PASSWORD: "repl-Secret-2",
        render.SECRET_API_TOKENS: dict(API_TOKENS),
        render.SECRET_KEY_RING: {"current": 1, "keys": {"1": "ab" * 32}},
    }


def components(topo: Topology, secrets: dict[str, Any]) -> dict[str, render.Component]:
    return {c.name: c for c in render.render_local(topo, RUN_DIR, PYTHON, secrets)}


def patroni_of(component: render.Component) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(component.files["patroni.yml"])
    return config


def member(topo: Topology, cell: int, site: str) -> dict[str, Any]:
    endpoints = render.LocalEndpoints(topo, tls=False)  # no CA: every link in clear
    return render.patroni_config(
        topo, endpoints, cell, site, RUN_DIR / "data" / render.pg_name(cell, site), Path("/pg/bin")
    )


# ---- Patroni: the main clusters ----------------------------------------------------------------


def test_every_cell_has_a_synchronous_not_strict_cluster_over_both_centers(topo: Topology) -> None:
    for cell in topo.cell_numbers:
        configs = [member(topo, cell, site) for site in ("prod", "samecity")]
        assert {c["scope"] for c in configs} == {f"watertight-cell{cell}"}
        assert [c["name"] for c in configs] == [f"pg-cell{cell}-prod", f"pg-cell{cell}-samecity"]
        for config in configs:
            dcs = config["bootstrap"]["dcs"]
            assert dcs["synchronous_mode"] is True
            assert dcs["synchronous_mode_strict"] is False
            assert dcs["synchronous_node_count"] == 1
            assert "standby_cluster" not in dcs
            assert dcs["postgresql"]["use_pg_rewind"] is True
            # a deposed primary that cannot be rewound is copied afresh, not left down
            assert config["postgresql"]["remove_data_directory_on_rewind_failure"] is True
            assert config["postgresql"]["remove_data_directory_on_diverged_timelines"] is True
            parameters = dcs["postgresql"]["parameters"]
            assert parameters["wal_level"] == "replica"
            assert parameters["hot_standby"] == "on"
            assert parameters["wal_log_hints"] == "on"
            assert parameters["max_wal_senders"] >= 4


def test_patroni_timings_and_postgres_sizes_come_from_the_topology(topo: Topology) -> None:
    dcs = member(topo, 1, "prod")["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (30, 2, 7)
    assert dcs["maximum_lag_on_failover"] == 4096
    parameters = dcs["postgresql"]["parameters"]
    assert parameters["shared_buffers"] == "48MB"
    assert parameters["max_connections"] == 60


def test_members_listen_on_their_site_address_and_cell_ports(topo: Topology) -> None:
    for cell in topo.cell_numbers:
        for site in topo.sites:
            config = member(topo, cell, site)
            address = topo.address(site)
            assert config["postgresql"]["listen"] == f"{address}:{25500 + cell}"
            assert config["postgresql"]["connect_address"] == f"{address}:{25500 + cell}"
            assert config["restapi"]["listen"] == f"{address}:{28800 + cell}"
            assert config["restapi"]["connect_address"] == f"{address}:{28800 + cell}"
            assert config["postgresql"]["bin_dir"] == "/pg/bin"
            data = RUN_DIR / "data" / render.pg_name(cell, site)
            assert config["postgresql"]["data_dir"] == str(data / "pgdata")
            assert config["postgresql"]["parameters"]["unix_socket_directories"] == str(data)


def test_main_clusters_use_the_three_site_etcd_own_site_first(topo: Topology) -> None:
    for site in ("prod", "samecity"):
        etcd = member(topo, 1, site)["etcd3"]
        assert etcd["protocol"] == "http"
        assert etcd["hosts"][0] == f"{topo.address(site)}:22379"
        assert sorted(etcd["hosts"]) == sorted(f"{topo.address(s)}:22379" for s in topo.sites)


def test_password_auth_on_the_site_addresses(topo: Topology) -> None:
    hba = member(topo, 1, "prod")["postgresql"]["pg_hba"]
    for address in ("127.0.11.1", "127.0.12.1", "127.0.13.1", "127.0.0.1"):
        assert f"host replication replicator {address}/32 scram-sha-256" in hba
        assert f"host all all {address}/32 scram-sha-256" in hba
    assert not any(line.startswith("host") and "trust" in line for line in hba)
    assert not any("0.0.0.0" in line for line in hba)


def test_every_main_cluster_keeps_a_slot_for_its_dr_copy(topo: Topology) -> None:
    for cell in topo.cell_numbers:
        slots = member(topo, cell, "prod")["bootstrap"]["dcs"]["slots"]
        assert slots == {render.dr_slot_name(cell): {"type": "physical"}}


def test_leaders_alternate_and_start_before_their_replicas(topo: Topology, secrets: dict[str, Any]) -> None:
    found = components(topo, secrets)
    # cells 1, 2 alternate prod, samecity; cell 3 is pinned to samecity by the topology
    expected = {1: "prod", 2: "samecity", 3: "samecity"}
    for cell, leader in expected.items():
        assert topo.leader_site(cell) == leader
        other = "samecity" if leader == "prod" else "prod"
        assert found[render.pg_name(cell, leader)].stage == render.STAGE_PATRONI_LEADER
        assert found[render.pg_name(cell, other)].stage == render.STAGE_PATRONI_REPLICA


def test_default_topology_leads_cell_1_in_prod_and_cell_2_in_samecity(
    default_topo: Topology, secrets: dict[str, Any]
) -> None:
    found = components(default_topo, secrets)
    leaders = {c.cell: c.site for c in found.values() if c.stage == render.STAGE_PATRONI_LEADER}
    assert leaders == {1: "prod", 2: "samecity"}


# ---- Patroni: the dr standby clusters -----------------------------------------------------------


def test_dr_clusters_are_standby_clusters_on_the_dr_local_etcd(topo: Topology) -> None:
    for cell in topo.cell_numbers:
        config = member(topo, cell, "dr")
        assert config["scope"] == f"watertight-cell{cell}-dr"
        assert config["name"] == f"pg-cell{cell}-dr"
        assert config["etcd3"]["hosts"] == ["127.0.13.1:22479"]
        dcs = config["bootstrap"]["dcs"]
        assert dcs["synchronous_mode"] is False
        standby = dcs["standby_cluster"]
        leader, other = topo.leader_site(cell), topo.standby_site(cell)
        # libpq multi-host: the standby leader follows whichever center member is the primary
        assert standby["host"] == f"{topo.address(leader)},{topo.address(other)}"
        assert standby["port"] == 25500 + cell
        # a slot is what makes Patroni add target_session_attrs=read-write; it must be the one
        # the main cluster keeps
        assert standby["primary_slot_name"] in member(topo, cell, "prod")["bootstrap"]["dcs"]["slots"]


def test_dr_scopes_differ_from_the_main_scopes(topo: Topology) -> None:
    scopes = [member(topo, cell, site)["scope"] for cell in topo.cell_numbers for site in topo.sites]
    assert len(set(scopes)) == 2 * topo.cells


def test_patroni_config_passes_patroni_s_own_schema(topo: Topology, tmp_path: Path) -> None:
    umask = os.umask(0o022)
    os.umask(umask)
    try:
        validator = pytest.importorskip("patroni.validator")
        validator.populate_validate_params(ignore_listen_port=True)
        # as `up` renders it: over TLS, with the files in place (the schema checks they exist)
        endpoints = render.LocalEndpoints(topo)
        ca = tls.make_ca()
        server = tls.make_server(ca, [topo.address(site) for site in topo.sites])
        files = render.TlsFiles.in_dir(tmp_path / "own")
        files.ca_file.parent.mkdir(parents=True)
        for path, text in (
            (files.ca_file, ca["cert"]),
            (files.cert_file, server["cert"]),
            (files.key_file, server["key"]),
        ):
            path.write_text(text)
        for site in topo.sites:
            config = render.patroni_config(
                topo, endpoints, 1, site, tmp_path / site, pg.pg_bindir(), tls_files_at=files
            )
            assert config["restapi"]["certfile"] == str(files.cert_file)
            errors = validator.schema(config)
            # the schema also checks that etcd answers; nothing runs here
            assert [e for e in errors if "is not reachable" not in e] == [], site
    finally:
        # validating data_dir sets the process umask to PostgreSQL's 077 (patroni.file_perm) and
        # leaves it: every folder a later test makes would be closed to the postgres user
        os.umask(umask)


def test_unknown_site_or_cell_is_refused(topo: Topology) -> None:
    endpoints = render.LocalEndpoints(topo, tls=False)
    with pytest.raises(ValueError, match="site"):
        render.patroni_config(topo, endpoints, 1, "moon", RUN_DIR, Path("/pg/bin"))
    with pytest.raises(ValueError, match="cell 4"):
        render.patroni_config(topo, endpoints, 4, "prod", RUN_DIR, Path("/pg/bin"))


def test_a_socket_path_that_does_not_fit_fails_clearly(topo: Topology, secrets: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="socket path"):
        render.render_local(topo, Path("/tmp/" + "x" * 100), PYTHON, secrets)


# ---- etcd ------------------------------------------------------------------------------------------


def flags(argv: list[str]) -> dict[str, str]:
    return dict(zip(argv[1::2], argv[2::2], strict=False))


def test_etcd_one_member_per_site_in_one_cluster_of_three(topo: Topology) -> None:
    endpoints = render.LocalEndpoints(topo, tls=False)
    initial = set()
    for site in topo.sites:
        argv = render.etcd_args(topo, endpoints, site, Path(f"/d/{site}"))
        assert argv[0] == "/usr/bin/etcd"
        f = flags(argv)
        address = topo.address(site)
        assert f["--name"] == site
        assert f["--listen-client-urls"] == f["--advertise-client-urls"] == f"http://{address}:22379"
        assert f["--listen-peer-urls"] == f["--initial-advertise-peer-urls"] == f"http://{address}:22380"
        assert f["--data-dir"] == f"/d/{site}"
        initial.add(f["--initial-cluster"])
    assert initial == {
        "prod=http://127.0.11.1:22380,samecity=http://127.0.12.1:22380,dr=http://127.0.13.1:22380"
    }


def test_etcd_dr_local_is_a_separate_single_member_cluster(topo: Topology) -> None:
    endpoints = render.LocalEndpoints(topo, tls=False)
    f = flags(render.etcd_dr_args(topo, endpoints, Path("/d/dr-local")))
    assert f["--listen-client-urls"] == "http://127.0.13.1:22479"
    assert f["--initial-cluster"] == "dr-local=http://127.0.13.1:22480"
    main = flags(render.etcd_args(topo, endpoints, "dr", Path("/d/dr")))
    assert f["--initial-cluster-token"] != main["--initial-cluster-token"]


# ---- app, gateway, entry -------------------------------------------------------------------------


def test_app_dsn_lists_both_centers_read_write(topo: Topology) -> None:
    endpoints = render.LocalEndpoints(topo, tls=False)
    for site in ("prod", "samecity"):
        settings = render.app_settings(topo, endpoints, site, "cd" * 32)
        parsed = msgspec.convert(settings, AppSettings)
        parsed.cell_numbers()
        assert parsed.pan_key() == bytes.fromhex("cd" * 32)
        assert (parsed.host, parsed.port) == (topo.address(site), 28100)
        assert (parsed.batch_size_max, parsed.batch_wait_ms_max, parsed.hold_ttl_seconds) == (64, 2.0, 3600)
        assert sorted(settings["cells"]) == ["1", "2", "3"]
        for cell in topo.cell_numbers:
            cell_settings = parsed.cells[str(cell)]
            leader, other = topo.leader_site(cell), topo.standby_site(cell)
            port = 25500 + cell
            hosts = f"{topo.address(leader)}:{port},{topo.address(other)}:{port}"
            assert (
                cell_settings.dsn == f"postgresql://postgres@{hosts}/cardcore?target_session_attrs=read-write"
            )
            assert cell_settings.member_sites == {
                f"{topo.address(leader)}:{port}": leader,
                f"{topo.address(other)}:{port}": other,
            }
            assert cell_settings.leader_site == leader


def test_app_at_dr_names_the_dr_members(topo: Topology) -> None:
    settings = render.app_settings(topo, render.LocalEndpoints(topo, tls=False), "dr", "cd" * 32)
    assert settings["cells"]["2"]["member_sites"] == {"127.0.13.1:25502": "dr"}


def test_gateway_upstreams_own_site_first_then_the_other_center(topo: Topology) -> None:
    endpoints = render.LocalEndpoints(topo, tls=False)
    for site, other in (("prod", "samecity"), ("samecity", "prod")):
        settings = render.gateway_settings(topo, endpoints, site)
        parsed = parse_gateway(json.dumps(settings))
        assert (parsed.site, parsed.host, parsed.port) == (site, topo.address(site), 28000)
        assert parsed.cell_upstreams() == {
            cell: [f"http://{topo.address(site)}:28100", f"http://{topo.address(other)}:28100"]
            for cell in topo.cell_numbers
        }


def test_entry_is_a_gateway_over_the_site_gateways_with_dr_last(topo: Topology) -> None:
    settings = render.entry_settings(
        topo, render.LocalEndpoints(topo, tls=False), drain_file="/run/drained.json"
    )
    parsed = parse_gateway(json.dumps(settings))
    assert (parsed.host, parsed.port) == ("127.0.10.1", 28080)
    assert parsed.drain_file == "/run/drained.json"
    for cell, urls in parsed.cell_upstreams().items():
        assert sorted(urls[:2]) == ["http://127.0.11.1:28000", "http://127.0.12.1:28000"]
        assert urls[0] == f"http://{topo.address(topo.leader_site(cell))}:28000"
        assert urls[2] == "http://127.0.13.1:28000"  # dr's gateway runs only after activate-dr


def test_only_dr_app_server_and_gateway_wait_for_the_activation(
    default_topo: Topology, secrets: dict[str, Any]
) -> None:
    listed = render.render_local(default_topo, RUN_DIR, PYTHON, secrets)
    assert {c.name for c in listed if c.on_dr_activation} == {"app-dr", "gateway-dr"}
    gateways = [c for c in listed if c.kind in ("gateway", "entry")]
    for component in gateways:
        settings = json.loads(next(iter(component.files.values())))
        assert settings["drain_file"] == str(render.drain_file(RUN_DIR.absolute())), component.name


# ---- the local set ---------------------------------------------------------------------------------


def test_names_are_unique_and_the_set_is_complete(default_topo: Topology, secrets: dict[str, Any]) -> None:
    listed = render.render_local(default_topo, RUN_DIR, PYTHON, secrets)
    names = [c.name for c in listed]
    assert len(names) == len(set(names))
    assert set(names) == {
        "etcd-prod",
        "etcd-samecity",
        "etcd-dr",
        "etcd-dr-local",
        "pg-cell1-prod",
        "pg-cell1-samecity",
        "pg-cell1-dr",
        "pg-cell2-prod",
        "pg-cell2-samecity",
        "pg-cell2-dr",
        "app-prod",
        "app-samecity",
        "app-dr",
        "gateway-prod",
        "gateway-samecity",
        "gateway-dr",
        "entry",
    }
    assert {c.kind for c in listed} <= set(render.KINDS)


def test_stages_are_ordered_by_kind(default_topo: Topology, secrets: dict[str, Any]) -> None:
    listed = render.render_local(default_topo, RUN_DIR, PYTHON, secrets)
    stages = [c.stage for c in listed]
    assert stages == sorted(stages)
    by_kind: dict[str, set[int]] = {}
    for c in listed:
        key = c.kind if c.kind != "patroni" else ("patroni-dr" if c.site == "dr" else "patroni")
        by_kind.setdefault(key, set()).add(c.stage)
    assert by_kind == {
        "etcd": {1},
        "etcd-dr": {1},
        "patroni": {2, 3},
        "patroni-dr": {4},
        "app": {5},
        "gateway": {6},
        "entry": {7},
    }


def test_components_carry_how_to_start_them(default_topo: Topology, secrets: dict[str, Any]) -> None:
    for c in render.render_local(default_topo, RUN_DIR, PYTHON, secrets):
        assert Path(c.argv[0]).is_absolute()
        assert c.ready_url and c.ready_url.startswith("http://")
        assert c.service_user == (c.kind == "patroni")
        assert (c.site is None) == (c.kind == "entry")
        assert (c.cell is not None) == (c.kind == "patroni")
        for relative in c.files:
            assert not Path(relative).is_absolute()
            # the program reads its file from the component's own directory (the tokens file and
            # the key ring through its settings file, which names them relative to itself)
            if relative not in (render.API_TOKENS_FILE, render.KEY_RING_FILE):
                assert str(render.component_dir(RUN_DIR, c.name) / relative) in c.argv
        if c.kind in ("app", "gateway", "entry"):
            assert c.argv[:2] == [PYTHON, "-m"]
            (settings,) = (
                text
                for name, text in c.files.items()
                if name not in (render.API_TOKENS_FILE, render.KEY_RING_FILE)
            )
            assert json.loads(settings)["api_tokens_file"] == render.API_TOKENS_FILE
            json.loads(c.files[render.API_TOKENS_FILE])
        if c.kind in ("etcd", "etcd-dr"):
            assert c.data_dir == render.data_dir(RUN_DIR, c.name)
            assert flags(c.argv)["--data-dir"] == str(c.data_dir)
        if c.kind == "patroni":
            # the postmaster runs detached from Patroni: the runtime finds it through its pid file
            assert c.data_dir == render.data_dir(RUN_DIR, c.name)
            assert c.detached_pid_file == Path(patroni_of(c)["postgresql"]["data_dir"]) / "postmaster.pid"
        else:
            assert c.detached_pid_file is None


def test_no_secret_in_any_argv_or_patroni_yaml(default_topo: Topology, secrets: dict[str, Any]) -> None:
    listed = render.render_local(default_topo, RUN_DIR, PYTHON, secrets)
    values = [v for v in secrets.values() if isinstance(v, str)] + list(API_TOKENS.values())
    for c in listed:
        for value in values:
            assert not any(value in arg for arg in c.argv), c.name
            if c.kind != "app":
                assert not any(value in content for content in c.files.values()), c.name
    # where they are instead: Patroni's env, the app's env and (the PAN key) its settings file
    patroni = next(c for c in listed if c.kind == "patroni")
    assert patroni.env["PATRONI_SUPERUSER_PASSWORD"] == secrets[render.SECRET_SUPERUSER_PASSWORD]
    assert patroni.env["PATRONI_REPLICATION_PASSWORD"] == secrets[render.SECRET_REPLICATION_PASSWORD]
    app = next(c for c in listed if c.kind == "app")
    assert app.env == {"PGPASSWORD": secrets[render.SECRET_SUPERUSER_PASSWORD]}
    # the keys of card data: the key ring file beside the settings, which name it
    assert json.loads(app.files["app.json"])["keys_file"] == render.KEY_RING_FILE
    assert "pan_key_hex" not in json.loads(app.files["app.json"])
    assert json.loads(app.files[render.KEY_RING_FILE]) == {"current": 1, "keys": {"1": "ab" * 32}}
    assert secrets[render.SECRET_SUPERUSER_PASSWORD] not in app.files["app.json"]
    # the servers accept the API tokens by their digests alone: no token is in any file
    for c in listed:
        if c.kind in ("app", "gateway", "entry"):
            accepted = json.loads(c.files[render.API_TOKENS_FILE])
            assert accepted == {kind: [auth.digest(token)] for kind, token in API_TOKENS.items()}, c.name
            settings = next(
                json.loads(text) for name, text in c.files.items() if name != render.API_TOKENS_FILE
            )
            assert settings["api_tokens_file"] == render.API_TOKENS_FILE


def test_during_a_rotation_the_servers_accept_the_previous_tokens_too(
    default_topo: Topology, secrets: dict[str, Any]
) -> None:
    previous = {kind: f"old-{kind}" for kind in API_TOKENS}
    listed = render.render_local(
        default_topo, RUN_DIR, PYTHON, {**secrets, render.SECRET_API_TOKENS_PREVIOUS: previous}
    )
    gateway = next(c for c in listed if c.kind == "gateway")
    accepted = json.loads(gateway.files[render.API_TOKENS_FILE])
    assert accepted == {
        kind: [auth.digest(API_TOKENS[kind]), auth.digest(previous[kind])] for kind in API_TOKENS
    }


def test_missing_secrets_fail_by_name_without_values(default_topo: Topology) -> None:
    with pytest.raises(ValueError, match="replication_password") as caught:
        render.render_local(
            default_topo,
            RUN_DIR,
            PYTHON,
            {
                render.SECRET_PAN_KEY: "ab" * 32,
                render.SECRET_SUPERUSER_PASSWORD: "pw-xyz",
                render.SECRET_API_TOKENS: dict(API_TOKENS),
                render.SECRET_KEY_RING: {"current": 1, "keys": {"1": "ab" * 32}},
            },
        )
    assert "pw-xyz" not in str(caught.value)


def test_generated_secrets_are_complete_and_fresh() -> None:
    first, second = render.generate_secrets(), render.generate_secrets()
    assert set(first) == set(render.REQUIRED_SECRETS)
    assert len(bytes.fromhex(first[render.SECRET_PAN_KEY])) == 32
    assert all(first[key] != second[key] for key in first)
    assert set(first[render.SECRET_API_TOKENS]) == {"acquirer", "channel", "operator"}
    tokens = list(first[render.SECRET_API_TOKENS].values()) + list(second[render.SECRET_API_TOKENS].values())
    assert len(set(tokens)) == 6 and all(len(token) >= 40 for token in tokens)
    # the key ring starts from the PAN key (version 1), so data written under it stays readable
    assert first[render.SECRET_KEY_RING] == {"current": 1, "keys": {"1": first[render.SECRET_PAN_KEY]}}


def test_a_run_of_before_key_rings_keeps_its_pan_key_as_version_1() -> None:
    old = {render.SECRET_PAN_KEY: "cd" * 32, render.SECRET_SUPERUSER_PASSWORD: "pw"}
    completed = render.complete_secrets(old)
    assert completed[render.SECRET_KEY_RING] == {"current": 1, "keys": {"1": "cd" * 32}}
    assert completed[render.SECRET_SUPERUSER_PASSWORD] == "pw" and set(completed) == set(
        render.REQUIRED_SECRETS
    )


def test_patroni_component_runs_patroni_on_its_yaml_under_the_member_guard(
    default_topo: Topology, secrets: dict[str, Any]
) -> None:
    found = components(default_topo, secrets)
    c = found["pg-cell2-samecity"]
    own = RUN_DIR / "components" / "pg-cell2-samecity"
    pid_file = RUN_DIR / "data" / "pg-cell2-samecity" / "pgdata" / "postmaster.pid"
    assert c.argv == [
        PYTHON, "-m", "watertight.runtime.guard", "--watchdog", str(own / "watchdog"),
        "--pid-file", str(pid_file), "--",
        PYTHON, "-m", "patroni", str(own / "patroni.yml"),
    ]  # fmt: skip
    assert c.detached_pid_file == pid_file
    # Patroni's watchdog writes to the guard's pipe, required: a leader whose Patroni froze is
    # fenced at ttl // 2, before its leader key can run out
    assert patroni_of(c)["watchdog"] == {
        "mode": "required",
        "driver": "testing",
        "device": str(own / "watchdog"),
        "safety_margin": -1,
    }
    assert c.listens == (("127.0.2.1", 15502), ("127.0.2.1", 18802))
    assert c.ready_url == "http://127.0.2.1:18802/readiness"
    config = patroni_of(c)
    assert config["postgresql"]["bin_dir"] == str(pg.pg_bindir())
    assert config["postgresql"]["data_dir"] == str(RUN_DIR / "data" / "pg-cell2-samecity" / "pgdata")


# ---- TLS between sites (issue 16) ----------------------------------------------------------------


def test_with_a_ca_in_the_secrets_postgresql_serves_tls_only_and_every_client_verifies_it(
    topo: Topology, secrets: dict[str, Any]
) -> None:
    addresses = [topo.address(site) for site in topo.sites]
    with_tls = render.complete_secrets(secrets, addresses)
    found = components(topo, with_tls)
    member = found["pg-cell1-prod"]
    own = render.component_dir(RUN_DIR, "pg-cell1-prod")
    assert member.files[render.TLS_KEY_FILE] == with_tls[render.SECRET_TLS_SERVER]["key"]
    assert member.files[render.TLS_CA_FILE] == with_tls[render.SECRET_TLS_CA]["cert"]
    config = yaml.safe_load(member.files["patroni.yml"])
    postgresql = config["postgresql"]
    assert postgresql["parameters"]["ssl"] == "on"
    assert postgresql["parameters"]["ssl_key_file"] == str(own / render.TLS_KEY_FILE)
    network_lines = [line for line in postgresql["pg_hba"] if not line.startswith("local ")]
    assert network_lines and all(line.startswith("hostssl ") for line in network_lines), network_lines
    for role in ("superuser", "replication"):  # replication, pg_rewind, basebackup
        assert postgresql["authentication"][role]["sslmode"] == "verify-full"
        assert postgresql["authentication"][role]["sslrootcert"] == str(own / render.TLS_CA_FILE)
    # etcd: clients verify the members, peers verify each other both ways; Patroni verifies it
    assert config["etcd3"]["protocol"] == "https"
    assert config["etcd3"]["cacert"] == str(own / render.TLS_CA_FILE)
    # etcd admits no client without a certificate the CA signed: Patroni presents the run's
    assert config["etcd3"]["cert"] == str(own / render.TLS_CERT_FILE)
    assert config["etcd3"]["key"] == str(own / render.TLS_KEY_FILE)
    for name in ("etcd-prod", "etcd-dr-local"):
        etcd = found[name]
        argv = etcd.argv
        etcd_own = render.component_dir(RUN_DIR, name)
        assert argv[argv.index("--peer-trusted-ca-file") + 1] == str(etcd_own / render.TLS_CA_FILE)
        assert argv[argv.index("--cert-file") + 1] == str(etcd_own / render.TLS_CERT_FILE)
        assert "--peer-client-cert-auth" in argv and "--client-cert-auth" in argv
        assert argv[argv.index("--trusted-ca-file") + 1] == str(etcd_own / render.TLS_CA_FILE)
        urls = [argv[argv.index(flag) + 1] for flag in ("--listen-client-urls", "--listen-peer-urls")]
        assert all(url.startswith("https://") for url in urls), urls
        assert etcd.files[render.TLS_KEY_FILE] == with_tls[render.SECRET_TLS_SERVER]["key"]
        assert etcd.ready_url is not None and etcd.ready_url.startswith("https://")
    # Patroni's REST API over TLS too; members (the leader race) and patronictl verify it
    assert config["restapi"]["certfile"] == str(own / render.TLS_CERT_FILE)
    assert config["restapi"]["keyfile"] == str(own / render.TLS_KEY_FILE)
    assert config["restapi"]["cafile"] == str(own / render.TLS_CA_FILE)
    assert "verify_client" not in config["restapi"]
    assert config["ctl"] == {"cacert": str(own / render.TLS_CA_FILE)}
    assert member.ready_url is not None and member.ready_url.startswith("https://")
    app = found["app-samecity"]
    settings = json.loads(app.files["app.json"])
    dsn = settings["cells"]["1"]["dsn"]
    ca_path = render.component_dir(RUN_DIR, "app-samecity") / render.TLS_CA_FILE
    assert dsn.endswith(f"&sslmode=verify-full&sslrootcert={ca_path}"), dsn
    # the app's leader-lock probe asks each member's Patroni over TLS, verified with the CA
    urls = [url for cell in settings["cells"].values() for url in cell["patroni_urls"].values()]
    assert urls and all(url.startswith("https://") for url in urls), urls
    assert settings["tls_ca_file"] == str(ca_path)


def test_with_a_ca_a_gateway_reaches_the_other_centers_app_server_over_tls_only(
    topo: Topology, secrets: dict[str, Any]
) -> None:
    """PANs cross sites in the gateway's requests: to the other center's app server they go to its
    TLS listener, verified with the CA (the gateway holds the CA's certificate, no key); to its own
    site's app server they stay in clear."""
    with_tls = render.complete_secrets(secrets, [topo.address(site) for site in topo.sites])
    found = components(topo, with_tls)
    for site, other in (("prod", "samecity"), ("samecity", "prod")):
        app = found[f"app-{site}"]
        settings = json.loads(app.files["app.json"])
        assert settings["tls"] == {
            "port": 28143,
            "cert_file": render.TLS_CERT_FILE,
            "key_file": render.TLS_KEY_FILE,
        }
        assert app.files[render.TLS_KEY_FILE] == with_tls[render.SECRET_TLS_SERVER]["key"]
        assert (topo.address(site), 28143) in app.listens
        gateway = found[f"gateway-{site}"]
        assert render.TLS_KEY_FILE not in gateway.files  # clients get the CA's certificate only
        assert gateway.files[render.TLS_CA_FILE] == with_tls[render.SECRET_TLS_CA]["cert"]
        config = json.loads(gateway.files["gateway.json"])
        assert config["tls_ca_file"] == render.TLS_CA_FILE
        for urls in config["upstreams"].values():
            assert urls == [f"http://{topo.address(site)}:28100", f"https://{topo.address(other)}:28143"]
    # without a CA, as before: every hop in clear
    plain = json.loads(components(topo, secrets)["gateway-prod"].files["gateway.json"])
    assert "tls_ca_file" not in plain
    assert all(url.startswith("http://") for urls in plain["upstreams"].values() for url in urls)


def test_without_a_ca_postgresql_serves_in_clear_as_before(topo: Topology, secrets: dict[str, Any]) -> None:
    found = components(topo, secrets)
    config = yaml.safe_load(found["pg-cell1-prod"].files["patroni.yml"])
    assert "ssl" not in config["postgresql"]["parameters"]
    assert "sslmode" not in config["postgresql"]["authentication"]["replication"]
    assert "certfile" not in config["restapi"] and "ctl" not in config
    assert config["etcd3"]["protocol"] == "http" and "cacert" not in config["etcd3"]
    assert "--cert-file" not in found["etcd-prod"].argv
    settings = json.loads(found["app-prod"].files["app.json"])
    assert all(url.startswith("http://") for url in settings["cells"]["1"]["patroni_urls"].values())
    assert "tls_ca_file" not in settings
