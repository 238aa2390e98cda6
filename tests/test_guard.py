"""The member guard (watertight.runtime.guard) with a stand-in Patroni and a stand-in postmaster:
whatever happens to Patroni or to the guard itself, the member's PostgreSQL does not outlive it.
Real Patroni and PostgreSQL under the guard are exercised by tests/test_member_faults.py."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from watertight.runtime import guard, processes

WAIT_S = 10.0

# Patroni as the guard sees it: it writes Ctimeout=1 and a keepalive every 0.2 s to the watchdog
# pipe, starts a "postmaster" detached (its own session, its parent exits at once, as Patroni's
# multiprocessing launcher does) that writes postmaster.pid, and on SIGTERM disarms the watchdog
# and exits without stopping it (so the guard has something to fence)
FAKE_PATRONI = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    fifo, data_dir, postgres = sys.argv[1], sys.argv[2], sys.argv[3]
    failures = os.path.join(os.path.dirname(data_dir), "fail-starts")  # exit 1 at start this many times
    if os.path.exists(failures) and int(open(failures).read()) > 0:
        left = int(open(failures).read())
        open(failures, "w").write(str(left - 1))
        sys.exit(1)
    if os.fork() == 0:
        os.setsid()
        child = subprocess.Popen([postgres, "-c", "import time; time.sleep(600)", "-D", data_dir],
                                 executable=sys.executable)
        with open(os.path.join(data_dir, "postmaster.pid"), "w") as handle:
            handle.write(f"{child.pid}\\n{data_dir}\\n")
        os._exit(0)
    watchdog = os.open(fifo, os.O_WRONLY)
    os.write(watchdog, b"Ctimeout=1\\n")
    def stop(*_):
        os.write(watchdog, b"V")
        os._exit(0)
    signal.signal(signal.SIGTERM, stop)
    while True:
        os.write(watchdog, b"1")
        time.sleep(0.2)
    """
)


@dataclass
class Member:
    guard: subprocess.Popen[bytes]
    directory: Path
    log: Path

    @property
    def pid_file(self) -> Path:
        return self.directory / "data" / "postmaster.pid"

    def postmaster(self) -> int | None:
        return guard.postmaster_pid(self.pid_file)

    def role_pids(self, role: str) -> list[int]:
        found = []
        for pid in processes.descendants(self.guard.pid):
            line = processes.cmdline(pid)
            if role == "patroni" and "fake_patroni.py" in line:
                found.append(pid)
            if role == "keeper" and "--keeper" in line:
                found.append(pid)
        return found

    def text(self) -> str:
        return self.log.read_text()


def wait_for(what: str, check: object, timeout_s: float = WAIT_S) -> None:
    assert callable(check)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout_s:g} s: {what}")


def gone(pid: int) -> bool:
    return processes.state_of(pid) in (None, "Z", "X")


def start_guard(tmp_path: Path) -> Member:
    """The guard over the stand-in Patroni in ``tmp_path`` (its log: member.log)."""
    (tmp_path / "data").mkdir(exist_ok=True)
    script = tmp_path / "fake_patroni.py"
    script.write_text(FAKE_PATRONI)
    postgres = str(tmp_path / "bin" / "postgres")  # only its name: argv[0] of the stand-in
    log = tmp_path / "member.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            [
                sys.executable, "-m", "watertight.runtime.guard", "--watchdog", str(tmp_path / "watchdog"),
                "--pid-file", str(tmp_path / "data" / "postmaster.pid"), "--",
                sys.executable, str(script), str(tmp_path / "watchdog"), str(tmp_path / "data"), postgres,
            ],
            stdout=out, stderr=subprocess.STDOUT, cwd=tmp_path, start_new_session=True,
        )  # fmt: skip
    return Member(process, tmp_path, log)


@pytest.fixture
def member(tmp_path: Path) -> Iterator[Member]:
    running = start_guard(tmp_path)
    try:
        wait_for("the stand-in postmaster runs", lambda: running.postmaster() is not None)
        wait_for("the watchdog is armed", lambda: '"armed": true' in _state(tmp_path))
        yield running
    finally:
        leftovers = [running.guard.pid, *processes.descendants(running.guard.pid)]
        if running.postmaster() is not None:
            leftovers.append(running.postmaster() or 0)
        processes.signal_pids([p for p in leftovers if p], signal.SIGKILL)
        running.guard.wait(timeout=WAIT_S)


def _state(directory: Path) -> str:
    try:
        return (directory / guard.STATE_FILE).read_text()
    except FileNotFoundError:
        return ""


def test_postgres_is_fenced_the_moment_patroni_dies_and_the_guard_exits(member: Member) -> None:
    postmaster = member.postmaster()
    assert postmaster is not None
    (patroni,) = member.role_pids("patroni")
    os.kill(patroni, signal.SIGKILL)
    wait_for("the postmaster is fenced", lambda: gone(postmaster), 2.0)
    assert member.guard.wait(timeout=WAIT_S) == 1
    assert "fenced PostgreSQL" in member.text()


