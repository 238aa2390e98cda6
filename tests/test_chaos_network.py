"""Partition and latency between sites, for real, in a private network namespace: nftables with
cgroup v2 matching cuts new and existing connections of one site and heals them; the NFQUEUE
delayer adds the delay to the chosen pair of sites only and goes away with its rules."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from watertight.chaos import network

SCENARIO = Path(__file__).with_name("netns_network_scenario.py")


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("nft", "iptables", "unshare", "ip"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


@pytest.mark.timeout(120)
def test_partition_and_latency_between_sites_in_a_private_network_namespace() -> None:
    missing = _usable()
    if missing:
        pytest.skip(missing)
    result = subprocess.run(
        ["unshare", "--net", sys.executable, str(SCENARIO)],
        capture_output=True,
        text=True,
        timeout=100,
        cwd=SCENARIO.parent.parent,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 failed" in result.stdout


def test_the_table_is_rendered_per_run_with_cgroup_and_tuple_rules(tmp_path: Path) -> None:
    net = network.SiteNetwork(tmp_path, {"prod": "127.0.1.1", "samecity": "127.0.2.1", "dr": "127.0.3.1"})
    state = {
        "partition": {
            "site": "prod",
            "pairs": [sorted(p) for p in network.pairs_for_partition(net, "prod")],
            "existing": [["127.0.0.1", 40000, "127.0.2.1", 12380], ["127.0.2.1", 12380, "127.0.0.1", 40000]],
        }
    }
    text = network.render_table(net, state, Path("/sys/fs/cgroup/unified"))
    name = network.table_name(tmp_path)
    assert text.startswith(f"add table inet {name}\ndelete table inet {name}\n")
    assert "127.0.0.1 . 40000 . 127.0.2.1 . 12380" in text
    rid = network.run_id(tmp_path)
    assert (
        f'socket cgroupv2 level 3 "unified/watertight/{rid}/prod" ip daddr {{ 127.0.2.1, 127.0.3.1 }} drop'
        in text
    )
    assert f'socket cgroupv2 level 3 "unified/watertight/{rid}/dr" ip daddr {{ 127.0.1.1 }} drop' in text
    assert "samecity" in text and "queue" not in text


def test_existing_connections_are_crossing_only_between_sites_of_a_pair() -> None:
    sockets = {
        1: ("127.0.0.1", 40000, "127.0.2.1", 12380),  # prod -> samecity etcd
        2: ("127.0.2.1", 12380, "127.0.0.1", 40000),
        3: ("127.0.0.1", 40001, "127.0.1.1", 18000),  # entry -> prod gateway
        4: ("127.0.1.1", 18000, "127.0.0.1", 40001),
        5: ("127.0.0.1", 40002, "127.0.1.1", 15501),  # prod app -> prod postgres
        6: ("127.0.1.1", 15501, "127.0.0.1", 40002),
    }
    owners = {1: "prod", 2: "samecity", 4: "prod", 5: "prod", 6: "prod"}
    pairs = {frozenset(("prod", "samecity")), frozenset(("prod", "dr"))}
    assert network.crossing_connections(sockets, owners, pairs) == {sockets[1], sockets[2]}
