"""The member guard: a PostgreSQL never outlives its Patroni, locally as on a host with a watchdog.

``python -m watertight.runtime.guard --watchdog FIFO --pid-file PGDATA/postmaster.pid -- PATRONI ARGV``
is the process the runtime starts for a cell member (its PID is the component's); in a pod it is
the container's command (``python /opt/watertight/guard.py ...``: it needs nothing but the
standard library), so the pod model gives the same guarantees. It runs Patroni
as its child and PostgreSQL ends up its child too (it is the child subreaper, so the postmaster
Patroni starts detached is reparented to it), and it is the watchdog device Patroni is configured
with (Patroni's ``testing`` watchdog driver writes ``Ctimeout=N``, a ``1`` per keepalive and ``V``
when it disarms to a named pipe). It fences the member's PostgreSQL (SIGSTOP the postmaster, list
its children, SIGKILL them all, as Patroni's own kill does):

- the moment Patroni exits for any reason while PostgreSQL still runs (a crash, the OOM killer,
  an operator's ``kill -9``), then exits itself: the member is down, as a host whose Patroni
  crashed with ``Restart=no``;
- when Patroni armed the watchdog (it leads) and sent no keepalive for the timeout it set
  (ttl // 2 here: Patroni is frozen or hung while its leader key still runs out), then kills
  Patroni too and starts it again, as a host the watchdog reset boots again (bounded: at most
  ``RESETS_MAX`` resets in ``RESET_WINDOW_S``, then it stays down);
- when Patroni fails (exits with a code above 0, not by a signal) while PostgreSQL is not running:
  a start that failed, as Patroni 4.1 exits when etcd stops answering between its client's start and
  its lease (a member started again during a partition of its site). It starts Patroni again after
  ``START_RETRY_DELAY_S``, as systemd's ``Restart=on-failure`` or a pod's restart policy would,
  bounded: at most ``START_RETRIES_MAX`` such failures in ``START_RETRY_WINDOW_S``, then it stays
  down. Without this a watchdog reset during a partition left the member down for good;
- when the guard itself is killed: Patroni dies with it (PR_SET_PDEATHSIG, SIGKILL) and the
  keeper, a small child whose parent-death signal is SIGTERM, fences PostgreSQL and exits.

SIGTERM or SIGINT stop the member cleanly: Patroni is asked to stop (it stops PostgreSQL), and
whatever still runs after ``STOP_TIMEOUT_S`` is fenced. ``guard.json`` beside the pipe says what
it runs. Owns: the member's process tree and the watchdog pipe. Never: signal a process that is not Patroni, the keeper or the member's own
postmaster and its children; wait without a bound; import anything heavy (one runs per member).
"""

from __future__ import annotations

import argparse
import ctypes
import errno
import json
import os
import select
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
POLL_S = 0.2
STOP_TIMEOUT_S = 15.0
FENCE_WAIT_S = 5.0
RESETS_MAX = 5
RESET_WINDOW_S = 600.0
RESTART_DELAY_S = 1.0
START_RETRIES_MAX = 60
START_RETRY_WINDOW_S = 600.0
START_RETRY_DELAY_S = 2.0
STATE_FILE = "guard.json"


def log(message: str) -> None:
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())
    print(f"{stamp} UTC guard[{os.getpid()}]: {message}", flush=True)


