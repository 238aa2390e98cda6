"""Network faults between the sites of a local topology: partitions and added latency, with
nftables, cgroup v2 and (for latency) an NFQUEUE delayer.

Every site is a loopback address of one machine and every connection between sites starts from
127.0.0.1, so an address says who listens but not who connects. The connecting side is told by the
cgroup v2 of its socket: each site's processes are placed in ``watertight/<run id>/<site>/<component>``
under the cgroup2 mount, and nftables matches ``socket cgroupv2`` at the site's level. The
component's own cgroup also lets the runtime find and kill every process of a component, or of
the run, that outlived its PID (``cgroup_pids``, ``kill_cgroup``). Connections that already exist when a
fault starts are found in /proc (which process holds which end) and matched by their 4-tuple.

- partition: new connections across the cut are dropped at their SYN, existing ones in both
  directions; nothing is reset, so peers notice by their own timeouts, as across a real WAN.
- latency: packets crossing between the chosen sites, both directions, are marked by the table
  and queued by an iptables NFQUEUE rule (``--queue-bypass``) to ``python -m
  watertight.chaos.netdelay``, which releases each after the delay. New connections are marked at
  their SYN (conntrack mark) so their replies are delayed too. The kernel here has no ``netem``
  qdisc (tc answers "Specified qdisc kind is unknown") and no nftables ``queue`` expression.

State: ``<run dir>/chaos/network.json`` holds the active faults (and the delayer's PID); the
nftables table ``inet watertight_<run id>`` is rendered from it whole, atomically, on each change.
Never: touch another run's table or cgroups, or signal a process it did not start.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watertight.runtime import processes
from watertight.runtime.processes import ProcessRecord

NFT = "nft"
IPTABLES = "iptables"
NFT_TIMEOUT_S = 10.0
SYS_CGROUP = Path("/sys/fs/cgroup")  # where nft resolves cgroupv2 paths from
CGROUP_TOP = "watertight"
ENTRY_GROUP = "entry"  # the cgroup of components of no site (the entry): no fault rule names it
STATE_FILE = "network.json"
DELAY_MS_MAX = 5_000
DELAYER_START_TIMEOUT_S = 5.0
DELAYER_STOP_TIMEOUT_S = 5.0
DELAYER_LIFETIME_S_DEFAULT = 3_600

Tuple4 = tuple[str, int, str, int]  # saddr, sport, daddr, dport


class NetworkFaultError(RuntimeError):
    """A network fault could not be set or healed; the message says what is missing."""


# ---- the run's names ------------------------------------------------------------------------------


def run_id(run_dir: Path) -> str:
    """A short stable id of a run directory (its table, cgroups, queue and mark derive from it)."""
    return hashlib.sha256(str(Path(run_dir).absolute()).encode()).hexdigest()[:10]


def table_name(run_dir: Path) -> str:
    return f"watertight_{run_id(run_dir)}"


def queue_number(run_dir: Path) -> int:
    return 1_000 + int(run_id(run_dir), 16) % 60_000


def conntrack_mark(run_dir: Path) -> int:
    return 0x57000000 | (int(run_id(run_dir), 16) & 0xFFFFFF)


def cgroup2_mount() -> Path:
    """Where the cgroup v2 hierarchy is mounted (``/sys/fs/cgroup`` or, on hybrid hosts,
    ``/sys/fs/cgroup/unified``)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError as error:
        raise NetworkFaultError(f"cannot read /proc/self/mounts: {error.strerror}") from None
    for line in mounts:
        fields = line.split()
        if len(fields) >= 3 and fields[2] == "cgroup2":
            return Path(fields[1])
    raise NetworkFaultError(
        "no cgroup v2 hierarchy is mounted; mount one (mount -t cgroup2 none /sys/fs/cgroup/unified) "
        "so each site's sockets can be told apart"
    )


@dataclass(frozen=True)
class SiteCgroup:
    """A site's cgroup: its directory, and how nftables names it (path relative to /sys/fs/cgroup,
    and its depth in the cgroup v2 hierarchy)."""

    directory: Path
    nft_path: str
    level: int


def site_cgroup(run_dir: Path, site: str, mount: Path | None = None) -> SiteCgroup:
    mount = mount or cgroup2_mount()
    relative = Path(CGROUP_TOP) / run_id(run_dir) / site
    directory = mount / relative
    try:
        nft_path = str(directory.relative_to(SYS_CGROUP))
    except ValueError:
        raise NetworkFaultError(
            f"the cgroup v2 hierarchy is mounted at {mount}, outside {SYS_CGROUP}, where nftables looks"
        ) from None
    return SiteCgroup(directory, nft_path, len(relative.parts))


