"""PostgreSQL process control: one server, one data directory, one PID.

Owns: finding the PostgreSQL binaries, initialising a data directory, starting a postmaster with
its settings on the command line, waiting until it accepts connections, creating databases and
stopping it again. Tests use it directly; the local runtime reuses it for anything Patroni does
not manage.

Must never: signal a process it cannot prove is this server's postmaster (no killing by name, no
process-group kills: only the PID it spawned or the PID in this data directory's postmaster.pid),
run PostgreSQL as root (when we are root every PostgreSQL program runs as `service_user()`), or
wait without a bound.
"""

from __future__ import annotations

import logging
import os
import pwd
import random
import re
import signal
import socket
import stat
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

log = logging.getLogger(__name__)

POSTGRESQL_LIB_DIR = Path("/usr/lib/postgresql")
SUPERUSER = "postgres"
SERVICE_USER = "postgres"

# a unix socket path longer than this does not fit into sockaddr_un.sun_path
SOCKET_PATH_LENGTH_MAX = 107

STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

INITDB_TIMEOUT_S = 120.0
PSQL_TIMEOUT_S = 60.0


def pg_bindir() -> Path:
    """The bin directory of the newest PostgreSQL installed from Debian's packages."""
    candidates: list[tuple[tuple[int, ...], Path]] = []
    for initdb in POSTGRESQL_LIB_DIR.glob("*/bin/initdb"):
        version = initdb.parent.parent.name
        if re.fullmatch(r"\d+(\.\d+)*", version):
            candidates.append((tuple(int(part) for part in version.split(".")), initdb.parent))
    if not candidates:
        raise RuntimeError(
            f"PostgreSQL server binaries not found (no {POSTGRESQL_LIB_DIR}/<version>/bin/initdb); "
            "install them with `apt-get install postgresql` (or run `make venv`, which does)"
        )
    return max(candidates)[1]


def service_user() -> str | None:
    """The unprivileged user PostgreSQL runs as when we are root; None when we are not root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        raise RuntimeError(
            f"running as root, and PostgreSQL refuses to run as root, but there is no '{SERVICE_USER}' "
            "user to run it as; `apt-get install postgresql` creates it (or run as an unprivileged user)"
        ) from None
    return SERVICE_USER


# where free_port looks: below the kernel's ephemeral range (32768-60999 by default), from which
# the client end of every connection on 127.0.0.1 takes its port, and apart from the topologies'
# ports (1xxxx from 12379 up, and the test topologies' 2xxxx-5xxxx), above the kubelet's and
# kube-proxy's (10248-10259)
FREE_PORTS = range(10300, 12300)
FREE_PORT_TRIES = 100
_issued: set[int] = set()  # never handed out twice by one process: the server may not have bound it yet
_issued_lock = threading.Lock()


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody holds right now, outside the ephemeral range: a port the kernel picks
    for a bind to 0 is one a client's connection may take before the server binds it (another
    process may still take it later). This process never gets one port twice. Falls back to the
    kernel's pick after ``FREE_PORT_TRIES``."""
    for port in random.sample(FREE_PORTS, FREE_PORT_TRIES):
        with _issued_lock:
            if port in _issued:
                continue
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
                try:
                    sock.bind((host, port))
                except OSError:
                    continue
            _issued.add(port)
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        picked: int = sock.getsockname()[1]
        return picked