def _prctl(option: int, value: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(option, value, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl({option}): {os.strerror(code)}")


def _die_with_parent(sig: int, parent: int) -> None:
    """In a child before exec: receive ``sig`` when the guard dies; if it died already, now."""
    _prctl(PR_SET_PDEATHSIG, sig)
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


# ---- /proc ----------------------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rfind(")") + 2 :].split()


def _running(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (by parent links in /proc)."""
    parents: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = _stat(int(name))
            if fields:
                parents.setdefault(int(fields[1]), []).append(int(name))
    found: list[int] = []
    stack = list(parents.get(pid, []))
    while stack:
        child = stack.pop()
        found.append(child)
        stack.extend(parents.get(child, []))
    return found


def postmaster_pid(pid_file: Path) -> int | None:
    """The postmaster the member's data directory names, if that process is a postgres running on
    that data directory (a stale file, or a PID reused by another program, is not fenced)."""
    try:
        lines = pid_file.read_text().splitlines()
        pid = int(lines[0])
        data_dir = lines[1]
    except (OSError, ValueError, IndexError):
        return None
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if not argv or not argv[0].endswith(b"postgres") or data_dir.encode() not in argv:
        return None
    return pid if _running(pid) else None


def fence(pid_file: Path) -> list[int]:
    """Stop the member's PostgreSQL at once, as Patroni does when it must: freeze the postmaster
    (it forks no more), list its children, SIGKILL all of them. Returns the PIDs signalled."""
    pid = postmaster_pid(pid_file)
    if pid is None:
        return []
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        return []
    victims = [pid, *_children_of(pid)]
    for victim in victims:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + FENCE_WAIT_S
    while any(_running(victim) for victim in victims) and time.monotonic() < deadline:
        time.sleep(0.01)
    return victims


# ---- the keeper -----------------------------------------------------------------------------------


def keeper(pid_file: Path, guard_pid: int) -> int:
    """A child of the guard that fences PostgreSQL when the guard dies (its parent-death signal),
    and exits. Exits quietly on SIGUSR1 (the guard stopping cleanly)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl-C is the guard's to handle
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGTERM, signal.SIGUSR1])
    _die_with_parent(signal.SIGTERM, guard_pid)
    while True:
        info = signal.sigtimedwait([signal.SIGTERM, signal.SIGUSR1], 1.0)
        if info is not None and info.si_signo == signal.SIGUSR1:
            return 0
        if info is not None or os.getppid() != guard_pid:
            break
    victims = fence(pid_file)
    if victims:
        log(f"keeper: the guard (PID {guard_pid}) is gone; fenced PostgreSQL: killed PIDs {victims}")
    return 0


# ---- the guard ------------------------------------------------------------------------------------


@dataclass
class Watchdog:
    """What Patroni told its watchdog device (the pipe)."""

    armed: bool = False
    timeout_s: float = 0.0
    last_keepalive: float = 0.0
    pending: bytes = b""

    def feed(self, data: bytes, now: float) -> None:
        data = self.pending + data
        self.pending = b""
        index = 0
        while index < len(data):
            char = data[index : index + 1]
            if char == b"C":  # Ctimeout=N\n
                end = data.find(b"\n", index)
                if end < 0:
                    self.pending = data[index:]
                    return
                text = data[index + 1 : end].decode(errors="replace")
                if text.startswith("timeout="):
                    self.timeout_s = float(text.split("=", 1)[1])
                    self.armed = True
                    self.last_keepalive = now
                index = end + 1
                continue
            if char == b"1":
                self.armed = True
                self.last_keepalive = now
            elif char == b"V":
                self.armed = False
            index += 1

    def expired(self, now: float) -> bool:
        return self.armed and self.timeout_s > 0 and now - self.last_keepalive > self.timeout_s


@dataclass
class Guard:
    argv: list[str]
    fifo: Path
    pid_file: Path
    state_dir: Path
    patroni: subprocess.Popen[bytes] | None = None
    keeper: subprocess.Popen[bytes] | None = None
    watchdog: Watchdog = field(default_factory=Watchdog)
    resets: list[float] = field(default_factory=list)
    start_failures: list[float] = field(default_factory=list)
    stopping: bool = False
    fifo_fd: int = -1

    def spawn_patroni(self) -> None:
        me = os.getpid()
        self.patroni = subprocess.Popen(self.argv, preexec_fn=lambda: _die_with_parent(signal.SIGKILL, me))
        self.watchdog = Watchdog()
        log(f"started Patroni, PID {self.patroni.pid}")

    def spawn_keeper(self) -> None:
        me = os.getpid()
        # by its file, not its module: in the patroni image the guard is a lone script
        self.keeper = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--keeper", "--pid-file", str(self.pid_file),
             "--guard-pid", str(me)],
        )  # fmt: skip

    def open_fifo(self) -> None:
        if self.fifo_fd >= 0:
            os.close(self.fifo_fd)
        try:
            os.mkfifo(self.fifo, 0o600)
        except FileExistsError:
            pass
        # a reader is always there, so Patroni's open for writing never blocks
        self.fifo_fd = os.open(self.fifo, os.O_RDONLY | os.O_NONBLOCK)

    def write_state(self) -> None:
        state = {
            "guard_pid": os.getpid(),
            "patroni_pid": self.patroni.pid if self.patroni and self.patroni.poll() is None else None,
            "keeper_pid": self.keeper.pid if self.keeper and self.keeper.poll() is None else None,
            "watchdog": {
                "armed": self.watchdog.armed,
                "timeout_s": self.watchdog.timeout_s,
                "keepalive_age_s": round(time.monotonic() - self.watchdog.last_keepalive, 1)
                if self.watchdog.armed
                else None,
            },
            "resets": len(self.resets),
        }
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(self.state_dir / STATE_FILE)

    def read_fifo(self) -> None:
        while True:
            try:
                data = os.read(self.fifo_fd, 4096)
            except BlockingIOError:
                return
            except OSError as error:
                if error.errno == errno.EAGAIN:
                    return
                raise
            if not data:  # every writer closed: poll would report HUP forever; open afresh
                self.open_fifo()
                return
            self.watchdog.feed(data, time.monotonic())

    def reap(self) -> None:
        """Collect every child that ended (orphans of the member are reparented to us)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for proc in (self.patroni, self.keeper):
                if proc is not None and proc.pid == pid and proc.returncode is None:
                    proc.returncode = os.waitstatus_to_exitcode(status)

    def on_patroni_exit(self) -> tuple[int, list[int]]:
        """Fence what Patroni left running; the guard's exit code and the PIDs fenced."""
        assert self.patroni is not None
        code = self.patroni.returncode
        victims = fence(self.pid_file)
        if self.stopping:
            if victims:
                log(f"Patroni stopped (exit {code}) but PostgreSQL still ran: fenced PIDs {victims}")
            else:
                log(f"Patroni stopped (exit {code}); PostgreSQL is down")
        elif victims:
            log(
                f"Patroni (PID {self.patroni.pid}) exited with {code}: fenced PostgreSQL, killed PIDs {victims}"
            )
        else:
            log(f"Patroni (PID {self.patroni.pid}) exited with {code}; PostgreSQL was not running")
        return (0 if self.stopping else 1), victims

    def retry_failed_start(self) -> bool:
        """After Patroni exited with PostgreSQL not running: start it again if it failed (a code
        above 0) and the budget allows. False when the member stays down."""
        assert self.patroni is not None
        code = self.patroni.returncode
        if self.stopping or code is None or code <= 0:
            return False
        now = time.monotonic()
        self.start_failures = [t for t in self.start_failures if now - t < START_RETRY_WINDOW_S] + [now]
        if len(self.start_failures) > START_RETRIES_MAX:
            log(
                f"Patroni failed {len(self.start_failures)} times within {START_RETRY_WINDOW_S:g} s: staying down"
            )
            return False
        log(
            f"Patroni failed with PostgreSQL not running (a start that failed): starting it again in "
            f"{START_RETRY_DELAY_S:g} s (failure {len(self.start_failures)} of at most {START_RETRIES_MAX})"
        )
        deadline = time.monotonic() + START_RETRY_DELAY_S
        while time.monotonic() < deadline and not self.stopping:
            self.reap()
            time.sleep(POLL_S)
        if self.stopping:
            return False
        self.open_fifo()
        self.spawn_patroni()
        return True

    def watchdog_reset(self) -> bool:
        """Patroni leads but went silent: reset the member as a watchdog resets a host. False when
        it has been reset too often and should stay down."""
        assert self.patroni is not None
        silent_s = time.monotonic() - self.watchdog.last_keepalive
        victims = fence(self.pid_file)
        log(
            f"watchdog: Patroni (PID {self.patroni.pid}) leads but sent no keepalive for {silent_s:.1f} s "
            f"(timeout {self.watchdog.timeout_s:g} s): fenced PostgreSQL (PIDs {victims}) and kill Patroni"
        )
        self.patroni.kill()
        try:
            self.patroni.wait(timeout=FENCE_WAIT_S)
        except subprocess.TimeoutExpired:
            log(f"Patroni (PID {self.patroni.pid}) did not die within {FENCE_WAIT_S:g} s")
        now = time.monotonic()
        self.resets = [t for t in self.resets if now - t < RESET_WINDOW_S] + [now]
        if len(self.resets) > RESETS_MAX:
            log(f"{len(self.resets)} watchdog resets within {RESET_WINDOW_S:g} s: staying down")
            return False
        time.sleep(RESTART_DELAY_S)
        self.open_fifo()
        self.spawn_patroni()
        return True

    def stop(self, _signum: int = 0, _frame: object = None) -> None:
        if not self.stopping and self.patroni is not None and self.patroni.poll() is None:
            log("asked to stop: stopping Patroni")
            self.patroni.send_signal(signal.SIGTERM)
        self.stopping = True

    def run(self) -> int:
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        signal.signal(signal.SIGCHLD, lambda *_: None)  # wakes select early
        self.open_fifo()
        self.spawn_keeper()
        self.spawn_patroni()
        stop_deadline: float | None = None
        code = 1
        try:
            while True:
                try:
                    select.select([self.fifo_fd], [], [], POLL_S)
                except InterruptedError:
                    pass
                self.read_fifo()
                self.reap()
                assert self.patroni is not None
                if self.patroni.returncode is not None:
                    code, fenced = self.on_patroni_exit()
                    if code != 0 and not fenced and self.retry_failed_start():
                        continue
                    code = 0 if self.stopping else code  # asked to stop while it waited to retry
                    break
                if self.keeper is not None and self.keeper.returncode is not None and not self.stopping:
                    log(
                        f"the keeper (PID {self.keeper.pid}) exited with {self.keeper.returncode}; starting another"
                    )
                    self.spawn_keeper()
                if self.stopping:
                    stop_deadline = stop_deadline or time.monotonic() + STOP_TIMEOUT_S
                    if time.monotonic() > stop_deadline:
                        log(f"Patroni did not stop within {STOP_TIMEOUT_S:g} s: killing it")
                        self.patroni.kill()
                elif self.watchdog.expired(time.monotonic()) and not self.watchdog_reset():
                    code = 1
                    break
                self.write_state()
        finally:
            self.shutdown()
        return code

    def shutdown(self) -> None:
        """Leave nothing behind: Patroni, PostgreSQL, the keeper and any orphan reparented to us."""
        if self.patroni is not None and self.patroni.poll() is None:
            self.patroni.kill()
        fence(self.pid_file)
        if self.keeper is not None and self.keeper.poll() is None:
            self.keeper.send_signal(signal.SIGUSR1)
        left = _children_of(os.getpid())
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + FENCE_WAIT_S
        while time.monotonic() < deadline:
            self.reap()
            if not _children_of(os.getpid()):
                break
            time.sleep(0.02)
        try:
            (self.state_dir / STATE_FILE).unlink()
        except FileNotFoundError:
            pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m watertight.runtime.guard", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--pid-file", required=True, type=Path, help="the member's PGDATA/postmaster.pid")
    parser.add_argument("--watchdog", type=Path, help="the named pipe Patroni's watchdog writes to")
    parser.add_argument("--keeper", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--guard-pid", type=int, help=argparse.SUPPRESS)
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then Patroni's command line")
    args = parser.parse_args(argv)
    if args.keeper:
        return keeper(args.pid_file, args.guard_pid)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command or args.watchdog is None:
        parser.error("give --watchdog FIFO and, after --, the command line of Patroni")
    guard = Guard(command, args.watchdog, args.pid_file, args.watchdog.parent)
    return guard.run()


if __name__ == "__main__":
    sys.exit(main())
