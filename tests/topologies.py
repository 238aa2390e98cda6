"""Topologies for tests: the default one moved to other loopback addresses and ports, so a
developer's running topology (and other test modules') are left alone.

``WATERTIGHT_TEST_NET=N`` (1..254) moves every test topology from 127.0.x.x to 127.N.x.x, so two
checkouts can run the suite on one machine at once without their topologies meeting.
"""

from __future__ import annotations

import os

from watertight import topology as topology_module


def test_net() -> int:
    """The second octet of every loopback address the test topologies use (0 unless set)."""
    raw = os.environ.get("WATERTIGHT_TEST_NET", "0")
    if not raw.isdigit() or not 0 <= int(raw) <= 254:
        raise ValueError(f"WATERTIGHT_TEST_NET={raw!r}: must be a number in 0..254")
    return int(raw)


def on_test_net(text: str) -> str:
    """``text`` with every 127.0.x.x address moved to the test net (unchanged when it is 0)."""
    net = test_net()
    return text if net == 0 else text.replace("127.0.", f"127.{net}.")


def moved(site_octet_base: int, port_digit: int) -> str:
    """The default topology with site addresses 127.0.<base+1|2|3>.1, the entry and monitoring on
    127.0.<base>.1, and ports 1xxxx -> <digit>xxxx.

    Nothing listens on 127.0.0.1: every connection between loopback addresses leaves from
    127.0.0.1, so there a client's end can hold a port of the ephemeral range (32768-60999 by
    default; digits 3, 4 and 5 fall in it) and the server's bind fails with "address in use".
    """
    text = topology_module.DEFAULT_PATH.read_text()
    text = text.replace("address: 127.0.0.1", f"address: 127.0.{site_octet_base}.1")
    for index, site_octet in enumerate((1, 2, 3), start=1):
        text = text.replace(f"127.0.{site_octet}.1", f"127.0.{site_octet_base + index}.1")
    for prefix in (": 123", ": 124", ": 155", ": 188", ": 181", ": 180", "port: 180"):
        text = text.replace(prefix, prefix[:-3] + str(port_digit) + prefix[-2:])
    return on_test_net(text)