# ---- the topology as the network sees it ----------------------------------------------------------


@dataclass(frozen=True)
class SiteNetwork:
    """What network faults need of a topology: each site's address and the PIDs of its processes."""

    run_dir: Path
    addresses: Mapping[str, str]
    pids: Mapping[str, list[int]] = field(default_factory=dict)

    def others(self, site: str) -> list[str]:
        return [s for s in self.addresses if s != site]


def require_root_tools() -> None:
    if os.geteuid() != 0:
        raise NetworkFaultError("network faults need root (nftables and cgroups); run the drill as root")
    if shutil.which(NFT) is None:
        raise NetworkFaultError(
            "nft is not installed; install the Debian package nftables (apt-get install nftables)"
        )


def _cgroup_of(pid: int) -> str | None:
    """The cgroup v2 path of a process (``0::/...``), or None when it is gone."""
    try:
        for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return line[3:]
    except OSError:
        return None
    return None


def adopt(net: SiteNetwork) -> dict[str, int]:
    """Place every process of each site in the site's cgroup (idempotent: one already inside the
    site's cgroup, e.g. in its component's, stays where it is). Returns how many processes each
    site has there. Sockets keep the cgroup they were made in, which is why connections older
    than this are matched by their 4-tuple."""
    mount = cgroup2_mount()
    placed: dict[str, int] = {}
    for site, pids in net.pids.items():
        group = site_cgroup(net.run_dir, site, mount)
        group.directory.mkdir(parents=True, exist_ok=True)
        inside = "/" + str(group.directory.relative_to(mount))
        procs = group.directory / "cgroup.procs"
        count = 0
        for pid in pids:
            where = _cgroup_of(pid)
            if where is None:
                continue  # gone since it was listed
            if where == inside or where.startswith(inside + "/"):
                count += 1
                continue
            try:
                procs.write_text(str(pid))
                count += 1
            except ProcessLookupError:
                continue  # gone since it was listed
            except OSError as error:
                if error.errno == 3:  # ESRCH
                    continue
                raise NetworkFaultError(f"cannot move PID {pid} into {group.directory}: {error}") from None
        placed[site] = count
    return placed


def component_cgroup(run_dir: Path, site: str | None, component: str, mount: Path | None = None) -> Path:
    """The cgroup of one component: inside its site's (so the site's fault rules cover it), or in
    the run's ``entry`` group for a component of no site."""
    mount = mount or cgroup2_mount()
    return mount / CGROUP_TOP / run_id(run_dir) / (site or ENTRY_GROUP) / component


def place(run_dir: Path, site: str | None, pid: int, component: str | None = None) -> bool:
    """Put a process that just started into its component's cgroup (inside its site's), so its
    sockets carry the site from birth and a fault already in force covers it (a component
    restarted during a partition), and everything it ever starts can be found again.
    Best effort: False, changing nothing, without root or a cgroup v2 hierarchy nftables can name
    (the fault actions then place the site's processes themselves when they start)."""
    if os.geteuid() != 0:
        return False
    try:
        if component is None:
            assert site is not None, "a process of no site needs its component's name"
            directory = site_cgroup(run_dir, site).directory
        else:
            site_cgroup(run_dir, site or ENTRY_GROUP)  # the mount is one nftables can name
            directory = component_cgroup(run_dir, site, component)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "cgroup.procs").write_text(str(pid))
    except (NetworkFaultError, OSError):
        return False
    return True


def cgroup_pids(directory: Path) -> list[int]:
    """Every process in a cgroup and the cgroups below it (none when it does not exist)."""
    found: list[int] = []
    if not directory.is_dir():
        return found
    for procs in [directory / "cgroup.procs", *sorted(directory.rglob("*/cgroup.procs"))]:
        try:
            found.extend(int(line) for line in procs.read_text().split())
        except (OSError, ValueError):
            continue
    return found


def run_cgroup(run_dir: Path) -> Path | None:
    """The run's cgroup (every component's is below it), or None without a cgroup v2 hierarchy."""
    try:
        return cgroup2_mount() / CGROUP_TOP / run_id(run_dir)
    except NetworkFaultError:
        return None


