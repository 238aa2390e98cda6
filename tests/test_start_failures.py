"""Starting components where a port is taken.

CI once lost a module's topology at setup: "prometheus exited while starting", on 127.0.0.1:58090.
Every connection between loopback addresses leaves from 127.0.0.1, so a client's end of any
connection can hold a port of the ephemeral range (32768-60999) there, and a server binding that
port on 127.0.0.1 fails with "address already in use". The test topologies listen nowhere on
127.0.0.1, and the error of a component that exits while starting shows the end of its log.
"""

from __future__ import annotations

import shutil
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.topologies import moved
from watertight import pg
from watertight import topology as topology_module
from watertight.runtime import local
from watertight.runtime.local import LocalRuntime, RuntimeError_
from watertight.topology import parse

# every moved() topology a test module uses: (site octet base, port digit)
MOVED = [(20, 2), (50, 2), (70, 3), (80, 4), (90, 5)]


@pytest.mark.parametrize(("base", "digit"), MOVED)
def test_no_moved_topology_listens_on_127_0_0_1(base: int, digit: int) -> None:
    topology = parse(moved(base, digit), "moved")
    addresses = {site.address for site in topology.sites.values()}
    addresses |= {topology.entry.address, topology.monitoring.address}
    assert "127.0.0.1" not in addresses


@pytest.fixture
def held_client_end() -> Iterator[tuple[str, int]]:
    """A connection whose client end holds address:port, as an ephemeral port can on 127.0.0.1
    (without SO_REUSEADDR, as most clients: a server binding there fails even with it)."""
    listener = socket.create_server(("127.0.0.1", 0))
    client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.bind(("127.0.0.1", 0))
    client.connect(listener.getsockname())
    accepted, _ = listener.accept()
    try:
        yield client.getsockname()
    finally:
        for sock in (client, accepted, listener):
            sock.close()


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus is not installed")
def test_a_component_that_cannot_bind_fails_naming_the_cause(
    tmp_path: Path, held_client_end: tuple[str, int]
) -> None:
    host, port = held_client_end
    text = moved(90, 5)
    monitoring = parse(text, "moved").monitoring
    text = text.replace(f"address: {monitoring.address}", f"address: {host}")
    text = text.replace(f"prometheus_port: {monitoring.prometheus_port}", f"prometheus_port: {port}")
    runtime = LocalRuntime(tmp_path / "run", parse(text, "held"), text)
    (prometheus,) = [c for c in runtime.components if c.kind == "prometheus"]
    assert (host, port) in prometheus.listens
    for folder in ("logs", "components"):
        (runtime.run_dir / folder).mkdir(parents=True, exist_ok=True)
    runtime.start_component(prometheus)
    try:
        with pytest.raises(RuntimeError_) as raised:
            runtime._wait_stage(prometheus.stage, [prometheus], lambda _: None)
    finally:
        runtime.stop(component=prometheus.name)
    message = str(raised.value)
    assert f"{prometheus.name} exited while starting" in message
    assert "address already in use" in message


def test_components_of_a_moved_topology_are_rendered_off_127_0_0_1(tmp_path: Path) -> None:
    runtime = LocalRuntime(tmp_path / "run", parse(moved(90, 5), "moved"), moved(90, 5))
    listening = [(c.name, address) for c in runtime.components for address in c.listens]
    assert listening
    assert not [(name, a) for name, a in listening if a[0] == "127.0.0.1"], listening


def test_free_ports_are_outside_the_ephemeral_range_and_never_handed_out_twice() -> None:
    """The core stacks' servers bind what pg.free_port gives: a port of the ephemeral range could
    be taken by a client's end first, as Prometheus' was."""
    low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    given = [pg.free_port() for _ in range(200)]
    assert len(set(given)) == len(given)
    assert all(port in pg.FREE_PORTS and not low <= port <= high for port in given)
    for port in pg.FREE_PORTS:  # a port of the range another process holds is never given
        try:
            held = socket.create_server(("127.0.0.1", port))
        except OSError:
            continue
        with held:
            assert port not in {pg.free_port() for _ in range(300)}
        break


def test_up_warns_of_a_listener_on_127_0_0_1_inside_the_ephemeral_range(tmp_path: Path) -> None:
    low, high = local.ephemeral_range()
    text = moved(90, 5)
    inside = text.replace(f"address: {parse(text, 'm').entry.address}", "address: 127.0.0.1")  # 58080
    on_loopback = LocalRuntime(tmp_path / "a", parse(inside, "inside"), inside)
    warnings = local.ephemeral_listeners(on_loopback.components)
    names = {w.split(" ", 1)[0] for w in warnings}
    if low <= 58080 <= high:
        assert {"entry", "prometheus", "alertmanager"} <= names, warnings
        assert "inside the kernel's ephemeral port range" in warnings[0]
    default = topology_module.DEFAULT_PATH.read_text()  # 1xxxx: outside the default range
    assert (
        local.ephemeral_listeners(LocalRuntime(tmp_path / "b", parse(default, "d"), default).components) == []
    )
    moved_away = moved(90, 5)  # the test topologies: 127.0.90.1, not where clients' ends are
    assert (
        local.ephemeral_listeners(LocalRuntime(tmp_path / "c", parse(moved_away, "m"), moved_away).components)
        == []
    )
