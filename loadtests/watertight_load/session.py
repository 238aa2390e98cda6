"""One Locust process's part of a run, wired to Locust's events.

Owns: getting the population (the master or the stand-alone process opens or loads it, before
the run-time clock starts when it can, and sends it to the workers); scheduling this process's
share of the offered rates; opening this process's ack log; at ``test_stop``, saying how the
schedules went; at ``quitting`` (master or stand-alone only), judging the run by the SLA gates
and setting ``environment.process_exit_code = 1`` with the reasons logged when they fail.

A process's share of a class's rate is its share of that class's users: Locust's dispatcher
hands users to workers class by class, round robin, so with two workers all ``Cardholder``
users may well sit on one of them. The master sends the total users per class when spawning
completes; until then (the ramp-up) each worker assumes an even split.
Never: open customers on a worker (the master does it once for the run); leave a failed gate
or a failed set-up with exit code 0.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
from gevent.event import Event
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from watertight_load import gates, options
from watertight_load.ack_log import AckLog, worker_path
from watertight_load.history import History
from watertight_load.outstanding import Outstanding
from watertight_load.pacing import IDLE_POLL_S, Pacer
from watertight_load.population import Population, PopulationError, population_for_run
from watertight_load.tokens import Tokens, TokensError
from watertight_load.traffic import FINANCIAL, NONFINANCIAL, parse_request_name

RUN_MESSAGE = "watertight-run"
USERS_MESSAGE = "watertight-users"
POPULATION_WAIT_S_MAX = 120.0

logger = logging.getLogger("watertight.load")


@dataclass
class Session:
    """The state of this process's part of the run (one per process)."""

    pacers: dict[str, Pacer] = field(
        default_factory=lambda: {FINANCIAL: Pacer(FINANCIAL), NONFINANCIAL: Pacer(NONFINANCIAL)}
    )
    population: Population | None = None
    population_ready: Event = field(default_factory=Event)
    workers: int = 0  # worker processes of the run, as the master counted them
    users_total: dict[str, int] = field(default_factory=dict)  # users per class over all workers
    outstanding: Outstanding = field(default_factory=Outstanding)
    ack_log: AckLog | None = None
    tokens: Tokens | None = None  # every process reads the file itself: tokens never cross the wire
    history: History | None = None
    timeline: AckLog | None = None
    setup_failures: list[str] = field(default_factory=list)
    environment: Environment | None = None  # spawning_complete does not carry it

    def require_tokens(self) -> Tokens:
        if self.tokens is None:
            raise TokensError("no API tokens loaded (--api-tokens)")
        return self.tokens

    def wait_for_population(self) -> Population:
        if not self.population_ready.wait(timeout=POPULATION_WAIT_S_MAX) or self.population is None:
            raise PopulationError(f"no population within {POPULATION_WAIT_S_MAX:.0f} s")
        return self.population

    def wait_for_slot(self, traffic: str) -> float:
        """Block while the class offers nothing here; then the seconds until the next slot."""
        pacer = self.pacers[traffic]
        while pacer.idle:
            gevent.sleep(IDLE_POLL_S)
        return pacer.claim()


SESSION = Session()


def attach(events: Any) -> None:
    """Register the arguments and listeners (call once, from the locustfile)."""
    events.init_command_line_parser.add_listener(options.add_arguments)
    events.init.add_listener(_on_init)
    events.test_start.add_listener(_on_test_start)
    events.spawning_complete.add_listener(_on_spawning_complete)
    events.test_stop.add_listener(_on_test_stop)
    events.request.add_listener(_on_request)
    events.quitting.add_listener(_on_quitting)


def _load_tokens(environment: Environment) -> bool:
    if SESSION.tokens is not None:
        return True
    try:
        SESSION.tokens = Tokens.load(options.read(environment.parsed_options).api_tokens_path)
    except (ValueError, TokensError) as error:
        _fail_setup(environment, str(error))
        return False
    return True


