"""Processes by PID: spawn detached, tell whether a recorded PID is still the process we started,
find its descendants, signal them, and measure their memory.

Owns: everything that touches /proc. Never: find or signal a process by name.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from watertight import pg

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class ProcessRecord:
    """A process we started: its PID and the kernel's start time, so a reused PID is not ours."""

    pid: int
    start_ticks: int


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            data = handle.read()
    except OSError:
        return None
    # the command name may hold spaces and parentheses: split after the last ')'
    return data[data.rfind(")") + 2 :].split()


def start_ticks(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def state_of(pid: int) -> str | None:
    """The kernel's state letter: R, S, T (stopped: frozen), Z (zombie), ... or None if gone."""
    fields = _stat_fields(pid)
    return fields[0] if fields else None


def cpu_seconds(pid: int) -> float | None:
    """CPU seconds so far of a process: user and system time, and that of its children already
    reaped (PostgreSQL backends that exited); None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            fields = handle.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return sum(int(value) for value in fields[11:15]) / CLOCK_TICKS


def alive(record: ProcessRecord) -> bool:
    """The recorded process still exists (a zombie counts as gone)."""
    return start_ticks(record.pid) == record.start_ticks and state_of(record.pid) not in (None, "Z", "X")


def frozen(record: ProcessRecord) -> bool:
    return alive(record) and state_of(record.pid) in STOPPED_STATES


STOPPED_STATES = ("T", "t")
SIGNAL_SETTLE_S_MAX = 2.0


def wait_stopped(pids: list[int], stopped: bool, timeout_s: float = SIGNAL_SETTLE_S_MAX) -> list[int]:
    """Wait (bounded) until every live PID is stopped (``stopped``) or running again: a signal is
    delivered asynchronously, so right after SIGSTOP a busy process may still show R. Returns the
    PIDs that had not settled when the wait ended."""
    deadline = time.monotonic() + timeout_s
    while True:
        pending = []
        for pid in pids:
            state = state_of(pid)
            if state in (None, "Z", "X"):
                continue
            if (state in STOPPED_STATES) != stopped:
                pending.append(pid)
        if not pending or time.monotonic() >= deadline:
            return pending
        time.sleep(0.01)


def children_map() -> dict[int, list[int]]:
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat_fields(int(name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(name))
    return parents


def descendants(pid: int, tree: dict[int, list[int]] | None = None) -> list[int]:
    tree = tree if tree is not None else children_map()
    found: list[int] = []
    stack = list(tree.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(tree.get(child, []))
    return found


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", encoding="ascii") as handle:
            return int(handle.read().split()[1]) * PAGE_BYTES
    except (OSError, IndexError, ValueError):
        return 0


def signal_pids(pids: list[int], sig: int) -> list[int]:
    """Send ``sig`` to each PID; returns those it reached."""
    reached = []
    for pid in pids:
        try:
            os.kill(pid, sig)
            reached.append(pid)
        except ProcessLookupError:
            pass
    return reached


def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait until none of ``pids`` exists (reaping our own children); returns those left."""
    deadline = time.monotonic() + timeout_s
    left = list(pids)
    while left and time.monotonic() < deadline:
        for pid in list(left):
            try:
                waited, _ = os.waitpid(pid, os.WNOHANG)
                if waited == pid:
                    left.remove(pid)
                    continue
            except ChildProcessError:
                pass
            if state_of(pid) in (None, "Z", "X"):
                left.remove(pid)
        if left:
            time.sleep(0.05)
    return left


def spawn(
    argv: list[str], cwd: Path, log_path: Path, env: dict[str, str], as_service_user: bool
) -> ProcessRecord:
    """Start a detached process (own session, so a terminal's Ctrl-C does not reach it)."""
    account = pg.service_account() if as_service_user else None
    base_env = pg.clean_env(account) if as_service_user else dict(os.environ)
    with open(log_path, "ab") as log:
        process = subprocess.Popen(
            argv,
            cwd=cwd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**base_env, **env},
            start_new_session=True,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=account.groups if account else None,
        )
    ticks = start_ticks(process.pid)
    assert ticks is not None, f"process {argv[0]} vanished at once; see {log_path}"
    return ProcessRecord(process.pid, ticks)