def kill_cgroup(directory: Path) -> list[int]:
    """SIGKILL every process in a cgroup and below (``cgroup.kill`` where the kernel has it, which
    leaves no window for a fork; else each PID listed). Returns the PIDs that were there."""
    pids = cgroup_pids(directory)
    if not pids:
        return []
    try:
        (directory / "cgroup.kill").write_text("1")
    except OSError:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def clear_run(run_dir: Path) -> dict[str, Any]:
    """Leave nothing of the run's network faults: heal any still in force (a drill stopped before
    its rollback), which removes its table, its queue rule and its delayer, then remove its empty
    cgroups. For `watertight down`, after the processes stopped. Idempotent; without root or nft
    there is nothing of the run's to remove."""
    tools = os.geteuid() == 0 and shutil.which(NFT) is not None
    state = read_state(run_dir)
    healed: dict[str, Any] = {}
    if state or (tools and table_text(run_dir) is not None):
        require_root_tools()
        _apply(SiteNetwork(run_dir, {}), {})  # rules first: nothing is queued to a delayer going away
        latency = state.get("latency")
        if latency:
            _stop_delayer(ProcessRecord(**latency["delayer"]))
        healed = {
            "partition": (state.get("partition") or {}).get("site"),
            "latency_ms": latency["delay_ms"] if latency else None,
        }
    return {"healed": healed, "cgroups_removed": release_cgroups(run_dir)}


def release_cgroups(run_dir: Path) -> list[str]:
    """Remove this run's cgroups that no process uses any more (after `down`), deepest first.
    Returns those removed, relative to the run's."""
    try:
        mount = cgroup2_mount()
    except NetworkFaultError:
        return []
    top = mount / CGROUP_TOP / run_id(run_dir)
    removed: list[str] = []
    if not top.is_dir():
        return removed
    below = sorted((d for d in top.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts))
    for child in below:
        try:
            child.rmdir()
            removed.append(str(child.relative_to(top)))
        except OSError:
            pass
    for empty in (top, top.parent):  # the run's, then watertight/ when no other run uses it
        try:
            empty.rmdir()
        except OSError:
            break
    return removed


# ---- who holds which end of each connection -------------------------------------------------------


def _decode_address(text: str) -> tuple[str, int]:
    address, port = text.split(":")
    return socket.inet_ntoa(struct.pack("<I", int(address, 16))), int(port, 16)


TCP_ESTABLISHED_STATES = {"01", "02", "03", "04", "05", "08", "09"}  # not LISTEN, CLOSE, TIME_WAIT


def tcp_sockets() -> dict[int, Tuple4]:
    """inode -> (local address, port, remote address, port) of every IPv4 TCP socket that carries
    a connection, in this network namespace."""
    found: dict[int, Tuple4] = {}
    with open("/proc/net/tcp", encoding="ascii") as handle:
        next(handle)
        for line in handle:
            fields = line.split()
            if len(fields) < 10 or fields[3] not in TCP_ESTABLISHED_STATES:
                continue
            local, remote, inode = _decode_address(fields[1]), _decode_address(fields[2]), int(fields[9])
            if inode:
                found[inode] = (local[0], local[1], remote[0], remote[1])
    return found


def socket_owners(pids_by_site: Mapping[str, Iterable[int]]) -> dict[int, str]:
    """inode of each socket a site's process holds -> the site."""
    owners: dict[int, str] = {}
    for site, pids in pids_by_site.items():
        for pid in pids:
            try:
                fds = os.listdir(f"/proc/{pid}/fd")
            except OSError:
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    owners[int(target[8:-1])] = site
    return owners


def crossing_connections(
    sockets: Mapping[int, Tuple4], owners: Mapping[int, str], pairs: set[frozenset[str]]
) -> set[Tuple4]:
    """The 4-tuples (both directions) of connections whose two ends belong to sites forming one of
    ``pairs``. An end held by no site (a client, the entry) is never counted."""
    by_tuple = {t: owners.get(inode) for inode, t in sockets.items()}
    crossing: set[Tuple4] = set()
    for tup, site in by_tuple.items():
        peer = by_tuple.get((tup[2], tup[3], tup[0], tup[1]))
        if site is None or peer is None or site == peer:
            continue
        if frozenset((site, peer)) in pairs:
            crossing.add(tup)
            crossing.add((tup[2], tup[3], tup[0], tup[1]))
    return crossing


def pairs_for_partition(net: SiteNetwork, site: str) -> set[frozenset[str]]:
    return {frozenset((site, other)) for other in net.others(site)}


