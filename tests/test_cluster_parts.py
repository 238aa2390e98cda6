"""The pieces of `watertight cluster` that can be shown without a cluster: the agent's DNS answers,
the record of the machine and putting it back (in a network namespace of the test's own, so no
rule touches this machine's), and the local stack read as one cluster."""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import textwrap

import pytest

from watertight.cluster import agent, spec

NAME = "etcd-prod.watertight-prod.svc.cluster.local"


def query(name: str, qtype: int, ident: int = 0x1234) -> bytes:
    labels = b"".join(bytes([len(part)]) + part.encode() for part in name.split("."))
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + labels + b"\0" + struct.pack("!HH", qtype, 1)


def parsed(response: bytes) -> tuple[int, int, list[str]]:
    """(id, rcode, A addresses) of a response."""
    ident, flags, questions, answers = struct.unpack("!HHHH", response[:8])
    offset = 12
    for _ in range(questions):
        while response[offset] != 0:
            offset += 1 + response[offset]
        offset += 5
    addresses = []
    for _ in range(answers):
        rtype, _, _, length = struct.unpack("!HHIH", response[offset + 2 : offset + 12])
        if rtype == agent.TYPE_A:
            addresses.append(socket.inet_ntoa(response[offset + 12 : offset + 12 + length]))
        offset += 12 + length
    return ident, flags & 0xF, addresses


@pytest.fixture
def records() -> agent.Records:
    found = agent.Records("cluster.local")
    found.replace({NAME: ["10.96.0.17"], "db.watertight-dr.svc.cluster.local": ["10.244.0.9", "10.244.0.8"]})
    return found


def test_the_agent_answers_a_service_name_with_its_cluster_address(records: agent.Records) -> None:
    response = agent.answer(query(NAME, agent.TYPE_A), records)
    assert response is not None
    assert parsed(response) == (0x1234, agent.RCODE_NOERROR, ["10.96.0.17"])
    # case does not matter; a headless service answers every ready address
    assert parsed(agent.answer(query(NAME.upper(), agent.TYPE_A), records) or b"")[2] == ["10.96.0.17"]
    assert sorted(
        parsed(agent.answer(query("db.watertight-dr.svc.cluster.local", 1), records) or b"")[2]
    ) == [
        "10.244.0.8",
        "10.244.0.9",
    ]


def test_the_agent_says_no_such_name_for_what_the_api_did_not_give_it(records: agent.Records) -> None:
    # the search list tries these first: each must fail at once so the real name is asked next
    for name in (f"{NAME}.watertight-prod.svc.cluster.local", "etcd-prod", "pypi.org"):
        asked = query(name, agent.TYPE_A)
        response = agent.answer(asked, records) or b""
        assert parsed(response)[1] == agent.RCODE_NXDOMAIN
        # with the question it answers: glibc and Go drop an answer that does not echo theirs
        assert response[4:6] == b"\x00\x01" and response[12:] == asked[12:]
    # an IPv6 question for a known name: the name exists, without an address of that kind
    assert parsed(agent.answer(query(NAME, agent.TYPE_AAAA), records) or b"") == (
        0x1234,
        agent.RCODE_NOERROR,
        [],
    )


def test_the_agent_refuses_a_malformed_query_without_crashing(records: agent.Records) -> None:
    assert agent.answer(b"\x00\x01", records) is None
    truncated = query(NAME, agent.TYPE_A)[:20]
    assert parsed(agent.answer(truncated, records) or b"")[1] == agent.RCODE_FORMERR
    two_questions = bytearray(query(NAME, agent.TYPE_A))
    two_questions[5] = 2
    assert parsed(agent.answer(bytes(two_questions), records) or b"")[1] == agent.RCODE_FORMERR


# ---- the machine's record ----------------------------------------------------------------------

SCENARIO = textwrap.dedent(
    """
    import json, subprocess
    from pathlib import Path
    from watertight.cluster import hoststate
    prefixes = [Path("/nonexistent-watertight-test")]
    before = hoststate.record(prefixes, "watertight0")
    def sh(*argv):
        subprocess.run(argv, check=True, capture_output=True)
    # what a node does: a bridge and a veth, its chains with jumps from the built-in ones, forwarding
    sh("ip", "link", "add", "watertight0", "type", "bridge")
    sh("ip", "link", "add", "veth0test", "type", "veth", "peer", "name", "vethpeer")
    sh("iptables", "-t", "filter", "-N", "KUBE-FIREWALL")
    sh("iptables", "-t", "filter", "-A", "INPUT", "-j", "KUBE-FIREWALL")
    sh("iptables", "-t", "nat", "-N", "CNI-abc123")
    sh("iptables", "-t", "nat", "-A", "POSTROUTING", "-s", "10.244.0.5/32", "-m", "comment", "--comment", "name: x id: y", "-j", "CNI-abc123")
    Path("/proc/sys/net/ipv4/ip_forward").write_text("1")
    changed = hoststate.differences(before, hoststate.record(prefixes, "watertight0"))
    left = hoststate.restore(before, prefixes, "watertight0", lambda line: None)
    rules = subprocess.run(["iptables-save"], capture_output=True, text=True).stdout
    print(json.dumps({"changed": changed, "left": left, "rules": rules}))
    """
)


def test_the_record_sees_what_a_node_changes_and_restore_puts_it_back() -> None:
    done = subprocess.run(
        ["unshare", "--net", sys.executable, "-c", SCENARIO],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    changed = "\n".join(result["changed"])
    for expected in (
        "interface watertight0 appeared",
        "interface veth0test appeared",
        "iptables ipv4/filter: added :KUBE-FIREWALL",
        "iptables ipv4/filter: added -A INPUT -j KUBE-FIREWALL",
        "iptables ipv4/nat: added :CNI-abc123",
        "sysctl net.ipv4.ip_forward: 0 before, 1 now",
    ):
        assert expected in changed, changed
    assert result["left"] == []
    assert "KUBE-" not in result["rules"] and "CNI-" not in result["rules"]


# ---- the local stack as one cluster --------------------------------------------------------------


def test_the_local_stack_describes_one_node_with_a_namespace_and_context_per_site() -> None:
    local = spec.load()
    assert local.node_ip == "10.244.0.1" and local.pod_network == "10.244.0.0/16"
    assert len(set(local.namespaces.values())) == 3 and len(set(local.contexts.values())) == 3
    assert local.cluster_domain == "cluster.local"
    assert local.entry_url.startswith(f"http://{local.node_ip}:")


def test_a_stack_that_is_not_one_cluster_is_refused_with_the_key_named() -> None:
    from watertight_infra import harness

    values = harness.stack_config(spec.STACK)
    sites = json.loads(json.dumps(values["sites"]))
    sites["dr"]["networks"] = ["10.30.0.0/16"]
    with pytest.raises(spec.SpecError, match="networks"):
        spec.from_stack_config({**values, "sites": sites})
    with pytest.raises(spec.SpecError, match="entryUrl"):
        spec.from_stack_config({**values, "entryUrl": "http://127.0.0.1:18080"})
    sites = json.loads(json.dumps(values["sites"]))
    sites["dr"]["namespace"] = sites["prod"]["namespace"]
    with pytest.raises(spec.SpecError, match="namespace"):
        spec.from_stack_config({**values, "sites": sites})
