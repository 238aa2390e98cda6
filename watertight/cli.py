"""The `watertight` command line: one subcommand per verb of CONTRACT.md.

Owns: parsing arguments and handing them to the part of the toolkit that does the work. Must
never: hold logic of its own beyond that, or exit 0 for something it did not do.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import date
from pathlib import Path

EXIT_NOT_BUILT = 2
RUN_DIR_HINT = "run/ in the repository"

# which piece of work builds each subcommand that does not exist yet
NOT_BUILT: dict[str, str] = {}


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def _key_value(text: str) -> tuple[str, str]:
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="watertight",
        description="Stand up a three-site, cell-based credit-card core, load it, break it and report.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser("up", help="start the local topology in the background")
    up.add_argument(
        "--topology", metavar="FILE", help="topology description (default: topology.yaml of the repository)"
    )
    up.add_argument("--cells", type=_positive_int, metavar="N", help="number of cells")

    status = commands.add_parser("status", help="sites, cells, replication and health of the topology")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    down = commands.add_parser("down", help="stop everything `up` started")
    down.add_argument(
        "--purge",
        action="store_true",
        help="also delete the data (and so stop with SIGKILL: nothing is kept)",
    )
    for sub in (up, status, down):
        sub.add_argument(
            "--run-dir", metavar="DIR", help=f"run directory (default: $WATERTIGHT_RUN_DIR or {RUN_DIR_HINT})"
        )

    drill = commands.add_parser("drill", help="run a chaos drill under load and write a report")
    drill.add_argument(
        "experiments",
        nargs="*",
        metavar="EXPERIMENT",
        default=[],
        help="default: site-loss-prod (names in chaos/experiments, or paths to experiment files)",
    )
    drill.add_argument("--all", action="store_true", help="every experiment of chaos/experiments, in turn")
    drill.add_argument(
        "--dry-run",
        action="store_true",
        help="list what each action would hit (processes, members, addresses, connections) and what its rollback would do; change nothing",
    )
    drill.add_argument("--junit", metavar="PATH", help="also write JUnit XML: one test case per verdict")
    drill.add_argument(
        "--stop",
        action="store_true",
        help="the kill switch: stop every drill in flight on this topology (its rollbacks run) and return",
    )
    drill.add_argument(
        "--safeguard",
        action="append",
        default=[],
        metavar="NAME=LIMIT",
        help="abort the experiment (rollbacks run, exit 3) when crossed during its method: "
        "unaffected_error_ratio=R (over window_s=S, default 5), missing_acknowledged=N, writable_primaries=N",
    )
    drill.add_argument(
        "--during",
        metavar="TASK",
        help="run while the fault is in force: cycle (the statement cycle for today, or cycle=YYYY-MM-DD) "
        "or runbook:NAME[:key=value,...] (e.g. runbook:switchover-site:site=samecity)",
    )
    drill.add_argument(
        "--target",
        choices=("local", "kubernetes"),
        default=os.environ.get("WATERTIGHT_TARGET") or "local",
        help="the local topology of the run directory, or the cluster of `watertight cluster` (default: $WATERTIGHT_TARGET or local)",
    )
    drill.add_argument(
        "--history",
        metavar="PATH",
        help="the drill history each experiment's figures are appended to (default: reports/history.jsonl)",
    )
    drill.add_argument(
        "--rate-financial", type=_positive_float, metavar="N", help="financial TPS offered (100)"
    )
    drill.add_argument(
        "--rate-nonfinancial", type=_positive_float, metavar="N", help="non-financial TPS offered (300)"
    )
    drill.add_argument("--report-dir", metavar="DIR", help="where report.json and report.html go")
    drill.add_argument(
        "--run-dir", metavar="DIR", help=f"run directory (default: $WATERTIGHT_RUN_DIR or {RUN_DIR_HINT})"
    )

    bench = commands.add_parser("bench", help="CPU microseconds per transaction on the running topology")
    bench.add_argument(
        "--seconds", type=_positive_float, default=15.0, metavar="S", help="measurement window per class (15)"
    )
    bench.add_argument("--json", action="store_true", help="machine-readable output")
    bench.add_argument(
        "--target",
        choices=("local", "kubernetes"),
        default=os.environ.get("WATERTIGHT_TARGET") or "local",
        help="the local topology of the run directory, or the cluster of `watertight cluster` (default: $WATERTIGHT_TARGET or local)",
    )
    bench.add_argument(
        "--rate-financial",
        type=_positive_float,
        default=500.0,
        metavar="N",
        help="financial TPS offered (500)",
    )
    bench.add_argument(
        "--rate-nonfinancial",
        type=_positive_float,
        default=2500.0,
        metavar="N",
        help="non-financial TPS offered (2500)",
    )
    bench.add_argument(
        "--customers", type=_positive_int, default=100, metavar="N", help="customers opened for the run (100)"
    )
    bench.add_argument(
        "--no-saturation",
        action="store_true",
        help="skip the search for the highest rate each class sustains (p99 <= 50 ms, no error)",
    )
    bench.add_argument(
        "--saturation-seconds",
        type=_positive_float,
        metavar="S",
        help="window of each step of the saturation search (default: a third of --seconds, at least 3)",
    )
    bench.add_argument(
        "--via",
        choices=("gateways", "entry"),
        default="gateways",
        help="send the load to the site gateways (default; the entry is not counted) or through the entry (counted)",
    )
    bench.add_argument(
        "--run-dir", metavar="DIR", help=f"run directory (default: $WATERTIGHT_RUN_DIR or {RUN_DIR_HINT})"
    )

    soak = commands.add_parser(
        "soak",
        help="a long mixed run across statement dates, the cycle running under load; the drills' invariants after",
    )
    soak.add_argument(
        "--seconds", type=_positive_float, default=600.0, metavar="S", help="length of the run (600)"
    )
    soak.add_argument(
        "--rate-financial",
        type=_positive_float,
        default=100.0,
        metavar="N",
        help="financial TPS offered (100)",
    )
    soak.add_argument(
        "--rate-nonfinancial",
        type=_positive_float,
        default=300.0,
        metavar="N",
        help="non-financial TPS offered (300)",
    )
    soak.add_argument(
        "--business-days",
        type=_positive_int,
        default=56,
        metavar="N",
        help="consecutive business dates the cycle runs for during the run (56: every account twice)",
    )
    soak.add_argument(
        "--first-business-date",
        type=date.fromisoformat,
        metavar="YYYY-MM-DD",
        help="the first of them (default: the day after the latest business date the cells know)",
    )
    soak.add_argument(
        "--customers",
        type=_positive_int,
        default=200,
        metavar="N",
        help="customers opened when the run has none (200)",
    )
    soak.add_argument("--report-dir", metavar="DIR", help="where soak.json and the load's reports go")
    soak.add_argument(
        "--run-dir", metavar="DIR", help=f"run directory (default: $WATERTIGHT_RUN_DIR or {RUN_DIR_HINT})"
    )

    report = commands.add_parser("report", help="read the drill reports: `report history` shows the trend")
    report.add_argument("what", choices=("history",), metavar="history")
    report.add_argument(
        "--history", metavar="PATH", help="the drill history (default: reports/history.jsonl)"
    )
    report.add_argument("--json", action="store_true", help="machine-readable output")

    runbook = commands.add_parser("runbook", help="run a runbook from runbooks/ against the current target")
    runbook.add_argument("name", metavar="NAME")
    runbook.add_argument(
        "--extra",
        action="extend",
        nargs="+",
        type=_key_value,
        default=[],
        metavar="KEY=VALUE",
        help="extra variables for the runbook (e.g. site=prod, cell=2, state=serving, ack_log=PATH)",
    )
    runbook.add_argument(
        "--check",
        action="store_true",
        help="check mode: every step says what it would change, nothing changes",
    )
    runbook.add_argument("--json", action="store_true", help="print the summary as JSON on stdout")
    runbook.add_argument(
        "--target",
        choices=("local", "kubernetes"),
        default=os.environ.get("WATERTIGHT_TARGET") or "local",
        help="the local topology of the run directory, or the three clusters (default: $WATERTIGHT_TARGET or local)",
    )
    runbook.add_argument(
        "--kube-contexts",
        metavar="SITE=CTX,...",
        help="target kubernetes: one kube context per site, prod=CTX,samecity=CTX,dr=CTX (default: $WATERTIGHT_KUBE_CONTEXTS, else the local cluster of `watertight cluster`)",
    )
    runbook.add_argument(
        "--kube-namespace",
        metavar="NS",
        help="target kubernetes: the topology's namespace in every cluster (default: $WATERTIGHT_KUBE_NAMESPACE or watertight)",
    )
    runbook.add_argument(
        "--topology",
        metavar="FILE",
        help="target kubernetes: the topology file the stack was deployed from (default: $WATERTIGHT_TOPOLOGY or topology.yaml)",
    )
    runbook.add_argument(
        "--run-dir", metavar="DIR", help=f"run directory (default: $WATERTIGHT_RUN_DIR or {RUN_DIR_HINT})"
    )
    cluster = commands.add_parser(
        "cluster", help="a real single-node Kubernetes cluster here, with the Pulumi program's objects on it"
    )
    cluster.add_argument(
        "action",
        choices=("up", "status", "down"),
        help="up: build or reuse the binaries and images, start the node, apply the objects, wait for every pod; "
        "status; down: stop everything and put the machine back as it was",
    )
    cluster.add_argument(
        "--json", action="store_true", help="machine-readable output (status, and up's result)"
    )
    cluster.add_argument("--purge", action="store_true", help="down: also delete the cluster directory")
    return parser


def _run_dir(args: argparse.Namespace) -> Path:
    from watertight.runtime.local import RUN_DIR_DEFAULT

    chosen = args.run_dir or os.environ.get("WATERTIGHT_RUN_DIR")
    return Path(chosen) if chosen else RUN_DIR_DEFAULT


def _say(line: str) -> None:
    print(f"==> {line}", flush=True)


def cmd_up(args: argparse.Namespace) -> int:
    from watertight import topology as topology_module
    from watertight.runtime.local import LocalRuntime

    path = Path(args.topology) if args.topology else topology_module.DEFAULT_PATH
    topology = topology_module.load(path, cells=args.cells)
    text = path.read_text(encoding="utf-8") if args.cells is None else topology_module.dump(topology)
    runtime = LocalRuntime(_run_dir(args), topology, text)
    _say(
        f"bringing up {topology.name}: {topology.cells} cells over prod, samecity and dr (run dir {runtime.run_dir})"
    )
    result = runtime.up(progress=_say)
    print(f"entry: {result['entry']}")
    for site in ("prod", "samecity"):
        print(f"gateway {site}: {topology.gateway_url(site)}")
    print(f"API tokens (Authorization: Bearer, one per client kind): {runtime.secrets_path} (api_tokens)")
    if topology.monitoring.enabled:
        print(f"prometheus: {topology.prometheus_url}")
        print(f"alertmanager: {topology.alertmanager_url}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from watertight.runtime.local import LocalRuntime
    from watertight.runtime.report import status_table

    status = LocalRuntime(_run_dir(args)).status()
    if args.json:
        print(json.dumps(status, indent=2))
    else:
        print(status_table(status))
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from watertight.runtime.local import LocalRuntime, RuntimeError_

    try:
        runtime = LocalRuntime(_run_dir(args))
    except RuntimeError_:
        _say("nothing runs from this run directory")
        if args.purge:
            shutil.rmtree(_run_dir(args), ignore_errors=True)
        return 0
    runtime.down(purge=args.purge, progress=_say)
    return 0


def cmd_drill(args: argparse.Namespace) -> int:
    from watertight import drill
    from watertight.chaos import safeguards
    from watertight.runtime.kubernetes import KubernetesRuntimeError
    from watertight.runtime.target import TargetUnsupported

    if args.stop:
        return drill.stop(_run_dir(args), _say)
    experiments = list(args.experiments)
    if args.all:
        experiments += [name for name in drill.catalogue() if name not in experiments]
    experiments = experiments or ["site-loss-prod"]
    if args.dry_run:
        for name in experiments:
            drill.load_experiment(name)
        try:
            print(drill.dry_run(experiments, _run_dir(args), args.target))
        except TargetUnsupported as error:
            print(f"watertight drill: {error}", file=sys.stderr)
            return EXIT_NOT_BUILT
        return 0
    try:
        limits = safeguards.parse_limits(",".join(args.safeguard))
        drill.parse_during(args.during)
    except ValueError as error:
        print(f"watertight drill: {error}", file=sys.stderr)
        return 2
    report_dir = (
        Path(args.report_dir) if args.report_dir else Path("reports") / time.strftime("drill-%Y%m%d-%H%M%S")
    )
    report_dir.mkdir(parents=True, exist_ok=True)
    _say(f"drill {', '.join(experiments)}: reports in {report_dir}")
    options = drill.Options(
        rate_financial=args.rate_financial or 100.0,
        rate_nonfinancial=args.rate_nonfinancial or 300.0,
        safeguards=limits,
        during=args.during,
        history_path=Path(args.history) if args.history else drill.HISTORY_DEFAULT,
    )
    try:
        code = drill.run(
            experiments,
            options.rate_financial,
            options.rate_nonfinancial,
            report_dir.absolute(),
            _run_dir(args),
            _say,
            options,
            Path(args.junit).absolute() if args.junit else None,
            target=args.target,
        )
    except (TargetUnsupported, KubernetesRuntimeError) as error:
        print(f"watertight drill --target {args.target}: {error}", file=sys.stderr)
        return 2
    verdict = {drill.EXIT_PASSED: "PASSED", drill.EXIT_ABORTED: "ABORTED"}.get(code, "FAILED")
    _say(f"{verdict}: see {report_dir.absolute()}/*/report.html")
    return code


def cmd_report(args: argparse.Namespace) -> int:
    from watertight import drill, trend

    path = Path(args.history) if args.history else drill.HISTORY_DEFAULT
    try:
        found = trend.trends(trend.read(path))
    except ValueError as error:
        print(f"watertight report: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2, default=str))
    else:
        print(trend.table(found))
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from watertight import bench
    from watertight.chaos import targets
    from watertight.runtime.target import TargetUnsupported

    runtime = targets.runtime(getattr(args, "target", targets.LOCAL), str(_run_dir(args)))
    say = (lambda line: print(f"==> {line}", file=sys.stderr, flush=True)) if args.json else _say
    try:
        result = bench.run(
            runtime,
            args.seconds,
            args.rate_financial,
            args.rate_nonfinancial,
            args.customers,
            say,
            saturation=not args.no_saturation,
            saturation_seconds=args.saturation_seconds,
            via=args.via,
        )
    except TargetUnsupported as error:
        print(f"watertight bench: {error}", file=sys.stderr)
        return EXIT_NOT_BUILT
    print(json.dumps(result, indent=2) if args.json else bench.table(result))
    return 0


def cmd_soak(args: argparse.Namespace) -> int:
    from watertight import drill, soak
    from watertight.runtime.local import LocalRuntime

    runtime = LocalRuntime(_run_dir(args))
    report_dir = (
        Path(args.report_dir) if args.report_dir else Path("reports") / time.strftime("soak-%Y%m%d-%H%M%S")
    )
    _say(f"topology: making sure it is up (run dir {runtime.run_dir}); reports in {report_dir}")
    runtime.up(_say)
    plan = soak.Plan(
        seconds=args.seconds,
        rate_financial=args.rate_financial,
        rate_nonfinancial=args.rate_nonfinancial,
        business_days=args.business_days,
        customers=args.customers,
        first_business_date=args.first_business_date,
    )
    result = soak.run(
        runtime.topology.entry_url,
        list(runtime.topology.cell_numbers),
        plan,
        report_dir.absolute(),
        runtime.run_dir / "load" / "population.json",
        lambda acked: drill.found_in_ledgers(runtime, acked),
        _say,
        runtime.api_tokens(),
        runtime.secrets_path,
    )
    return 0 if result["passed"] else 1


def cmd_runbook(args: argparse.Namespace) -> int:
    from watertight.chaos import targets
    from watertight.runbooks import kube, runner
    from watertight.runtime.kubernetes import KubernetesRuntimeError

    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    try:
        extras = runner.parse_extras([f"{key}={value}" for key, value in args.extra])
        target: runner.RunbookTarget | None = None
        if args.target == "kubernetes" and not (args.kube_contexts or os.environ.get(kube.CONTEXTS_ENV)):
            # no clusters named: the local cluster of `watertight cluster`, as the drill finds it
            try:
                target = targets.runtime(targets.KUBERNETES, str(_run_dir(args)))
            except KubernetesRuntimeError as error:
                raise kube.KubeTargetError(
                    f"{error}; or name the clusters: --kube-contexts prod=CTX,samecity=CTX,dr=CTX (or ${kube.CONTEXTS_ENV})"
                ) from None
        elif args.target == "kubernetes":
            target = kube.KubeTarget.from_settings(args.kube_contexts, args.kube_namespace, args.topology)
        summary = runner.run(args.name, extras, _run_dir(args), check=args.check, progress=say, target=target)
    except (runner.RunbookError, kube.KubeTargetError, KubernetesRuntimeError) as error:
        print(f"watertight runbook: {error}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    elif summary["rc"] != 0:
        print(
            f"watertight runbook {args.name}: failed at {summary['failed_step'] or 'a step'}: "
            f"{summary.get('error')}; the artifacts are in {summary['artifacts']}. Fix the cause and run "
            "the runbook again: every step is idempotent",
            file=sys.stderr,
        )
    return 0 if summary["rc"] == 0 else 1


def cmd_cluster(args: argparse.Namespace) -> int:
    from watertight.cluster import binaries, control, images
    from watertight.cluster.node import ClusterError
    from watertight.cluster.spec import SpecError

    say = (lambda line: print(f"==> {line}", file=sys.stderr, flush=True)) if args.json else _say
    try:
        if args.action == "up":
            document = control.up(say)
            control.print_status(document, args.json)
            return 0 if document["up"] else 1
        if args.action == "status":
            document = control.status()
            control.print_status(document, args.json)
            return 0
        remaining = control.down(say, purge=args.purge)
    except (ClusterError, SpecError, binaries.BuildError, images.ImageError) as error:
        print(f"watertight cluster {args.action}: {error}", file=sys.stderr)
        return 1
    if remaining:
        print(
            "watertight cluster down: the machine differs from before the cluster:\n  "
            + "\n  ".join(remaining),
            file=sys.stderr,
        )
        return 1
    say("the cluster is down and the machine is as it was before it")
    return 0


COMMANDS = {
    "cluster": cmd_cluster,
    "up": cmd_up,
    "status": cmd_status,
    "down": cmd_down,
    "bench": cmd_bench,
    "drill": cmd_drill,
    "soak": cmd_soak,
    "report": cmd_report,
    "runbook": cmd_runbook,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from watertight.runtime.local import RuntimeError_
    from watertight.topology import TopologyError

    handler = COMMANDS.get(args.command)
    if handler is not None:
        try:
            return handler(args)
        except (TopologyError, RuntimeError_) as error:
            print(f"watertight {args.command}: {error}", file=sys.stderr)
            return 1
    builder = NOT_BUILT.get(args.command)
    if builder is not None:
        print(f"watertight {args.command} is not built yet; it comes with {builder}.", file=sys.stderr)
        return EXIT_NOT_BUILT
    return 0


if __name__ == "__main__":
    sys.exit(main())