def stop_tree(record: ProcessRecord, extra_pids: list[int], timeout_s: float, hard: bool = False) -> None:
    """Stop a process and its descendants: SIGTERM and a bounded wait, then SIGKILL; ``hard``
    starts with SIGKILL (the loss of a machine)."""
    if not alive(record):
        signal_pids(extra_pids, signal.SIGKILL)
        wait_gone(extra_pids, timeout_s)
        return
    pids = [record.pid, *descendants(record.pid), *extra_pids]
    if hard:
        signal_pids(pids, signal.SIGCONT)  # a frozen process must be able to die
        signal_pids(pids, signal.SIGKILL)
        wait_gone(pids, timeout_s)
        return
    signal_pids(pids, signal.SIGCONT)
    signal_pids([record.pid], signal.SIGTERM)
    left = wait_gone([record.pid], timeout_s)
    rest = [pid for pid in pids if state_of(pid) not in (None, "Z", "X")]
    if left or rest:
        signal_pids(rest, signal.SIGKILL)
        wait_gone(rest, timeout_s)


def cmdline(pid: int) -> str:
    """A process's command line, arguments joined by spaces ('' when it is gone or a kernel thread)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def pids_mentioning(text: str) -> list[int]:
    """Every live process whose command line contains ``text`` (e.g. a run directory: a process
    of the run that outlived its component). Never this process."""
    me = os.getpid()
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit() and int(name) != me and text in cmdline(int(name)):
            if state_of(int(name)) not in (None, "Z", "X"):
                found.append(int(name))
    return found


def _listening_inodes(addresses: set[tuple[str, int]]) -> dict[int, tuple[str, int]]:
    """Socket inodes of TCP listeners on any of ``addresses`` (IPv4; 0.0.0.0 counts for every
    address of its port)."""
    ports = {port for _, port in addresses}
    inodes: dict[int, tuple[str, int]] = {}
    try:
        lines = Path("/proc/net/tcp").read_text().splitlines()[1:]
    except OSError:
        return inodes
    for line in lines:
        fields = line.split()
        if len(fields) < 10 or fields[3] != "0A":  # 0A: LISTEN
            continue
        hex_address, hex_port = fields[1].split(":")
        port = int(hex_port, 16)
        if port not in ports:
            continue
        address = ".".join(str(b) for b in bytes.fromhex(hex_address)[::-1])
        if (address, port) in addresses or address == "0.0.0.0":
            inodes[int(fields[9])] = (address, port)
    return inodes


def listeners(addresses: set[tuple[str, int]]) -> dict[tuple[str, int], list[int]]:
    """Which processes listen on which of ``addresses`` (``(ip, port)``), from /proc/net/tcp and
    each process's open sockets. Processes whose descriptors we may not read are not seen."""
    inodes = _listening_inodes(addresses)
    found: dict[tuple[str, int], list[int]] = {}
    if not inodes:
        return found
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            fds = os.listdir(f"/proc/{name}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{name}/fd/{fd}")
            except OSError:
                continue
            if target.startswith("socket:["):
                inode = int(target[8:-1])
                if inode in inodes:
                    pids = found.setdefault(inodes[inode], [])
                    if int(name) not in pids:
                        pids.append(int(name))
    return found


def stop_load_generator(process: subprocess.Popen[bytes], timeout_s: float) -> list[str]:
    """Stop a Locust run we started so it writes its CSV, HTML and summary: SIGINT (Locust's
    Ctrl-C: the HTML report too), then SIGTERM (its own handler, run from gevent's hub: everything
    but the HTML report) when SIGINT did nothing within ``timeout_s``, then SIGKILL after as long
    again. SIGINT alone is not enough: once in a while Locust never acts on it (seen twice under
    load: nothing logged after it). Returns what had to be done beyond SIGINT, for the caller to say."""
    escalated: list[str] = []
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL)
    for number, sig in enumerate(signals):
        if process.poll() is not None:
            break
        if number:
            escalated.append(f"no exit within {timeout_s:g} s of {signals[number - 1].name}: sent {sig.name}")
        process.send_signal(sig)
        try:
            process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
    return escalated
