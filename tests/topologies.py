"""Topologies for tests: the default one moved to other loopback addresses and ports, so a
developer's running topology (and other test modules') are left alone."""

from __future__ import annotations

from watertight import topology as topology_module


def moved(site_octet_base: int, port_digit: int) -> str:
    """The default topology with site addresses 127.0.<base+1|2|3>.1 and ports 1xxxx -> <digit>xxxx."""
    text = topology_module.DEFAULT_PATH.read_text()
    for index, site_octet in enumerate((1, 2, 3), start=1):
        text = text.replace(f"127.0.{site_octet}.1", f"127.0.{site_octet_base + index}.1")
    for prefix in (": 123", ": 124", ": 155", ": 188", ": 181", ": 180", "port: 180"):
        text = text.replace(prefix, prefix[:-3] + str(port_digit) + prefix[-2:])
    return text