def pairs_between(sites: Iterable[str]) -> set[frozenset[str]]:
    chosen = sorted(set(sites))
    return {frozenset((a, b)) for i, a in enumerate(chosen) for b in chosen[i + 1 :]}


# ---- nftables -------------------------------------------------------------------------------------


def _tuple_elements(tuples: Iterable[Iterable[Any]]) -> str:
    return ", ".join(f"{s} . {sp} . {d} . {dp}" for s, sp, d, dp in sorted(tuple(t) for t in tuples))


def _by_sender(
    net: SiteNetwork, pairs: set[frozenset[str]], mount: Path
) -> list[tuple[SiteCgroup, list[str]]]:
    """For each site: its cgroup and the addresses of the sites it pairs with."""
    rules = []
    for site in net.addresses:
        peers = sorted(net.addresses[o] for o in net.addresses if frozenset((site, o)) in pairs)
        if peers:
            rules.append((site_cgroup(net.run_dir, site, mount), peers))
    return rules


def render_table(net: SiteNetwork, state: Mapping[str, Any], mount: Path) -> str:
    """The whole nftables table of the run for the faults in ``state`` (an nft -f script that
    replaces the table atomically)."""
    name = table_name(net.run_dir)
    lines = [f"add table inet {name}", f"delete table inet {name}", f"table inet {name} {{"]
    tuple_type = "ipv4_addr . inet_service . ipv4_addr . inet_service"
    rules: list[str] = []
    partition = state.get("partition")
    if partition:
        cut = partition.get("existing", [])
        lines.append(f"  set cut {{ type {tuple_type}; {_elements_clause(cut)}}}")
        rules.append("ip saddr . tcp sport . ip daddr . tcp dport @cut drop")
        pairs = {frozenset(p) for p in partition["pairs"]}
        for group, peers in _by_sender(net, pairs, mount):
            rules.append(
                f'socket cgroupv2 level {group.level} "{group.nft_path}" ip daddr {{ {", ".join(peers)} }} drop'
            )
    latency = state.get("latency")
    if latency:
        lag = latency.get("existing", [])
        lines.append(f"  set lag {{ type {tuple_type}; {_elements_clause(lag)}}}")
        mark = conntrack_mark(net.run_dir)
        rules.append(f"ip saddr . tcp sport . ip daddr . tcp dport @lag meta mark set {mark:#x}")
        pairs = {frozenset(p) for p in latency["pairs"]}
        for group, peers in _by_sender(net, pairs, mount):
            rules.append(
                f'ct state new socket cgroupv2 level {group.level} "{group.nft_path}" '
                f"ip daddr {{ {', '.join(peers)} }} ct mark set {mark:#x}"
            )
        rules.append(f"ct mark {mark:#x} meta mark set {mark:#x}")
    lines.append("  chain output {")
    lines.append("    type filter hook output priority -150; policy accept;")
    lines.extend(f"    {rule}" for rule in rules)
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _elements_clause(tuples: list[Any]) -> str:
    return f"elements = {{ {_tuple_elements(tuples)} }}; " if tuples else ""


def _nft(script: str) -> None:
    try:
        result = subprocess.run(
            [NFT, "-f", "-"], input=script, capture_output=True, text=True, timeout=NFT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise NetworkFaultError(f"nft did not answer within {NFT_TIMEOUT_S:.0f} s") from None
    if result.returncode != 0:
        raise NetworkFaultError(f"nft refused the rules: {result.stderr.strip()}\n{script}")


def delete_table(run_dir: Path) -> None:
    name = table_name(run_dir)
    _nft(f"add table inet {name}\ndelete table inet {name}\n")


def table_text(run_dir: Path) -> str | None:
    """The run's table as nftables lists it, or None when it has none."""
    result = subprocess.run(
        [NFT, "list", "table", "inet", table_name(run_dir)],
        capture_output=True,
        text=True,
        timeout=NFT_TIMEOUT_S,
    )
    return result.stdout if result.returncode == 0 else None


# ---- state ----------------------------------------------------------------------------------------


def state_path(run_dir: Path) -> Path:
    return Path(run_dir) / "chaos" / STATE_FILE


def read_state(run_dir: Path) -> dict[str, Any]:
    try:
        state: dict[str, Any] = json.loads(state_path(run_dir).read_text())
    except FileNotFoundError:
        return {}
    return state


def _write_state(run_dir: Path, state: Mapping[str, Any]) -> None:
    path = state_path(run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=1))
    tmp.replace(path)