def test_killing_the_guard_leaves_neither_patroni_nor_postgres(member: Member) -> None:
    postmaster = member.postmaster()
    assert postmaster is not None
    (patroni,) = member.role_pids("patroni")
    (keeper,) = member.role_pids("keeper")
    os.kill(member.guard.pid, signal.SIGKILL)
    member.guard.wait(timeout=WAIT_S)
    wait_for("Patroni dies with its guard", lambda: gone(patroni), 2.0)
    wait_for("the keeper fences the postmaster", lambda: gone(postmaster), 2.0)
    wait_for("the keeper exits", lambda: gone(keeper), 2.0)
    assert "keeper: the guard" in member.text()


def test_a_killed_keeper_is_replaced(member: Member) -> None:
    (keeper,) = member.role_pids("keeper")
    os.kill(keeper, signal.SIGKILL)
    wait_for("another keeper runs", lambda: member.role_pids("keeper") not in ([], [keeper]))
    postmaster = member.postmaster()
    os.kill(member.guard.pid, signal.SIGKILL)
    member.guard.wait(timeout=WAIT_S)
    assert postmaster is not None
    wait_for("the new keeper fences the postmaster", lambda: gone(postmaster), 2.0)


def test_a_leading_patroni_that_goes_silent_is_reset_by_its_watchdog(member: Member) -> None:
    postmaster = member.postmaster()
    (patroni,) = member.role_pids("patroni")
    assert postmaster is not None
    os.kill(patroni, signal.SIGSTOP)  # frozen: no keepalive while the watchdog is armed
    wait_for("the postmaster is fenced after the 1 s timeout", lambda: gone(postmaster), 5.0)
    wait_for("Patroni is started again", lambda: member.role_pids("patroni") not in ([], [patroni]))
    assert gone(patroni)
    assert member.guard.poll() is None
    assert "sent no keepalive" in member.text()


def test_a_stop_stops_patroni_and_fences_what_it_left_running(member: Member) -> None:
    postmaster = member.postmaster()
    assert postmaster is not None
    member.guard.send_signal(signal.SIGTERM)
    assert member.guard.wait(timeout=WAIT_S) == 0
    assert gone(postmaster)
    assert not processes.descendants(member.guard.pid)
    assert "asked to stop" in member.text()


def test_a_patroni_that_fails_to_start_is_started_again(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Patroni 4.1 exits with 1 when etcd stops answering while it starts (its site cut off): the
    guard starts it again, as a supervisor with Restart=on-failure would, instead of leaving the
    member down after the partition heals."""
    (tmp_path / "fail-starts").write_text("2")
    started = time.monotonic()
    member: Member = request.getfixturevalue("member")  # runs once its third start succeeds
    assert member.guard.poll() is None
    assert member.text().count("a start that failed") == 2
    assert time.monotonic() - started >= 2 * guard.START_RETRY_DELAY_S


def test_a_guard_asked_to_stop_while_it_waits_to_start_patroni_again_stops(tmp_path: Path) -> None:
    (tmp_path / "fail-starts").write_text("1000")  # Patroni never starts
    member = start_guard(tmp_path)
    try:
        wait_for("a failed start", lambda: "a start that failed" in member.text())
        member.guard.send_signal(signal.SIGTERM)
        assert member.guard.wait(timeout=WAIT_S) == 0
        assert member.text().count("a start that failed") <= 2
    finally:
        if member.guard.poll() is None:
            member.guard.kill()
            member.guard.wait(timeout=WAIT_S)


def test_the_watchdog_reads_what_patronis_testing_driver_writes() -> None:
    dog = guard.Watchdog()
    dog.feed(b"Ctime", 1.0)
    assert not dog.armed  # half a command waits for the rest
    dog.feed(b"out=15\n1", 2.0)
    assert dog.armed and dog.timeout_s == 15 and dog.last_keepalive == 2.0
    assert not dog.expired(16.0) and dog.expired(17.5)
    dog.feed(b"1", 17.0)
    assert not dog.expired(17.5)
    dog.feed(b"V", 18.0)  # magic close: disarmed, never expires
    assert not dog.armed and not dog.expired(100.0)


def test_a_pid_file_naming_another_program_is_never_fenced(tmp_path: Path) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        (tmp_path / "postmaster.pid").write_text(f"{sleeper.pid}\n{tmp_path}\n")
        assert guard.postmaster_pid(tmp_path / "postmaster.pid") is None
        assert guard.fence(tmp_path / "postmaster.pid") == []
        assert sleeper.poll() is None
    finally:
        sleeper.kill()
        sleeper.wait()