def _on_init(environment: Environment, **_: Any) -> None:
    SESSION.environment = environment
    if isinstance(environment.runner, WorkerRunner):
        environment.runner.register_message(RUN_MESSAGE, _on_run_message)
        environment.runner.register_message(USERS_MESSAGE, _on_users_message)
        return
    parsed = environment.parsed_options
    if parsed is not None and (parsed.headless or parsed.autostart) and environment.host:
        # before the run-time clock starts: opening customers is not part of the measured run
        _ensure_population(environment)


def _fail_setup(environment: Environment, why: str) -> None:
    logger.error("cannot start the card traffic: %s", why)
    SESSION.setup_failures.append(why)
    if environment.runner is not None:
        gevent.spawn_later(0.1, environment.runner.quit)


def _ensure_population(environment: Environment) -> bool:
    """Open or load the run's population in the master or stand-alone process; False on failure."""
    if SESSION.setup_failures:
        return False  # said once already; the run is being stopped
    try:
        load = options.read(environment.parsed_options)
    except ValueError as error:
        _fail_setup(environment, str(error))
        return False
    host = environment.host or ""
    if not host:
        _fail_setup(environment, "no --host: give the gateway URL, e.g. http://127.0.0.1:18080")
        return False
    if not _load_tokens(environment):
        return False
    if SESSION.population is None or SESSION.population.host.rstrip("/") != host.rstrip("/"):
        try:
            SESSION.population = population_for_run(
                host, load.customers, SESSION.require_tokens(), load.population_path
            )
        except (PopulationError, OSError) as error:
            _fail_setup(environment, f"population: {error} (is the core up and answering at {host}?)")
            return False
    SESSION.population_ready.set()
    return True