def _apply(net: SiteNetwork, state: dict[str, Any]) -> None:
    if state.get("partition") or state.get("latency"):
        _nft(render_table(net, state, cgroup2_mount()))
    else:
        delete_table(net.run_dir)
    latency = state.get("latency")
    _queue_rule(net.run_dir, latency["queue"] if latency else None)
    _write_state(net.run_dir, state)


def queue_rule(run_dir: Path, queue: int) -> list[str]:
    """The iptables rule that hands packets marked by the run's table to the delayer's queue.

    iptables because this kernel has NFQUEUE only as an xtables target (nftables' own ``queue``
    statement answers "No such file or directory"); ``--queue-bypass`` lets packets pass when no
    delayer is bound."""
    return [
        "OUTPUT",
        "-m",
        "mark",
        "--mark",
        f"{conntrack_mark(run_dir):#x}",
        "-m",
        "comment",
        "--comment",
        table_name(run_dir),
        "-j",
        "NFQUEUE",
        "--queue-num",
        str(queue),
        "--queue-bypass",
    ]


def _iptables(arguments: list[str]) -> subprocess.CompletedProcess[str]:
    if shutil.which(IPTABLES) is None:
        raise NetworkFaultError("iptables is not installed; install the Debian package iptables")
    try:
        return subprocess.run(
            [IPTABLES, "-w", "5", *arguments], capture_output=True, text=True, timeout=NFT_TIMEOUT_S
        )
    except subprocess.TimeoutExpired:
        raise NetworkFaultError(f"iptables did not answer within {NFT_TIMEOUT_S:.0f} s") from None


def _queue_rule(run_dir: Path, queue: int | None) -> None:
    """Make the run's queue rule present (for ``queue``) or absent (None), whatever queue an
    earlier rule named."""
    listed = _iptables(["-S", "OUTPUT"])
    if listed.returncode != 0:
        if queue is None:
            return  # no iptables tables at all: nothing to remove
        raise NetworkFaultError(f"iptables -S OUTPUT failed: {listed.stderr.strip()}")
    name = table_name(run_dir)
    wanted = queue_rule(run_dir, queue) if queue is not None else None
    for line in listed.stdout.splitlines():
        if f"--comment {name} " in line or line.endswith(f"--comment {name}"):
            spec = line.split()[1:]  # "-A OUTPUT ..." without -A
            if wanted is not None and _same_rule(spec, wanted):
                return
            _iptables(["-D", *spec])
    if wanted is not None:
        added = _iptables(["-A", *wanted])
        if added.returncode != 0:
            raise NetworkFaultError(f"iptables refused the queue rule: {added.stderr.strip()}")


def _same_rule(listed: list[str], wanted: list[str]) -> bool:
    return f"--queue-num {wanted[wanted.index('--queue-num') + 1]}" in " ".join(listed)


def _existing(net: SiteNetwork, pairs: set[frozenset[str]]) -> list[list[Any]]:
    crossing = crossing_connections(tcp_sockets(), socket_owners(net.pids), pairs)
    return [list(t) for t in sorted(crossing)]


# ---- partition ------------------------------------------------------------------------------------


def partition(net: SiteNetwork, site: str) -> dict[str, Any]:
    """Cut ``site`` off from every other site (both directions, new and existing connections).
    Clients outside the sites (the entry, load generators) still reach it. Idempotent."""
    if site not in net.addresses:
        raise NetworkFaultError(f"no site named {site!r}; sites are {', '.join(net.addresses)}")
    require_root_tools()
    state = read_state(net.run_dir)
    placed = adopt(net)
    pairs = pairs_for_partition(net, site)
    # rules for new connections first, then the 4-tuples of those that exist by now
    state["partition"] = {"site": site, "pairs": [sorted(p) for p in pairs], "existing": []}
    _apply(net, state)
    state["partition"]["existing"] = _existing(net, pairs)
    _apply(net, state)
    return {
        "site": site,
        "cut_from": net.others(site),
        "existing_connections_cut": len(state["partition"]["existing"]) // 2,
        "processes_placed": placed,
    }


def heal_partition(net: SiteNetwork) -> dict[str, Any]:
    """Remove the partition (other network faults stay). Idempotent."""
    state = read_state(net.run_dir)
    healed = state.pop("partition", None)
    if healed is None and table_text(net.run_dir) is None:
        return {"healed": None}
    require_root_tools()
    _apply(net, state)
    return {"healed": healed["site"] if healed else None}