def service_tempdir(prefix: str = "watertight-pg-") -> Path:
    """A fresh directory under /tmp, mode 0700, owned by the user PostgreSQL runs as."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    give_to_service_user(path, mode=0o700)
    return path


@dataclass
class ServiceAccount:
    name: str
    uid: int
    gid: int
    groups: list[int]
    home: str


def service_account() -> ServiceAccount | None:
    user = service_user()
    if user is None:
        return None
    entry = pwd.getpwnam(user)
    return ServiceAccount(user, entry.pw_uid, entry.pw_gid, os.getgrouplist(user, entry.pw_gid), entry.pw_dir)


def give_to_service_user(path: Path, mode: int) -> None:
    path.chmod(mode)
    account = service_account()
    if account is not None:
        os.chown(path, account.uid, account.gid)


def check_reachable(path: Path, account: ServiceAccount) -> None:
    """Fail early, with a clear sentence, when the service user cannot reach `path`."""
    for directory in [path, *path.parents]:
        if not directory.exists():
            continue
        info = directory.stat()
        if info.st_uid == account.uid:
            allowed = bool(info.st_mode & stat.S_IXUSR)
        elif info.st_gid in account.groups:
            allowed = bool(info.st_mode & stat.S_IXGRP)
        else:
            allowed = bool(info.st_mode & stat.S_IXOTH)
        if not allowed:
            raise RuntimeError(
                f"PostgreSQL runs as '{account.name}', who cannot enter {directory} "
                f"(mode {stat.filemode(info.st_mode)}); put its directories under one it can traverse, "
                "e.g. from watertight.pg.service_tempdir()"
            )


def clean_env(account: ServiceAccount | None) -> dict[str, str]:
    # PG* variables of the caller (PGHOST, PGSSLMODE, ...) would silently redirect our clients
    env = {key: value for key, value in os.environ.items() if not key.startswith("PG")}
    env["LC_ALL"] = "C"
    if account is not None:
        env.update(HOME=account.home, USER=account.name, LOGNAME=account.name)
    return env


def _process_exists(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def log_tail(path: Path | None, lines: int = 20) -> str:
    """The last ``lines`` lines of a log, for an error message ("(no log written)" when there is none)."""
    if path is None:
        return "(no log written)"
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log written)"


@dataclass
class PostgresServer:
    """One PostgreSQL server: a data directory served on one loopback port."""

    datadir: Path
    port: int
    socket_dir: Path
    host: str = "127.0.0.1"
    # tests only: no fsync, no synchronous commit, no full page writes (a crash loses data)
    fast: bool = False
    settings: Mapping[str, str] = field(default_factory=dict)
    log_path: Path | None = None
    _process: subprocess.Popen[bytes] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        # absolute: postgres resolves -D against its cwd, and postmaster.pid records it as given
        self.datadir = Path(self.datadir).absolute()
        self.socket_dir = Path(self.socket_dir).absolute()
        if self.log_path is None:
            self.log_path = self.datadir.with_name(self.datadir.name + ".log")
        self.log_path = Path(self.log_path).absolute()
        socket_path = self.socket_dir / f".s.PGSQL.{self.port}"
        if len(str(socket_path)) > SOCKET_PATH_LENGTH_MAX:
            raise ValueError(
                f"socket path {socket_path} is longer than {SOCKET_PATH_LENGTH_MAX} bytes; use a shorter socket_dir"
            )

    # ---- set-up -------------------------------------------------------------------------------

    def is_initialised(self) -> bool:
        return (self.datadir / "PG_VERSION").exists()

    def initdb(self, no_sync: bool | None = None) -> None:
        """Create the cluster: superuser `postgres`, trust auth on the socket and loopback, UTF8.

        Does nothing when the data directory already holds a cluster. `no_sync` (default: `fast`)
        skips initdb's fsync of the new files.
        """
        if self.is_initialised():
            log.info("postgres %s: already initialised, initdb skipped", self.datadir)
            return
        account = service_account()
        self.datadir.mkdir(parents=False, exist_ok=True)
        give_to_service_user(self.datadir, mode=0o700)
        if account is not None:
            check_reachable(self.datadir, account)
        args = [
            str(pg_bindir() / "initdb"),
            "--pgdata",
            str(self.datadir),
            "--username",
            SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--locale",
            "C",
        ]
        if self.fast if no_sync is None else no_sync:
            args.append("--no-sync")
        log.info("postgres %s: initdb", self.datadir)
        result = self._run(args, account, timeout_s=INITDB_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb of {self.datadir} failed (exit {result.returncode}):\n{result.stdout}"
            )

    def create_database(self, name: str) -> None:
        """Create database `name` unless it exists already."""
        sql = (
            "SELECT format('CREATE DATABASE %I', :'name') "
            "WHERE NOT EXISTS (SELECT FROM pg_database WHERE datname = :'name')\\gexec\n"
        )
        result = self.psql(sql, variables={"name": name})
        if result.returncode != 0 and not self._database_exists(name):
            raise RuntimeError(f"creating database {name!r} on port {self.port} failed:\n{result.stdout}")

    def _database_exists(self, name: str) -> bool:
        result = self.psql("SELECT 1 FROM pg_database WHERE datname = :'name'\n", variables={"name": name})
        return result.returncode == 0 and result.stdout.strip() == "1"

    def psql(
        self, sql: str, dbname: str = "postgres", variables: Mapping[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run `sql` through psql as the superuser over TCP; stops at the first error."""
        args = [str(pg_bindir() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
        for key, value in (variables or {}).items():
            args += ["-v", f"{key}={value}"]
        args += ["-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-d", dbname]
        return subprocess.run(
            args,
            input=sql,
            capture_output=True,
            text=True,
            env=clean_env(None),
            timeout=PSQL_TIMEOUT_S,
            check=False,
        )

    # ---- running ------------------------------------------------------------------------------

    def command(self) -> list[str]:
        """The postmaster's command line: every setting we rely on is on it, none in the datadir."""
        values = {
            "listen_addresses": self.host,
            "port": str(self.port),
            "unix_socket_directories": str(self.socket_dir),
            "max_connections": "200",
            "shared_buffers": "128MB",
            "fsync": "off" if self.fast else "on",
            "synchronous_commit": "off" if self.fast else "on",
            "full_page_writes": "off" if self.fast else "on",
            **self.settings,
        }
        args = [str(pg_bindir() / "postgres"), "-D", str(self.datadir)]
        for key, value in values.items():
            args += ["-c", f"{key}={value}"]
        return args

    def start(self, timeout_s: float = 30.0) -> None:
        """Start the postmaster and return once it accepts connections; no-op when it is running."""
        if self.is_running():
            log.info("postgres %s: already running as PID %s", self.datadir, self.pid)
            return
        if not self.is_initialised():
            raise RuntimeError(f"{self.datadir} holds no PostgreSQL cluster; call initdb() first")
        account = service_account()
        self.socket_dir.mkdir(parents=True, exist_ok=True)
        give_to_service_user(self.socket_dir, mode=0o700)
        if account is not None:
            check_reachable(self.socket_dir, account)
        assert self.log_path is not None
        with open(self.log_path, "ab") as log_file:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=clean_env(account),
                cwd=self.datadir,
                # Ctrl-C in the terminal must not reach it: whoever started it stops it
                start_new_session=True,
                user=account.uid if account else None,
                group=account.gid if account else None,
                # drop root's supplementary groups too, not only uid and gid
                extra_groups=account.groups if account else None,
            )
        log.info("postgres %s: started PID %d on port %d", self.datadir, self._process.pid, self.port)
        try:
            self._wait_ready(timeout_s)
        except BaseException:
            self.stop(mode="immediate")
            raise

    def _wait_ready(self, timeout_s: float) -> None:
        assert self._process is not None
        pg_isready = str(pg_bindir() / "pg_isready")
        args = [pg_isready, "-q", "-h", self.host, "-p", str(self.port), "-U", SUPERUSER, "-t", "1"]
        deadline = time.monotonic() + timeout_s
        while True:
            if self._process.poll() is not None:
                raise RuntimeError(
                    f"postgres {self.datadir} exited with code {self._process.returncode} while starting; "
                    f"the end of {self.log_path}:\n{log_tail(self.log_path)}"
                )
            ready = subprocess.run(args, env=clean_env(None), timeout=10, check=False)
            if ready.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"postgres {self.datadir} did not accept connections on port {self.port} within "
                    f"{timeout_s:.0f} s; the end of {self.log_path}:\n"
                    f"{log_tail(self.log_path)}"
                )
            time.sleep(0.1)

    @property
    def pid(self) -> int | None:
        """The postmaster's PID: the one we spawned, else the one this datadir records, if alive."""
        if self._process is not None and self._process.poll() is None:
            return self._process.pid
        return self._recorded_pid()

    def _recorded_pid(self) -> int | None:
        try:
            lines = (self.datadir / "postmaster.pid").read_text().splitlines()
        except (FileNotFoundError, PermissionError):
            return None
        if len(lines) < 2 or not lines[0].strip().isdigit():
            return None
        pid = int(lines[0])
        # guard against a recycled PID: it must be a postgres serving this very directory
        try:
            comm = Path(f"/proc/{pid}/comm").read_text().strip()
        except FileNotFoundError:
            return None
        if comm not in ("postgres", "postmaster") or Path(lines[1]).resolve() != self.datadir.resolve():
            return None
        return pid if _process_exists(pid) else None

    def is_running(self) -> bool:
        return self.pid is not None

    def stop(self, mode: str = "fast", timeout_s: float = 60.0) -> None:
        """Stop the postmaster (PostgreSQL's smart/fast/immediate shutdown) and wait until it is gone.

        Escalates once to an immediate shutdown, then to SIGKILL of the postmaster PID, each after
        `timeout_s`; never signals any other process.
        """
        if mode not in STOP_SIGNALS:
            raise ValueError(f"unknown stop mode {mode!r}; use one of {', '.join(STOP_SIGNALS)}")
        pid = self.pid
        if pid is None:
            self._reap()
            return
        steps = [(mode, STOP_SIGNALS[mode])]
        if mode != "immediate":
            steps.append(("immediate", signal.SIGQUIT))
        steps.append(("kill", signal.SIGKILL))
        for step, signum in steps:
            log.info("postgres %s: %s shutdown of PID %d", self.datadir, step, pid)
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                break
            if self._wait_gone(pid, timeout_s):
                break
            log.warning(
                "postgres %s: PID %d still there after %.0f s of %s", self.datadir, pid, timeout_s, step
            )
        self._reap()
        if _process_exists(pid):
            raise RuntimeError(f"postgres PID {pid} ({self.datadir}) survived SIGKILL")

    def _wait_gone(self, pid: int, timeout_s: float) -> bool:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process is not None and self._process.pid == pid:
                try:
                    self._process.wait(timeout=0.05)
                    return True
                except subprocess.TimeoutExpired:
                    continue
            if not _process_exists(pid):
                return True
            time.sleep(0.05)
        return False

    def _reap(self) -> None:
        if self._process is not None:
            if self._process.poll() is not None:
                self._process = None

    # ---- addresses ----------------------------------------------------------------------------

    def dsn(self, dbname: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@{self.host}:{self.port}/{dbname}"

    # ---- helpers ------------------------------------------------------------------------------

    def _run(
        self, args: Sequence[str], account: ServiceAccount | None, timeout_s: float
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=clean_env(account),
            cwd="/",
            timeout=timeout_s,
            check=False,
            user=account.uid if account else None,
            group=account.gid if account else None,
            extra_groups=account.groups if account else None,
        )


def verify_full(root_cert: str) -> dict[str, str]:
    """libpq's parameters for a client that verifies the server: signed by the CA in
    ``root_cert``, for the address dialled."""
    return {"sslmode": "verify-full", "sslrootcert": root_cert}


def connect_superuser(
    host: str, port: int, password: str, timeout_s: int, root_cert: str | None = None
) -> psycopg.Connection[Any]:
    """A psycopg autocommit connection as the superuser to the ``postgres`` database of a member
    (probes and runbook steps that ask a member about itself or change its settings). With
    ``root_cert`` (the target's ``root_cert``) over TLS, the server verified
    (``verify-full``); without, in clear."""
    tls: dict[str, Any] = verify_full(root_cert) if root_cert else {"sslmode": "disable"}
    return psycopg.connect(
        host=host,
        port=port,
        user=SUPERUSER,
        password=password,
        dbname="postgres",
        connect_timeout=timeout_s,
        autocommit=True,
        **tls,
    )