def _on_test_start(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if not isinstance(runner, WorkerRunner) and not _ensure_population(environment):
        return
    if isinstance(runner, MasterRunner):
        assert SESSION.population is not None
        runner.send_message(
            RUN_MESSAGE,
            {
                "workers": runner.worker_count,
                "host": SESSION.population.host,
                "customers": SESSION.population.to_dicts(),
            },
        )
        return
    try:
        load = options.read(environment.parsed_options)
    except ValueError as error:
        _fail_setup(environment, str(error))
        return
    if not _load_tokens(environment):
        return
    SESSION.users_total = {}
    for traffic, rate_tps in _rates_of_this_process(environment).items():
        SESSION.pacers[traffic].configure(rate_tps)
    if load.ack_log_path and SESSION.ack_log is None:
        path = worker_path(load.ack_log_path) if isinstance(runner, WorkerRunner) else Path(load.ack_log_path)
        SESSION.ack_log = AckLog(path)
        logger.info("acknowledged financial transactions are appended to %s", path)
    if load.timeline_path and SESSION.timeline is None:
        path = (
            worker_path(load.timeline_path) if isinstance(runner, WorkerRunner) else Path(load.timeline_path)
        )
        SESSION.timeline = AckLog(path)
    if load.history_path and SESSION.history is None:
        path = worker_path(load.history_path) if isinstance(runner, WorkerRunner) else Path(load.history_path)
        SESSION.history = History(path, load.read_back_ratio)
        logger.info("the client's history (writes, reads, indeterminate requests) is appended to %s", path)
    SESSION.outstanding = Outstanding()
    _log_rates()


def _on_request(name: str = "", exception: Any = None, **_: Any) -> None:
    """One line per finished request of a cell, for the timeline (the drill's safeguards)."""
    if SESSION.timeline is None:
        return
    cell = parse_request_name(name)[1]
    if cell is not None:
        SESSION.timeline.append({"t": time.time(), "cell": cell, "ok": exception is None})


def _on_run_message(environment: Environment, msg: Any, **_: Any) -> None:
    SESSION.workers = int(msg.data["workers"])
    SESSION.population = Population.from_dicts(msg.data["customers"], msg.data.get("host", ""))
    SESSION.population_ready.set()


def _on_spawning_complete(**_: Any) -> None:
    runner = SESSION.environment.runner if SESSION.environment is not None else None
    if isinstance(runner, MasterRunner):
        runner.send_message(USERS_MESSAGE, {"users_total": dict(runner.target_user_classes_count)})


def _on_users_message(environment: Environment, msg: Any, **_: Any) -> None:
    SESSION.users_total = {str(name): int(count) for name, count in msg.data["users_total"].items()}
    for traffic, rate_tps in _rates_of_this_process(environment).items():
        SESSION.pacers[traffic].set_rate(rate_tps)
    _log_rates()


def _rates_of_this_process(environment: Environment) -> dict[str, float]:
    """The offered rates times this process's share of each class's users."""
    offered = options.read(environment.parsed_options).offered_tps()
    runner = environment.runner
    if not isinstance(runner, WorkerRunner):
        return offered
    local = runner.target_user_classes_count
    if not SESSION.users_total or not local:
        expected = int(getattr(environment.parsed_options, "expect_workers", 1) or 1)
        return {traffic: rate / (SESSION.workers or expected) for traffic, rate in offered.items()}
    traffic_of = {cls.__name__: getattr(cls, "traffic", None) for cls in environment.user_classes}
    rates = {}
    for traffic, rate in offered.items():
        names = [name for name, of in traffic_of.items() if of == traffic]
        total = sum(SESSION.users_total.get(name, 0) for name in names)
        mine = sum(local.get(name, 0) for name in names)
        rates[traffic] = rate * mine / total if total else 0.0
    return rates


def _log_rates() -> None:
    logger.info(
        "this process offers %.1f financial + %.1f non-financial per second",
        SESSION.pacers[FINANCIAL].rate_tps,
        SESSION.pacers[NONFINANCIAL].rate_tps,
    )


def _on_test_stop(environment: Environment, **_: Any) -> None:
    if isinstance(environment.runner, MasterRunner):
        return
    for pacer in SESSION.pacers.values():
        if pacer.slots_claimed:
            logger.info("schedule of %s", pacer.summary())
    if SESSION.ack_log is not None:
        logger.info(
            "%d acknowledged financial transactions in %s",
            SESSION.ack_log.entries_written,
            SESSION.ack_log.path,
        )


def _on_quitting(environment: Environment, **_: Any) -> None:
    if SESSION.ack_log is not None:
        SESSION.ack_log.close()
        SESSION.ack_log = None
    if SESSION.history is not None:
        SESSION.history.close()
        SESSION.history = None
    if SESSION.timeline is not None:
        SESSION.timeline.close()
        SESSION.timeline = None
    if isinstance(environment.runner, WorkerRunner):
        return
    verdict = judge(environment)
    if verdict is not None and verdict.passed:
        logger.info("SLA gates passed")
        return
    environment.process_exit_code = 1


def judge(environment: Environment) -> gates.Verdict | None:
    """Evaluate and log the gates; write the summary file when asked. None when set-up failed."""
    if SESSION.setup_failures:
        for why in SESSION.setup_failures:
            logger.error("SLA gates failed: the run could not start: %s", why)
        return None
    try:
        load = options.read(environment.parsed_options)
    except ValueError as error:
        logger.error("SLA gates failed: %s", error)
        return None
    verdict = gates.evaluate(environment.stats, load)
    for name, figures in verdict.classes.items():
        logger.info("%s: %.1f/s offered, %s", name, verdict.offered_tps[name], figures.line())
    for cell, figures in verdict.cells.items():
        logger.info("cell %d: %s", cell, figures.line())
    for reason in verdict.reasons:
        logger.error("SLA gate failed: %s", reason)
    if load.summary_json_path:
        Path(load.summary_json_path).write_text(json.dumps(verdict.as_json(), indent=2) + "\n")
    return verdict