# ---- latency --------------------------------------------------------------------------------------


def add_latency(
    net: SiteNetwork,
    delay_ms: int,
    sites: Iterable[str] | None = None,
    lifetime_s: int = DELAYER_LIFETIME_S_DEFAULT,
) -> dict[str, Any]:
    """Delay every packet between two different sites among ``sites`` (default: all) by
    ``delay_ms`` one way, so a round trip gains twice that. The delayer stops by itself after
    ``lifetime_s`` (packets then pass undelayed). Replaces an earlier latency of this run."""
    chosen = list(sites) if sites else list(net.addresses)
    unknown = [s for s in chosen if s not in net.addresses]
    if unknown:
        raise NetworkFaultError(f"no site named {unknown[0]!r}; sites are {', '.join(net.addresses)}")
    if len(set(chosen)) < 2:
        raise NetworkFaultError("latency needs at least two sites to lie between")
    if not 0 < delay_ms <= DELAY_MS_MAX:
        raise NetworkFaultError(f"delay_ms must be 1..{DELAY_MS_MAX}, got {delay_ms}")
    require_root_tools()
    remove_latency(net)
    state = read_state(net.run_dir)
    queue = queue_number(net.run_dir)
    record = _start_delayer(net.run_dir, queue, delay_ms, lifetime_s)
    placed = adopt(net)
    pairs = pairs_between(chosen)
    state["latency"] = {
        "delay_ms": delay_ms,
        "sites": sorted(set(chosen)),
        "pairs": [sorted(p) for p in pairs],
        "queue": queue,
        "delayer": {"pid": record.pid, "start_ticks": record.start_ticks},
        "existing": [],
    }
    _apply(net, state)
    state["latency"]["existing"] = _existing(net, pairs)
    _apply(net, state)
    return {
        "delay_ms": delay_ms,
        "sites": state["latency"]["sites"],
        "existing_connections_delayed": len(state["latency"]["existing"]) // 2,
        "delayer_pid": record.pid,
        "processes_placed": placed,
    }


def remove_latency(net: SiteNetwork) -> dict[str, Any]:
    """Stop delaying (other network faults stay): rules first, then the delayer releases what it
    holds and exits. Idempotent."""
    state = read_state(net.run_dir)
    latency = state.pop("latency", None)
    if latency is None:
        return {"removed": None}
    require_root_tools()
    _apply(net, state)
    _stop_delayer(ProcessRecord(**latency["delayer"]))
    return {"removed": latency["delay_ms"]}


def heal_all(net: SiteNetwork) -> dict[str, Any]:
    """Remove every network fault of the run."""
    return {"partition": heal_partition(net), "latency": remove_latency(net)}


def _start_delayer(run_dir: Path, queue: int, delay_ms: int, lifetime_s: int) -> ProcessRecord:
    directory = Path(run_dir) / "chaos"
    directory.mkdir(parents=True, exist_ok=True)
    log = Path(run_dir) / "logs" / "netdelay.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    ready = directory / "netdelay.ready"
    ready.unlink(missing_ok=True)
    argv = [
        sys.executable,
        "-m",
        "watertight.chaos.netdelay",
        "--queue",
        str(queue),
        "--delay-ms",
        str(delay_ms),
        "--lifetime-s",
        str(lifetime_s),
        "--ready-file",
        str(ready),
    ]
    record = processes.spawn(argv, directory, log, {}, False)
    deadline = time.monotonic() + DELAYER_START_TIMEOUT_S
    while not ready.exists():
        if not processes.alive(record):
            raise NetworkFaultError(f"the delayer exited while starting; read {log}")
        if time.monotonic() > deadline:
            processes.stop_tree(record, [], DELAYER_STOP_TIMEOUT_S, hard=True)
            raise NetworkFaultError(
                f"the delayer did not bind queue {queue} within {DELAYER_START_TIMEOUT_S:.0f} s; read {log}"
            )
        time.sleep(0.05)
    return record


def _stop_delayer(record: ProcessRecord) -> None:
    if processes.alive(record):
        # SIGTERM: it accepts every packet it holds before it unbinds (unbinding drops them)
        processes.signal_pids([record.pid], signal.SIGTERM)
        if processes.wait_gone([record.pid], DELAYER_STOP_TIMEOUT_S):
            processes.stop_tree(record, [], DELAYER_STOP_TIMEOUT_S, hard=True)
