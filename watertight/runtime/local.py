"""The local runtime: every site of the topology as processes on this machine.

Owns: the run directory (state, secrets, configs, data, one log per component), starting the
components stage by stage with bounded waits, status, fault control by PID, and down.
Never: signal a process it did not start (PIDs are checked against their recorded start time),
or leave a wait unbounded. One line per decision, so an operator can read what happened.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import logging
import os
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cardcore.platform import auth

from watertight import pg, private_files, render, tls
from watertight.chaos import network
from watertight.monitoring import config as monitoring_config
from watertight.runtime import processes
from watertight.runtime.common import cell_not_steady, cell_view_of, writers_in_flight
from watertight.runtime.processes import ProcessRecord
from watertight.runtime.target import Alerting, Member
from watertight.topology import CENTERS, Topology, parse

REPO_ROOT = Path(__file__).resolve().parent.parent.parent
RUN_DIR_DEFAULT = REPO_ROOT / "run"
STAGE_TIMEOUT_S = 90.0
TARGETS_UP_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
STOP_PARALLEL_MAX = 16  # components of one stage stopped at once
HTTP_TIMEOUT_S = 1.0

Progress = Callable[[str], None]

log = logging.getLogger(__name__)


class RuntimeError_(RuntimeError):
    """A step of the runtime failed; the message says what and what to do next."""


# the source address of a connection between two loopback addresses made in the root namespace
LOOPBACK_SOURCE = "127.0.0.1"


def _quiet(_: str) -> None:
    pass


def http_json(
    url: str,
    timeout_s: float = HTTP_TIMEOUT_S,
    headers: dict[str, str] | None = None,
    ca_file: str | None = None,
) -> tuple[int, Any]:
    """GET a JSON document; (status, body) with status 0 when nothing answered (or an ``https://``
    server did not verify against ``ca_file``, the run's CA: ``Target.root_cert()``). ``headers``:
    e.g. the core's ``Authorization`` (``LocalRuntime.client_tokens().headers(...)``)."""
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(
            request, timeout=timeout_s, context=tls.context_for(url, ca_file)
        ) as response:
            data = response.read()
            try:
                return response.status, json.loads(data or b"null")
            except ValueError:  # an answer that is not JSON (Prometheus' /-/ready): its status counts
                return response.status, None
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None
    except (OSError, ValueError):
        return 0, None


def _view_leader(view: list[dict[str, Any]]) -> dict[str, Any] | None:
    return next((m for m in view if m.get("role") in ("leader", "standby_leader")), None)


def choose_view(
    views: list[list[dict[str, Any]]], claims_primary: Callable[[dict[str, Any]], bool]
) -> list[dict[str, Any]]:
    """The members' views of one cluster reduced to the one to believe.

    A member cut off from the consensus quorum keeps answering /cluster from what it last read,
    which can name a leader that has long been replaced (seen in a partition: the cut-off member
    said it led while it had demoted itself and the other center had promoted). When the views
    name different leaders, believe those whose leader says it is a primary right now, the highest
    timeline first (a promotion raises it); when no leader says so, a view without a leader.
    """
    if not views:
        return []
    leaders = {(_view_leader(v) or {}).get("name") for v in views}
    if len(leaders) == 1:
        return views[0]
    trusted = []
    for view in views:
        leader = _view_leader(view)
        if leader is not None and claims_primary(leader):
            trusted.append((int(leader.get("timeline") or 0), view))
    if trusted:
        return max(trusted, key=lambda pair: pair[0])[1]
    return next((v for v in views if _view_leader(v) is None), views[0])


def _claims_primary(member: dict[str, Any], ca_file: str | None = None) -> bool:
    """The member's own Patroni says its PostgreSQL runs as a primary."""
    url = str(member.get("api_url") or "")
    if not url:
        return False
    status, body = http_json(url, timeout_s=0.5, ca_file=ca_file)
    return status == 200 and isinstance(body, dict) and body.get("role") in ("primary", "master")


def _mode_of(state: dict[str, Any] | None) -> dict[str, Any]:
    mode = (state or {}).get("mode") or {}
    return {
        "dr_active": bool(mode.get("dr_active", False)),
        "fenced_sites": list(mode.get("fenced_sites", [])),
        "centers_follow_dr": bool(mode.get("centers_follow_dr", False)),
    }


class LocalRuntime:
    """The topology of one run directory. Construct with a topology to bring it up; without one,
    the running topology's is read from the run directory."""

    def __init__(
        self,
        run_dir: Path = RUN_DIR_DEFAULT,
        topology: Topology | None = None,
        topology_text: str | None = None,
    ) -> None:
        self.run_dir = run_dir.absolute()
        self.state_path = self.run_dir / "state.json"
        state = self._read_state()
        if topology is None:
            if state is None:
                raise RuntimeError_(f"no topology runs from {self.run_dir}; start one with `watertight up`")
            topology_text = state["topology"]
            topology = parse(topology_text, str(self.state_path))
        self.topology = topology
        self.topology_text = topology_text or ""
        self.records: dict[str, ProcessRecord] = {
            name: ProcessRecord(**record) for name, record in (state or {}).get("processes", {}).items()
        }
        self.mode = _mode_of(state)
        self._components: list[render.Component] | None = None
        self._root_cert_written: str | None = None  # the CA last written to tls-ca.crt

    # ---- run directory --------------------------------------------------------------------------

    def reload(self) -> None:
        """Read the PIDs again: another process (a chaos action, a runbook) may have started or
        stopped components since this object read them."""
        state = self._read_state()
        self.records = {
            name: ProcessRecord(**record) for name, record in (state or {}).get("processes", {}).items()
        }
        mode = _mode_of(state)
        if mode != self.mode:
            self._components = None  # the members' configuration depends on the mode
        self.mode = mode

    def _read_state(self) -> dict[str, Any] | None:
        try:
            state: dict[str, Any] = json.loads(self.state_path.read_text())
        except FileNotFoundError:
            return None
        return state

    def _write_state(self) -> None:
        state = {
            "topology": self.topology_text,
            "processes": {name: asdict(record) for name, record in self.records.items()},
            "mode": self.mode,
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=1))
        tmp.replace(self.state_path)

    @property
    def secrets_path(self) -> Path:
        """The run's secrets (mode 0600): the PAN key, PostgreSQL's passwords and the API tokens
        clients use (``api_tokens``, CONTRACT); ``status --json`` names it as ``secrets``."""
        return self.run_dir / "secrets.json"

    def _secrets(self) -> dict[str, Any]:
        """The run's secrets; made on first use, and completed with any key a run directory of an
        older version lacks (kept 0600 throughout)."""
        path = self.secrets_path
        loaded: dict[str, Any] = private_files.read_json(path) if path.exists() else {}
        completed = render.complete_secrets(loaded, self._tls_addresses())
        changed = sorted(key for key in completed if completed[key] != loaded.get(key))
        if changed:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            private_files.write_private_json(path, completed)
            log.info("secrets: made %s in %s (mode 0600)", ", ".join(changed), path)
        return completed

    def _tls_addresses(self) -> list[str]:
        """What the run's server certificate names: the site addresses (where the members, etcd
        and the app servers' TLS listeners serve), and 127.0.0.1, the address a connection
        between sites of one machine comes from (etcd checks its peers' client certificates
        against it)."""
        endpoints = render.LocalEndpoints(self.topology)
        sites = {
            endpoints.postgres_host(c, s) for c in self.topology.cell_numbers for s in self.topology.sites
        }
        return sorted(sites | {LOOPBACK_SOURCE})

    def ready_status(self, component: render.Component, timeout_s: float = HTTP_TIMEOUT_S) -> int:
        """The HTTP status of the component's ``ready_url`` (0: nothing answered, or an https://
        server that did not verify against the run's CA)."""
        return http_json(component.ready_url or "", timeout_s=timeout_s, ca_file=self.root_cert())[0]

    def root_cert(self) -> str | None:
        """The run's CA certificate (``tls-ca.crt`` in the run directory, readable by anyone: it
        is no secret), written from the secrets when missing or changed, with the toolkit's client
        certificate and key beside it (0600: what the toolkit's clients present to etcd, see
        ``watertight.tls.client_context``). The probes ask several times a second: once written,
        only the files' existence is checked."""
        path = self.run_dir / render.TLS_ROOT_CERT
        client_cert = self.run_dir / render.TLS_CLIENT_CERT
        client_key = self.run_dir / render.TLS_CLIENT_KEY
        if self._root_cert_written is not None and path.exists() and client_key.exists():
            return str(path)
        secrets = self._secrets()
        ca = secrets.get(render.SECRET_TLS_CA)
        if not ca:
            return None
        client = secrets.get(render.SECRET_TLS_CLIENT) or {}
        # the key first: a client certificate without its key beside it is never read half-made
        for target, text in ((client_key, client.get("key")), (client_cert, client.get("cert"))):
            if text and (not target.exists() or target.read_text() != text):
                private_files.write_private(target, text)
        if not path.exists() or path.read_text() != ca["cert"]:
            private_files.write_private(path, ca["cert"])
            path.chmod(0o644)
        self._root_cert_written = ca["cert"]
        return str(path)

    def read_secrets(self) -> dict[str, Any]:
        """The run's secrets, to change and give back to ``write_secrets`` (a rotation)."""
        return dict(self._secrets())

    def write_secrets(self, secrets: dict[str, Any]) -> None:
        """Replace the run's secrets (a rotation); components read them again through
        ``rewrite_files``."""
        private_files.write_private_json(self.secrets_path, secrets)
        self._components = None

    def api_tokens(self) -> dict[str, str]:
        """The token of each client kind, as clients send it (``Authorization: Bearer``)."""
        return dict(self._secrets()[render.SECRET_API_TOKENS])

    def client_tokens(self) -> auth.ClientTokens:
        """The header each request to the core needs (the token of its route's client kind)."""
        return auth.ClientTokens(self.api_tokens())

    def rewrite_files(self, names: Iterable[str], kinds: Iterable[str] | None = None) -> list[str]:
        """Write again, from the current secrets, the files ``names`` of every component of
        ``kinds`` (all when None) without restarting anything: the servers read a changed file by
        themselves (their API tokens file). Returns the components whose files were rewritten."""
        self._components = None
        wanted = set(names)
        chosen = set(kinds) if kinds is not None else None
        done = []
        for component in self.components:
            if chosen is not None and component.kind not in chosen:
                continue
            files = {name: text for name, text in component.files.items() if name in wanted}
            if not files:
                continue
            directory = self.component_dir(component)
            directory.mkdir(parents=True, exist_ok=True)
            for relative, content in files.items():
                private_files.write_private(directory / relative, content)
            done.append(component.name)
        return done

    def operator_token(self) -> str | None:
        """The operator's API token: Prometheus sends it to every /metrics (from a 0600 file)."""
        token = self.api_tokens().get("operator")
        return str(token) if token else None

    @property
    def components(self) -> list[render.Component]:
        if self._components is None:
            secrets = self._secrets()
            self._components = render.render_local(
                self.topology,
                self.run_dir,
                sys.executable,
                secrets,
                centers_follow_dr=bool(self.mode["centers_follow_dr"]),
            ) + monitoring_config.components(
                self.topology,
                self.run_dir,
                self.operator_token(),
                (secrets.get(render.SECRET_TLS_CA) or {}).get("cert"),
                secrets.get(render.SECRET_TLS_CLIENT),
            )
        return self._components

    def component(self, name: str) -> render.Component:
        for component in self.components:
            if component.name == name:
                return component
        raise RuntimeError_(f"no component named {name!r}; see `watertight status`")

    def component_dir(self, component: render.Component) -> Path:
        return render.component_dir(self.run_dir, component.name)

    def log_path(self, component: render.Component) -> Path:
        return self.run_dir / "logs" / f"{component.name}.log"

    # ---- selection and PIDs ---------------------------------------------------------------------

    def select(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[render.Component]:
        self.reload()
        if site is not None and site not in self.topology.sites:
            raise RuntimeError_(f"no site named {site!r}; sites are {', '.join(self.topology.sites)}")
        if cell is not None and cell not in self.topology.cell_numbers:
            raise RuntimeError_(f"no cell {cell}; cells are 1..{self.topology.cells}")
        chosen = [
            c
            for c in self.components
            if (site is None or c.site == site)
            and (cell is None or c.cell == cell)
            and (component is None or c.name == component)
        ]
        if component is not None and not chosen:
            self.component(component)  # raises with the list hint
        return chosen

    # ---- mode: which sites are fenced, whether dr serves ----------------------------------------

    @property
    def dr_active(self) -> bool:
        return bool(self.mode["dr_active"])

    @property
    def fenced_sites(self) -> list[str]:
        return list(self.mode["fenced_sites"])

    def set_mode(
        self,
        dr_active: bool | None = None,
        fenced_sites: Iterable[str] | None = None,
        centers_follow_dr: bool | None = None,
    ) -> None:
        """Record that dr serves (the activate-dr runbook) or no longer does (failback), and which
        sites are fenced: `up` and `start` leave a fenced site down, so a lost center that comes
        back cannot take writes beside dr's promoted copies."""
        with self._state_lock():
            self.reload()
            if dr_active is not None:
                self.mode["dr_active"] = dr_active
            if centers_follow_dr is not None:
                self.mode["centers_follow_dr"] = centers_follow_dr
            if fenced_sites is not None:
                unknown = [s for s in fenced_sites if s not in self.topology.sites]
                if unknown:
                    raise RuntimeError_(
                        f"no site named {unknown[0]!r}; sites are {', '.join(self.topology.sites)}"
                    )
                self.mode["fenced_sites"] = sorted(set(fenced_sites))
            self._write_state()
            self._components = None  # the members' configuration depends on the mode

    def expected(self, component: render.Component) -> bool:
        """Whether the component should run in the current mode: not in a fenced site, and dr's
        app server and gateway only while dr is active."""
        if component.site in self.mode["fenced_sites"]:
            return False
        return self.dr_active or not component.on_dr_activation

    def primary_sites(self) -> list[str]:
        """Where a cell's writable primary can be, in the current mode: dr once it is active,
        else the centers that are not fenced."""
        if self.dr_active:
            return [render.DR_SITE]
        return [s for s in CENTERS if s not in self.mode["fenced_sites"]]

    def running(self, component: render.Component) -> bool:
        record = self.records.get(component.name)
        return record is not None and processes.alive(record)

    def _postmaster_pids(self, component: render.Component, tree: dict[int, list[int]]) -> list[int]:
        """Patroni starts PostgreSQL detached from itself: find the postmaster by its pid file."""
        if component.detached_pid_file is None:
            return []
        try:
            pid = int(component.detached_pid_file.read_text().split("\n", 1)[0])
        except (OSError, ValueError):
            return []
        if processes.state_of(pid) in (None, "Z", "X"):
            return []
        return [pid, *processes.descendants(pid, tree)]

    def component_cgroup(self, component: render.Component) -> Path | None:
        """The component's cgroup (root only; None without a cgroup v2 hierarchy)."""
        try:
            return network.component_cgroup(self.run_dir, component.site, component.name)
        except network.NetworkFaultError:
            return None

    def component_pids(
        self, component: render.Component, tree: dict[int, list[int]] | None = None
    ) -> list[int]:
        """Every live process of the component: its own PID and descendants, the postmaster Patroni
        started detached and its children, and anything else in the component's cgroup (a process
        that outlived its parent)."""
        tree = tree if tree is not None else processes.children_map()
        record = self.records.get(component.name)
        pids: list[int] = []
        if record is not None and processes.alive(record):
            pids = [record.pid, *processes.descendants(record.pid, tree)]
        for pid in self._postmaster_pids(component, tree):
            if pid not in pids:
                pids.append(pid)
        group = self.component_cgroup(component)
        if group is not None:
            for pid in network.cgroup_pids(group):
                if pid not in pids and processes.state_of(pid) not in (None, "Z", "X"):
                    pids.append(pid)
        return pids

    def processes_of(
        self, component: render.Component, tree: dict[int, list[int]] | None = None
    ) -> list[dict[str, Any]]:
        """Every process of a component with its role, so an operator sees at a glance what runs:
        a member's guard, keeper, Patroni, postmaster and PostgreSQL's own processes."""
        tree = tree if tree is not None else processes.children_map()
        record = self.records.get(component.name)
        main_pid = record.pid if record is not None and processes.alive(record) else None
        postmaster = self._postmaster_pids(component, tree)[:1]
        postgres_children = set(processes.descendants(postmaster[0], tree)) if postmaster else set()
        described = []
        for pid in self.component_pids(component, tree):
            line = processes.cmdline(pid)
            if pid == main_pid and component.kind != "patroni":
                role = component.kind
            elif pid in postmaster:
                role = "postgres"
            elif pid in postgres_children:
                role = "postgres-child"
            elif "watertight.runtime.guard" in line or "/runtime/guard.py" in line:
                # the keeper is started by the guard's file path (see watertight.runtime.guard)
                role = "keeper" if "--keeper" in line else "guard"
            elif " -m patroni " in f" {line} ":
                role = "patroni"
            else:
                role = "child"
            described.append(
                {
                    "pid": pid,
                    "role": role,
                    "state": processes.state_of(pid),
                    "orphan": main_pid is None,
                }
            )
        return described

    def pids(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[int]:
        tree = processes.children_map()
        return [pid for c in self.select(site, cell, component) for pid in self.component_pids(c, tree)]

    # ---- starting -------------------------------------------------------------------------------

    def start_component(self, component: render.Component) -> ProcessRecord:
        """Start one component (no-op if it runs). Its files are (re)written from the topology."""
        with self._state_lock():
            self.reload()
            if self.running(component):
                return self.records[component.name]
            record = self._spawn(component)
            self.records[component.name] = record
            self._write_state()
            return record

    @contextlib.contextmanager
    def _state_lock(self) -> Iterator[None]:
        """One writer of state.json at a time, across processes (the drill, chaos actions)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        with open(self.run_dir / "state.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _spawn(self, component: render.Component) -> ProcessRecord:
        directory = self.component_dir(component)
        directory.mkdir(parents=True, exist_ok=True)
        account = pg.service_account() if component.service_user else None
        written = [directory]
        for relative, content in component.files.items():
            path = directory / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            private_files.write_private(path, content)  # 0600 from its creation: some hold keys
            written.append(path)
        if component.data_dir is not None:
            component.data_dir.parent.mkdir(parents=True, exist_ok=True)
            component.data_dir.parent.chmod(0o711)
            component.data_dir.mkdir(mode=0o700, exist_ok=True)
            if account is not None and component.data_dir.stat().st_uid != account.uid:
                written.append(component.data_dir)
        if account is not None:
            for path in written:
                os.chown(path, account.uid, account.gid)
            directory.chmod(0o700)
            pg.check_reachable(directory, account)
            if component.data_dir is not None:
                pg.check_reachable(component.data_dir, account)
        record = processes.spawn(
            component.argv, directory, self.log_path(component), component.env, component.service_user
        )
        # its sockets carry its site from birth (a network fault in force covers it at once), and
        # whatever it ever starts stays findable in its component's cgroup
        network.place(self.run_dir, component.site, record.pid, component.name)
        self.records[component.name] = record
        self._write_state()
        return record

    def up(self, progress: Progress = _quiet) -> dict[str, Any]:
        """Start whatever is not running, stage by stage; return when every cell has a leader and
        a streaming sync standby and every gateway is ready. Idempotent."""
        started_at = time.monotonic()
        self.reload()
        state = self._read_state()
        if state is not None and state.get("topology") and state["topology"] != self.topology_text:
            if any(self.running(c) for c in self.components):
                raise RuntimeError_(
                    f"a different topology runs from {self.run_dir}; run `watertight down` first (or `down --purge` to drop its data)"
                )
        for folder in ("logs", "components"):
            (self.run_dir / folder).mkdir(parents=True, exist_ok=True)
            # the service user traverses it to its own directories, whatever the caller's umask
            (self.run_dir / folder).chmod(0o755)
        self.run_dir.chmod(0o755)
        self._write_state()
        self._refuse_taken_addresses([c for c in self.components if self.expected(c) and not self.running(c)])
        for warning in ephemeral_listeners(self.components):
            progress(f"warning: {warning}")
        started: list[str] = []
        stages = sorted({c.stage for c in self.components})
        for stage in stages:
            members = [c for c in self.components if c.stage == stage and self.expected(c)]
            todo = [c for c in members if not self.running(c)]
            for component in todo:
                self.start_component(component)
                started.append(component.name)
            if todo:
                progress(f"stage {stage}: started {', '.join(c.name for c in todo)}")
            self._wait_stage(stage, members, progress)
        self._wait_topology_ready(progress)
        self._wait_targets_up(progress)
        seconds = time.monotonic() - started_at
        if started:
            progress(f"topology up in {seconds:.1f} s ({len(started)} components started)")
        else:
            progress("topology already up: nothing to start")
        return {"started": started, "seconds": round(seconds, 1), "entry": self.topology.entry_url}

    def _wait_stage(self, stage: int, members: list[render.Component], progress: Progress) -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        # a member that has data already rejoins whoever leads now, which may be a member of a
        # later stage: only the first bootstrap needs the stages in order (the end of `up` waits
        # for every cell's leader and sync standby anyway)
        # while dr serves, the main consensus has lost the centers' members: dr's member of it
        # cannot be healthy, and nothing needs it to be
        pending = [
            c
            for c in members
            if c.ready_url and not self._has_data(c) and not (self.dr_active and c.kind == "etcd")
        ]
        last_note = time.monotonic()
        while pending:
            for component in list(pending):
                if not self.running(component):
                    raise RuntimeError_(
                        f"{component.name} exited while starting; read {self.log_path(component)}, fix the cause, "
                        f"then run `watertight up` again. Its last lines:\n{pg.log_tail(self.log_path(component), 10)}"
                    )
                if 200 <= self.ready_status(component) < 300:
                    pending.remove(component)
            if not pending:
                return
            now = time.monotonic()
            if now > deadline:
                names = ", ".join(c.name for c in pending)
                raise RuntimeError_(
                    f"stage {stage}: {names} not ready within {STAGE_TIMEOUT_S:.0f} s; read their logs in {self.run_dir / 'logs'}"
                )
            if now - last_note > 5:
                progress(f"stage {stage}: waiting for {', '.join(c.name for c in pending)}")
                last_note = now
            time.sleep(0.2)

    def monitoring_targets(self) -> list[dict[str, Any]] | None:
        """Every target of the local Prometheus with its labels and health, and whether its
        component should run in the current mode; None when Prometheus does not answer (or the
        topology has no monitoring)."""
        if not self.topology.monitoring.enabled:
            return None
        status, body = http_json(f"{self.topology.prometheus_url}/api/v1/targets?state=active", timeout_s=2.0)
        if status != 200 or not isinstance(body, dict):
            return None
        names = {c.name: c for c in self.components}
        targets = []
        for target in body.get("data", {}).get("activeTargets", []):
            labels = target.get("labels", {})
            component = names.get(labels.get("component", ""))
            targets.append(
                {
                    "job": labels.get("job"),
                    "kind": labels.get("kind"),
                    "site": labels.get("site"),
                    "cell": labels.get("cell"),
                    "component": labels.get("component"),
                    "url": target.get("scrapeUrl"),
                    "health": target.get("health"),
                    "error": target.get("lastError") or None,
                    "expected": component is None or self.expected(component),
                }
            )
        return targets

    def _wait_targets_up(self, progress: Progress) -> None:
        """Monitoring is up when Prometheus has scraped every target that should run."""
        if not self.topology.monitoring.enabled:
            return
        deadline = time.monotonic() + TARGETS_UP_TIMEOUT_S
        while True:
            targets = self.monitoring_targets() or []
            down = [t for t in targets if t["expected"] and t["health"] != "up"]
            if targets and not down:
                progress(f"monitoring: Prometheus scrapes {len(targets)} targets, every expected one up")
                return
            if time.monotonic() > deadline:
                what = "; ".join(f"{t['job']} {t['url']}: {t['health']} {t['error'] or ''}" for t in down)
                raise RuntimeError_(
                    f"monitoring: targets not up within {TARGETS_UP_TIMEOUT_S:.0f} s: {what or 'Prometheus lists none'}; "
                    f"see {self.topology.prometheus_url}/targets and the logs in {self.run_dir / 'logs'}"
                )
            time.sleep(0.5)

    def _has_data(self, component: render.Component) -> bool:
        return (
            component.kind == "patroni"
            and component.detached_pid_file is not None
            and (component.detached_pid_file.parent / "PG_VERSION").exists()
        )

    def _wait_topology_ready(self, progress: Progress) -> None:
        deadline = time.monotonic() + STAGE_TIMEOUT_S
        while True:
            missing = self._not_ready()
            if not missing:
                return
            if time.monotonic() > deadline:
                raise RuntimeError_(
                    f"the topology is not ready after {STAGE_TIMEOUT_S:.0f} s: {'; '.join(missing)}; "
                    f"see `watertight status` and the logs in {self.run_dir / 'logs'}"
                )
            time.sleep(0.3)

    def _not_ready(self) -> list[str]:
        missing = []
        for cell in self.topology.cell_numbers:
            if self.dr_active:
                dr_copy = self.cell_view(cell)["dr_copy"]
                if not dr_copy or dr_copy["role"] != "leader" or dr_copy["state"] != "running":
                    missing.append(f"cell {cell}'s dr copy is not a running primary")
                continue
            view = self.cell_view(cell)
            if (reason := cell_not_steady(cell, view)) is not None:
                missing.append(reason)
        for component in self.components:
            if (
                component.kind in ("gateway", "entry")
                and self.expected(component)
                and self.ready_status(component) != 200
            ):
                missing.append(f"{component.name} is not ready")
        return missing

    # ---- views ----------------------------------------------------------------------------------

    def superuser_password(self) -> str:
        """The PostgreSQL superuser's password of this run (secrets.json, made by ``up``)."""
        return str(self._secrets()[render.SECRET_SUPERUSER_PASSWORD])

    def cluster_members(self, cell: int, dr: bool = False) -> list[dict[str, Any]]:
        """Patroni's view of a cell's cluster (main, or the dr standby cluster), from every member
        that answers; when they disagree, see ``choose_view``."""
        views: list[list[dict[str, Any]]] = []
        ca_file = self.root_cert()
        for component in self.components:
            if component.kind != "patroni" or component.cell != cell or (component.site == "dr") != dr:
                continue
            api = render.LocalEndpoints(self.topology).patroni_api_url(cell, component.site or "")
            status, body = http_json(f"{api}/cluster", timeout_s=0.5, ca_file=ca_file)
            if status == 200 and isinstance(body, dict):
                views.append(body.get("members", []))
        return choose_view(views, functools.partial(_claims_primary, ca_file=ca_file))

    def site_of_member(self, member: Mapping[str, Any]) -> str | None:
        for name, site in self.topology.sites.items():
            if member.get("host") == site.address:
                return name
        return None

    def cell_view(self, cell: int) -> dict[str, Any]:
        return cell_view_of(
            self.cluster_members(cell), self.cluster_members(cell, dr=True), self.site_of_member
        )

    def status(self) -> dict[str, Any]:
        self.reload()
        tree = processes.children_map()
        cells = {str(cell): self.cell_view(cell) for cell in self.topology.cell_numbers}
        roles: dict[str, str] = {}
        for cell, view in cells.items():
            for member in view["members"]:
                roles[f"pg-cell{cell}-{member['site']}"] = member["role"] or "unknown"
        components = []
        rss_total = 0
        for component in self.components:
            record = self.records.get(component.name)
            pids = self.component_pids(component, tree)
            rss = sum(processes.rss_bytes(pid) for pid in pids)
            rss_total += rss
            is_alive = self.running(component)
            healthy = None
            if (
                component.kind in ("app", "gateway", "entry", "prometheus", "alertmanager")
                and is_alive
                and component.ready_url
            ):
                healthy = self.ready_status(component, timeout_s=0.5) == 200
            described = self.processes_of(component, tree)
            entry: dict[str, Any] = {
                "name": component.name,
                "kind": component.kind,
                "site": component.site,
                "cell": component.cell,
                "role": roles.get(component.name, component.kind),
                "pid": record.pid if record and is_alive else None,
                "alive": is_alive,
                "frozen": bool(record and processes.frozen(record)),
                "healthy": healthy,
                "expected": self.expected(component),
                "rss_bytes": rss,
                "log": str(self.log_path(component)),
                # every process, so an orphan (alive while the component's PID is gone) shows
                "processes": described,
                "orphans": [p["pid"] for p in described if p["orphan"]],
            }
            if component.kind == "patroni":
                entry["patroni_pid"] = next((p["pid"] for p in described if p["role"] == "patroni"), None)
                entry["postgres_pid"] = next((p["pid"] for p in described if p["role"] == "postgres"), None)
            components.append(entry)
        endpoints = render.LocalEndpoints(self.topology)
        sites = {}
        idle = {c.name for c in self.components if not self.expected(c)}
        for name, site in self.topology.sites.items():
            own = [c for c in components if c["site"] == name and c["name"] not in idle]
            up = bool(own) and all(c["alive"] and not c["frozen"] for c in own)
            sites[name] = {
                "up": up,
                "role": site.role,
                "address": site.address,
                "gateway": endpoints.gateway_url(name) if site.role == "center" else None,
                "components_alive": sum(1 for c in own if c["alive"]),
                "components": len(own),
                "fenced": name in self.mode["fenced_sites"],
            }
        monitoring = None
        if self.topology.monitoring.enabled:
            targets = self.monitoring_targets()
            monitoring = {
                "prometheus": self.topology.prometheus_url,
                "alertmanager": self.topology.alertmanager_url,
                "targets": targets,
                "targets_up": None if targets is None else sum(1 for t in targets if t["health"] == "up"),
            }
        return {
            "name": self.topology.name,
            "run_dir": str(self.run_dir),
            "logs": str(self.run_dir / "logs"),
            "entry": self.topology.entry_url,
            "secrets": str(self.secrets_path),
            "monitoring": monitoring,
            "sites": sites,
            "cells": cells,
            "components": components,
            "rss_total_bytes": rss_total,
            "mode": dict(self.mode),
        }

    # ---- fault control (the Target interface) ---------------------------------------------------

    def kill(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return self._stop(self.select(site, cell, component), hard=True)

    def stop(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return self._stop(self.select(site, cell, component), hard=False)

    def _stop(self, chosen: Iterable[render.Component], hard: bool) -> list[str]:
        """Stop the chosen components stage by stage in reverse start order (the entry before the
        gateways before the databases), the components of one stage together: a member's Patroni
        takes seconds to stop PostgreSQL, and nine of them one after the other made `down` slow."""
        tree = processes.children_map()
        stages: dict[int, list[render.Component]] = {}
        for component in chosen:
            stages.setdefault(component.stage, []).append(component)
        hit = []
        for stage in sorted(stages, reverse=True):
            group = stages[stage]
            with ThreadPoolExecutor(max_workers=min(STOP_PARALLEL_MAX, len(group))) as pool:
                stopped = list(pool.map(lambda c: self._stop_one(c, tree, hard), group))
            hit += [c.name for c, done in zip(group, stopped, strict=True) if done]
        return hit

    def _stop_one(self, component: render.Component, tree: dict[int, list[int]], hard: bool) -> bool:
        """Stop one component's processes (False when none ran)."""
        record = self.records.get(component.name)
        pids = self.component_pids(component, tree)
        if not pids:
            return False
        if record is not None and processes.alive(record):
            processes.stop_tree(record, [p for p in pids if p != record.pid], STOP_TIMEOUT_S, hard=hard)
        else:
            # what outlived the component's PID: nobody is left to ask politely
            log.warning("%s: its PID is gone but PIDs %s of it run: killing them", component.name, pids)
            processes.signal_pids(pids, signal.SIGCONT)
            processes.signal_pids(pids, signal.SIGKILL)
            processes.wait_gone(pids, STOP_TIMEOUT_S)
        group = self.component_cgroup(component)
        if group is not None:
            # a process the tree no longer reached (reparented to init) is still in its cgroup
            escaped = network.kill_cgroup(group)
            if escaped:
                processes.wait_gone(escaped, STOP_TIMEOUT_S)
        return True

    def kill_process(self, component: str, role: str) -> list[int]:
        """SIGKILL only the processes of ``role`` within a component (``patroni``, ``postgres``,
        ``keeper``, ``guard``...; see ``processes_of``): a crash of one process of several.
        Returns the PIDs killed; raises when the component has none of that role."""
        chosen = self.component(component)
        self.reload()
        pids = [p["pid"] for p in self.processes_of(chosen) if p["role"] == role]
        if not pids:
            roles = sorted({p["role"] for p in self.processes_of(chosen)}) or ["none: it is not running"]
            raise RuntimeError_(f"{component} has no {role} process; its processes are {', '.join(roles)}")
        return processes.signal_pids(pids, signal.SIGKILL)

    def leader_site(self, cell: int) -> str:
        """The site whose member leads ``cell`` now; raises when none does."""
        self.select(cell=cell)
        site = self.cell_view(cell)["leader_site"]
        if site is None:
            raise RuntimeError_(f"cell {cell} has no leader now; see `watertight status`")
        return str(site)

    def freeze(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return self._signal(self.select(site, cell, component), signal.SIGSTOP)

    def thaw(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return self._signal(self.select(site, cell, component), signal.SIGCONT)

    def _signal(self, chosen: Iterable[render.Component], sig: int) -> list[str]:
        tree = processes.children_map()
        hit = []
        for component in chosen:
            pids = self.component_pids(component, tree)
            if processes.signal_pids(pids, sig):
                hit.append(component.name)
                if sig in (signal.SIGSTOP, signal.SIGCONT):
                    unsettled = processes.wait_stopped(pids, stopped=sig == signal.SIGSTOP)
                    if unsettled:
                        log.warning(
                            "%s: PIDs %s did not show the %s state within %.0f s",
                            component.name,
                            unsettled,
                            "stopped" if sig == signal.SIGSTOP else "running",
                            processes.SIGNAL_SETTLE_S_MAX,
                        )
        return hit

    def restart(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        chosen = self.select(site, cell, component)
        self._stop(chosen, hard=False)
        for item in sorted(chosen, key=lambda c: c.stage):
            self.start_component(item)
        return [c.name for c in chosen]

    def start(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        chosen = [
            c
            for c in self.select(site, cell, component)
            if not self.running(c) and (component is not None or self.expected(c))
        ]
        for item in sorted(chosen, key=lambda c: c.stage):
            self.start_component(item)
        return [c.name for c in chosen]

    # ---- the rest of the Target interface (watertight.runtime.target) --------------------------

    name = "local"

    @property
    def entry_url(self) -> str:
        return self.topology.entry_url

    def gateway_urls(self) -> dict[str, str]:
        return {site: self.topology.gateway_url(site) for site in CENTERS}

    def alerting(self) -> Alerting | None:
        """The topology's Alertmanager and the drill's receiver, when the topology has monitoring."""
        if not self.topology.monitoring.enabled:
            return None
        return Alerting(self.topology.alertmanager_url, self.topology.alert_receiver_url)

    def api_tokens_file(self) -> Path:
        self._secrets()  # made on first use
        return self.secrets_path

    def components_of(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return [c.name for c in self.select(site, cell, component)]

    def instances(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        tree = processes.children_map()
        return [
            f"{c.name} pid {pid}"
            for c in self.select(site, cell, component)
            for pid in self.component_pids(c, tree)
        ]

    def members(self, cell: int) -> list[Member]:
        self.select(cell=cell)  # names the cells when there is no such cell
        endpoints = render.LocalEndpoints(self.topology)
        return [
            Member(
                name=c.name,
                site=c.site or "",
                postgres_host=endpoints.postgres_host(cell, c.site or ""),
                postgres_port=endpoints.postgres_port(cell),
                patroni_url=endpoints.patroni_api_url(cell, c.site or ""),
            )
            for c in self.components
            if c.kind == "patroni" and c.cell == cell
        ]

    def primary_hosts(self, cell: int) -> list[str]:
        return [self.topology.address(site) for site in self.primary_sites()]

    def ready_urls(self) -> dict[str, str]:
        return {
            c.name: c.ready_url or ""
            for c in self.components
            if c.kind in ("gateway", "entry") and self.expected(c)
        }

    def not_ready_reasons(self) -> list[str]:
        """Why the topology is not in its steady state: every cell has a running leader and a
        streaming sync standby, every expected gateway and the entry answer ready."""
        self.reload()
        reasons = []
        for cell in self.topology.cell_numbers:
            view = self.cell_view(cell)
            if (reason := cell_not_steady(cell, view)) is not None:
                reasons.append(reason)
        for name, url in self.ready_urls().items():
            if http_json(url)[0] != 200:
                reasons.append(f"{name} is not ready")
        return reasons

    def frozen(
        self, site: str | None = None, cell: int | None = None, component: str | None = None
    ) -> list[str]:
        return [
            c.name
            for c in self.select(site, cell, component)
            if (record := self.records.get(c.name)) is not None and processes.frozen(record)
        ]

    def kill_listed_pids(self, site: str, every_process: bool = False) -> dict[str, Any]:
        """SIGKILL exactly the PIDs ``status()`` lists for ``site`` (each component's ``pid``;
        with ``every_process`` also every PID of its ``processes``), one by one, as a user's own
        script does: no process tree, no cgroup."""
        self.select(site=site)
        listed: list[int] = []
        for component in self.status()["components"]:
            if component["site"] != site:
                continue
            if component["pid"]:
                listed.append(int(component["pid"]))
            if every_process:
                listed += [int(p["pid"]) for p in component["processes"] if int(p["pid"]) not in listed]
        killed = processes.signal_pids(listed, signal.SIGKILL)
        return {"site": site, "listed": listed, "killed": killed}

    def writers_in_flight(self, site: str) -> int:
        """Group commits of ``site``'s app server running now: its writer sessions not idle on the
        cells' leaders."""
        return writers_in_flight(self, site)

    def site_network(self) -> network.SiteNetwork:
        """The sites' addresses and the PIDs of each site's processes, for network faults."""
        return network.SiteNetwork(
            self.run_dir,
            {name: site.address for name, site in self.topology.sites.items()},
            {name: self.pids(site=name) for name in self.topology.sites},
        )

    def partition(self, site: str) -> dict[str, Any]:
        """nftables with cgroup v2 matching (root): packets between ``site`` and the others dropped."""
        self.select(site=site)
        return network.partition(self.site_network(), site)

    def heal_partition(self) -> dict[str, Any]:
        return network.heal_partition(self.site_network())

    def add_latency(self, delay_ms: int, sites: list[str] | None = None) -> dict[str, Any]:
        """An NFQUEUE delayer (the kernel here has no netem)."""
        return network.add_latency(self.site_network(), delay_ms, sites)

    def remove_latency(self) -> dict[str, Any]:
        return network.remove_latency(self.site_network())

    def heal_network(self) -> dict[str, Any]:
        return network.heal_all(self.site_network()) if network.read_state(self.run_dir) else {}

    def switchover(self, cell: int, to_site: str) -> dict[str, Any]:
        from watertight.runbooks import ops

        return ops.switchover(self, cell, to_site)

    def cpu_sample(self) -> dict[Any, tuple[str, float]]:
        """CPU seconds so far of every process of the topology but monitoring's, by PID, with the
        kind it is counted under: PostgreSQL apart from Patroni and its member guard (both live in
        the ``patroni`` component), both etcd clusters as ``etcd``."""
        tree = processes.children_map()
        found: dict[Any, tuple[str, float]] = {}
        for component in self.components:
            if component.kind in monitoring_config.MONITORING_KINDS:
                continue  # the observer, not the core: its cost is no transaction's
            for pid in self.component_pids(component, tree):
                seconds = processes.cpu_seconds(pid)
                if seconds is not None:
                    found[pid] = (_process_kind(component.kind, pid), seconds)
        return found

    def runbook_vars(self) -> dict[str, Any]:
        return {"watertight_target": self.name}

    # ---- strays ---------------------------------------------------------------------------------

    def stray_pids(self) -> list[int]:
        """Processes of this run that no running component accounts for: left in the run's
        cgroups, or running one of its components' command lines (a component killed in an earlier
        life of this run directory, a postmaster whose Patroni is long gone)."""
        tree = processes.children_map()
        accounted = {pid for c in self.components for pid in self.component_pids(c, tree)}
        signatures = [" ".join(c.argv) for c in self.components]
        signatures += [
            f"-D {c.detached_pid_file.parent}" for c in self.components if c.detached_pid_file is not None
        ]
        found: set[int] = set()
        group = network.run_cgroup(self.run_dir)
        if group is not None:
            found.update(network.cgroup_pids(group))
        for pid in processes.pids_mentioning(str(self.run_dir)):
            line = processes.cmdline(pid)
            if any(line.startswith(sig) or f" {sig}" in line for sig in signatures):
                found.add(pid)
        for pid in list(found):
            found.update(processes.descendants(pid, tree))
        me = os.getpid()
        return sorted(
            pid
            for pid in found
            if pid not in accounted and pid != me and processes.state_of(pid) not in (None, "Z", "X")
        )

    def _refuse_taken_addresses(self, todo: list[render.Component]) -> None:
        """`up` never starts a component beside a process that already holds one of its addresses
        (an orphan of an earlier kill would take a share of its traffic, or its data)."""
        wanted = {address: c for c in todo for address in c.listens}
        if not wanted:
            return
        ours = {pid for c in self.components if self.running(c) for pid in self.component_pids(c)}
        for (host, port), pids in sorted(processes.listeners(set(wanted)).items()):
            strangers = [pid for pid in pids if pid not in ours]
            if strangers:
                component = wanted.get((host, port)) or next(c for a, c in wanted.items() if a[1] == port)
                holders = "; ".join(f"PID {pid} ({processes.cmdline(pid)[:80]})" for pid in strangers)
                raise RuntimeError_(
                    f"{host}:{port}, where {component.name} must listen, is held by {holders}: "
                    "no process of this run's components; if it is left from an earlier run of this "
                    f"directory `watertight down` stops it, otherwise stop it by its PID, then run "
                    "`watertight up` again"
                )

    # ---- down -----------------------------------------------------------------------------------

    def down(self, purge: bool = False, progress: Progress = _quiet) -> list[str]:
        """Stop every component (politely: each gets SIGTERM and time to stop), then remove the
        run's network faults; ``purge`` also deletes the run directory, and since every member's
        data goes with it nothing is asked politely (SIGKILL at once: etcd's members, stopped
        together, each wait seconds for a leader transfer that cannot happen)."""
        self.reload()
        stopped = self._stop(self.components, hard=purge)
        if stopped:
            progress(f"stopped {len(stopped)} components: {', '.join(stopped)}")
        else:
            progress("nothing was running")
        strays = self.stray_pids()
        if strays:
            described = ", ".join(f"{pid} ({processes.cmdline(pid)[:60]})" for pid in strays)
            progress(
                f"found {len(strays)} processes of this run no component accounts for: {described}; killing them"
            )
            processes.signal_pids(strays, signal.SIGCONT)
            processes.signal_pids(strays, signal.SIGKILL)
            processes.wait_gone(strays, STOP_TIMEOUT_S)
        left = self.pids() + self.stray_pids()
        if left:
            raise RuntimeError_(
                f"processes {left} survived the stop; stop them by PID and run `watertight down` again"
            )
        try:
            cleared = network.clear_run(self.run_dir)
        except network.NetworkFaultError as error:
            raise RuntimeError_(
                f"every process stopped, but the run's network faults could not be removed: {error}; "
                "run `watertight down` again as root"
            ) from None
        healed = {kind: what for kind, what in cleared["healed"].items() if what}
        if healed:
            progress(f"removed the network faults still in force: {healed}")
        if purge:
            shutil.rmtree(self.run_dir, ignore_errors=True)
            progress(f"deleted {self.run_dir}")
        else:
            self.records = {}
            self._write_state()
        return stopped


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of ports for the client end of a connection (32768-60999 by default)."""
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        return 32768, 60999
    return low, high


def ephemeral_listeners(components: Iterable[render.Component]) -> list[str]:
    """What listens on 127.0.0.1 at a port of the ephemeral range: every connection between
    loopback addresses leaves from 127.0.0.1, so a client's end may hold such a port when the
    component binds it ("address already in use"; it cost CI a test topology's Prometheus)."""
    low, high = ephemeral_range()
    return [
        f"{c.name} listens on {host}:{port}, inside the kernel's ephemeral port range ({low}-{high}): "
        "a client connection's end may hold it when the component starts; choose a port outside it "
        "or another loopback address than 127.0.0.1"
        for c in components
        for host, port in c.listens
        if host == LOOPBACK_SOURCE and low <= port <= high
    ]


def _process_kind(component_kind: str, pid: int) -> str:
    """The kind bench counts a process under (see ``LocalRuntime.cpu_sample``)."""
    if component_kind == "patroni":
        try:
            with open(f"/proc/{pid}/comm", encoding="ascii", errors="replace") as handle:
                name = handle.read().strip()
        except OSError:
            return "patroni"
        return "postgres" if name.startswith(("postgres", "postmaster")) else "patroni"
    if component_kind == "etcd-dr":
        return "etcd"
    return component_kind
