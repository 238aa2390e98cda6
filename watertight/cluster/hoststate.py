"""What a Kubernetes node changes on the machine it runs on, recorded before the cluster starts and
put back after it stops.

Owns: the record (the sysctls the kubelet, kube-proxy and the CNI bridge set; the iptables chains
named KUBE-*, CNI-* and NETAVARK* with every rule that jumps to them; the nft tables iptables-nft
creates for them; mounts under the cluster's directories and /run/netns; the cluster's bridge and
veth interfaces; network namespaces; the files the kubelet and CNI write outside the cluster's
directory; the kubepods cgroups), its comparison, and putting back what differs.
Never: touch anything outside that record (other work on this machine keeps its rules, mounts
and namespaces), or restore a whole ruleset from a dump (that would undo what others did since).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

# the kubelet's setupKernelTunables, kube-proxy's route_localnet and conntrack settings, and the
# CNI bridge's forwarding; read from /proc/sys
SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
    "net.ipv4.ip_forward",
    "net.ipv4.conf.all.forwarding",
    "net.ipv4.conf.all.route_localnet",
    "net.ipv6.conf.all.forwarding",
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.netfilter.nf_conntrack_max",
    "net.netfilter.nf_conntrack_tcp_timeout_established",
    "net.netfilter.nf_conntrack_tcp_timeout_close_wait",
)
OUR_CHAINS = re.compile(r"^(KUBE-|CNI-|NETAVARK)")
IPTABLES = {"ipv4": ("iptables-save", "iptables"), "ipv6": ("ip6tables-save", "ip6tables")}
TABLES = ("filter", "nat", "mangle", "raw", "security")
NFT_FAMILIES = {"ipv4": "ip", "ipv6": "ip6"}
NETNS_DIRS = (Path("/run/netns"), Path("/var/run/netns"))
# written by the kubelet and by libcni/containerd outside the directories we give them
WATCHED_DIRS = (
    Path("/var/log/pods"),
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
    Path("/var/lib/kubelet"),
    Path("/etc/cni"),
    Path("/opt/cni"),
    Path("/opt/containerd"),
    Path("/run/containerd"),
    Path("/etc/kubernetes"),
    Path("/run/netns"),
)
CGROUP_ROOT = Path("/sys/fs/cgroup")
CGROUP_PREFIX = "kubepods"
COMMAND_TIMEOUT_S = 30


def _sysctl_path(name: str) -> Path:
    return Path("/proc/sys") / name.replace(".", "/")


def read_sysctls() -> dict[str, str]:
    found = {}
    for name in SYSCTLS:
        try:
            found[name] = " ".join(_sysctl_path(name).read_text().split())
        except OSError:
            continue  # not on this kernel (e.g. no br_netfilter)
    return found


def _run(argv: list[str], check: bool = True) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False)
    if check and done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()[-300:]}")
    return done.stdout


def _iptables_dump(family: str, table: str) -> list[str]:
    save, _ = IPTABLES[family]
    if shutil.which(save) is None:
        return []
    done = subprocess.run(
        [save, "-t", table], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    return done.stdout.splitlines() if done.returncode == 0 else []


def _jump_target(rule: str) -> str | None:
    parts = shlex.split(rule)
    for flag in ("-j", "-g"):
        if flag in parts[:-1]:
            return parts[parts.index(flag) + 1]
    return None


def our_iptables() -> dict[str, list[str]]:
    """Per "<family>/<table>": our chains (``:NAME``) and every rule in them or jumping to them,
    sorted (counters left out)."""
    found: dict[str, list[str]] = {}
    for family in IPTABLES:
        for table in TABLES:
            lines = []
            for line in _iptables_dump(family, table):
                if line.startswith(":"):
                    name = line[1:].split()[0]
                    if OUR_CHAINS.match(name):
                        lines.append(f":{name}")
                elif line.startswith("-A "):
                    chain = line.split()[1]
                    target = _jump_target(line)
                    if OUR_CHAINS.match(chain) or (target and OUR_CHAINS.match(target)):
                        lines.append(line)
            if lines:
                found[f"{family}/{table}"] = sorted(lines)
    return found


def nft_tables() -> list[str]:
    if shutil.which("nft") is None:
        return []
    done = subprocess.run(
        ["nft", "list", "tables"], capture_output=True, text=True, timeout=COMMAND_TIMEOUT_S, check=False
    )
    return sorted(line.strip() for line in done.stdout.splitlines() if line.strip())


def mounts(prefixes: Iterable[Path]) -> list[str]:
    """Mount points at or under any of ``prefixes`` (each line of mountinfo's mount point)."""
    wanted = [str(p).rstrip("/") for p in prefixes]
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            point = line.split()[4].replace("\\040", " ")
            if any(point == p or point.startswith(p + "/") for p in wanted):
                found.append(point)
    return sorted(found)


def interfaces(bridge: str) -> list[str]:
    """Our bridge and every veth (the CNI bridge plugin names the host ends veth<hex>)."""
    # `ip` rather than /sys/class/net: sysfs shows the namespace that mounted it, not ours
    listing = _run(["ip", "-o", "link", "show"], check=False)
    names = sorted(line.split(":")[1].strip().split("@")[0] for line in listing.splitlines() if ":" in line)
    return [name for name in names if name == bridge or name.startswith("veth")]


def netns_entries() -> list[str]:
    found: set[str] = set()
    for directory in NETNS_DIRS:
        try:
            found.update(str(directory.resolve() / name) for name in os.listdir(directory))
        except OSError:
            continue
    return sorted(found)


def dir_entries() -> dict[str, list[str] | None]:
    """Each watched directory's entries, or None when it does not exist."""
    found: dict[str, list[str] | None] = {}
    for directory in WATCHED_DIRS:
        try:
            found[str(directory)] = sorted(os.listdir(directory))
        except FileNotFoundError:
            found[str(directory)] = None
        except NotADirectoryError:
            found[str(directory)] = []
    return found


def kubepods_cgroups() -> list[str]:
    found: list[str] = []
    try:
        hierarchies = sorted(os.listdir(CGROUP_ROOT))
    except OSError:
        return []
    for hierarchy in hierarchies:
        base = CGROUP_ROOT / hierarchy
        try:
            names = os.listdir(base)
        except OSError:
            continue
        found.extend(str(base / name) for name in names if name.startswith(CGROUP_PREFIX))
    return sorted(found)


@dataclass
class HostState:
    """The parts of the machine a node changes (see the module's docstring)."""

    sysctls: dict[str, str] = field(default_factory=dict)
    iptables: dict[str, list[str]] = field(default_factory=dict)
    nft_tables: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    interfaces: list[str] = field(default_factory=list)
    netns: list[str] = field(default_factory=list)
    dirs: dict[str, list[str] | None] = field(default_factory=dict)
    cgroups: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> HostState:
        return cls(**json.loads(text))


def record(mount_prefixes: Iterable[Path], bridge: str) -> HostState:
    return HostState(
        sysctls=read_sysctls(),
        iptables=our_iptables(),
        nft_tables=nft_tables(),
        mounts=mounts([*mount_prefixes, *NETNS_DIRS]),
        interfaces=interfaces(bridge),
        netns=netns_entries(),
        dirs=dir_entries(),
        cgroups=kubepods_cgroups(),
    )


def differences(before: HostState, after: HostState) -> list[str]:
    """One sentence per difference, empty when the machine is as it was."""
    found = []
    for name in sorted(set(before.sysctls) | set(after.sysctls)):
        if before.sysctls.get(name) != after.sysctls.get(name):
            found.append(f"sysctl {name}: {before.sysctls.get(name)} before, {after.sysctls.get(name)} now")
    for key in sorted(set(before.iptables) | set(after.iptables)):
        added = sorted(set(after.iptables.get(key, [])) - set(before.iptables.get(key, [])))
        removed = sorted(set(before.iptables.get(key, [])) - set(after.iptables.get(key, [])))
        found.extend(f"iptables {key}: added {line}" for line in added)
        found.extend(f"iptables {key}: missing {line}" for line in removed)
    for label, old, new in (
        ("nft table", before.nft_tables, after.nft_tables),
        ("mount", before.mounts, after.mounts),
        ("interface", before.interfaces, after.interfaces),
        ("network namespace", before.netns, after.netns),
        ("cgroup", before.cgroups, after.cgroups),
    ):
        found.extend(f"{label} {item} appeared" for item in sorted(set(new) - set(old)))
        found.extend(f"{label} {item} vanished" for item in sorted(set(old) - set(new)))
    for directory in sorted(set(before.dirs) | set(after.dirs)):
        old_entries, new_entries = before.dirs.get(directory), after.dirs.get(directory)
        if old_entries is None and new_entries is not None:
            found.append(f"directory {directory} appeared")
        elif old_entries is not None and new_entries is None:
            found.append(f"directory {directory} vanished")
        elif old_entries is not None and new_entries is not None:
            found.extend(
                f"{directory}/{name} appeared" for name in sorted(set(new_entries) - set(old_entries))
            )
    return found


# ---- putting it back -----------------------------------------------------------------------------


def _remove_our_iptables(before: HostState, say: Callable[[str], None]) -> None:
    for family, (_, command) in IPTABLES.items():
        if shutil.which(command) is None:
            continue
        for table in TABLES:
            kept = set(before.iptables.get(f"{family}/{table}", []))
            lines = _iptables_dump(family, table)
            ours = {
                line[1:].split()[0]
                for line in lines
                if line.startswith(":")
                and OUR_CHAINS.match(line[1:].split()[0])
                and f":{line[1:].split()[0]}" not in kept
            }
            rules = [
                line
                for line in lines
                if line.startswith("-A ")
                and line not in kept
                and (_jump_target(line) in ours or line.split()[1] in ours)
            ]
            # the jumps from chains we keep first, then our chains emptied and deleted
            for line in rules:
                if line.split()[1] in ours:
                    continue
                _run([command, "-t", table, "-D", *shlex.split(line)[1:]], check=False)
            for chain in sorted(ours):
                _run([command, "-t", table, "-F", chain], check=False)
            for chain in sorted(ours):
                _run([command, "-t", table, "-X", chain], check=False)
            if ours:
                say(
                    f"removed {len(ours)} {family} {table} chains ({', '.join(sorted(ours)[:4])}{', ...' if len(ours) > 4 else ''})"
                )


def _remove_empty_nft_tables(before: HostState, say: Callable[[str], None]) -> None:
    """The tables iptables-nft created for our rules, when nothing else has put a rule in them."""
    for line in sorted(set(nft_tables()) - set(before.nft_tables)):
        parts = line.split()  # "table ip nat"
        if len(parts) != 3 or parts[1] not in NFT_FAMILIES.values() or parts[2] not in TABLES:
            continue
        listing = _run(["nft", "list", "table", parts[1], parts[2]], check=False)
        rules = [
            row for row in listing.splitlines()
            if row.strip() and not row.strip().startswith(("table ", "chain ", "type ", "}", "policy "))
        ]  # fmt: skip
        if not rules:
            _run(["nft", "delete", "table", parts[1], parts[2]], check=False)
            say(f"removed the empty nft table {parts[1]} {parts[2]} that iptables-nft created")


def _umount(points: list[str], say: Callable[[str], None]) -> None:
    for point in sorted(points, key=lambda p: p.count("/"), reverse=True):
        done = subprocess.run(["umount", point], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False)
        if done.returncode != 0:
            subprocess.run(
                ["umount", "-l", point], capture_output=True, timeout=COMMAND_TIMEOUT_S, check=False
            )
    if points:
        say(f"unmounted {len(points)} mounts the node left")


def _remove_cgroups(before: HostState, say: Callable[[str], None]) -> None:
    left = sorted(set(kubepods_cgroups()) - set(before.cgroups))
    removed = 0
    for top in left:
        for directory, _, _ in sorted(os.walk(top), key=lambda entry: entry[0].count("/"), reverse=True):
            try:
                os.rmdir(directory)
                removed += 1
            except OSError:
                pass
    if left:
        say(f"removed {removed} kubepods cgroups")


def restore(
    before: HostState, mount_prefixes: Iterable[Path], bridge: str, say: Callable[[str], None]
) -> list[str]:
    """Put back what differs from ``before``; returns the differences that remain."""
    prefixes = [*mount_prefixes, *NETNS_DIRS]
    _umount(sorted(set(mounts(prefixes)) - set(before.mounts)), say)
    for entry in sorted(set(netns_entries()) - set(before.netns)):
        Path(entry).unlink(missing_ok=True)
    for name in interfaces(bridge):
        if name not in before.interfaces:
            _run(["ip", "link", "delete", name], check=False)
            say(f"deleted the interface {name}")
    _remove_our_iptables(before, say)
    _remove_empty_nft_tables(before, say)
    _remove_cgroups(before, say)
    now = read_sysctls()
    for name, value in before.sysctls.items():
        if now.get(name) != value:
            try:
                _sysctl_path(name).write_text(value)
                say(f"sysctl {name} back to {value} (was {now.get(name)})")
            except OSError as error:
                say(f"could not set sysctl {name} back to {value}: {error}")
    for directory, entries in before.dirs.items():
        path = Path(directory)
        if entries is None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
                say(f"removed {directory}, which the node created")
            continue
        try:
            current = os.listdir(path)
        except OSError:
            continue
        for name in sorted(set(current) - set(entries)):
            target = path / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target, ignore_errors=True)
            else:
                target.unlink(missing_ok=True)
    return differences(before, record(mount_prefixes, bridge))
