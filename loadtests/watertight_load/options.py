"""The custom command line arguments of the card traffic (also editable in the Locust web UI).

Owns: their names, defaults and bounds, and reading them back from ``environment.parsed_options``.
Never: default to a value the web UI cannot round-trip (every default is typed, none is None).
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Any

CUSTOMERS_DEFAULT = 200
CUSTOMERS_MAX = 20_000
RATE_TPS_MAX = 100_000.0


@dataclass(frozen=True)
class LoadOptions:
    rate_financial_tps: float
    rate_nonfinancial_tps: float
    ack_log_path: str
    customers: int
    population_path: str
    max_error_ratio: float
    max_p99_ms: float
    min_tps_ratio: float
    summary_json_path: str
    api_tokens_path: str
    history_path: str = ""
    read_back_ratio: float = 1.0
    timeline_path: str = ""

    def offered_tps(self) -> dict[str, float]:
        return {"financial": self.rate_financial_tps, "nonfinancial": self.rate_nonfinancial_tps}


def add_arguments(parser: Any, **_: Any) -> None:
    """Listener of ``events.init_command_line_parser`` (on Locust's own parser: its argument
    groups do not know ``include_in_web_ui``)."""
    group = parser
    group.add_argument(
        "--rate-financial",
        type=float,
        default=50.0,
        include_in_web_ui=True,
        help="financial transactions per second offered, in total over all users and processes "
        "(authorization, clearing, reversal, repayment, installment booking); 0 offers none",
    )
    group.add_argument(
        "--rate-nonfinancial",
        type=float,
        default=250.0,
        include_in_web_ui=True,
        help="non-financial requests per second offered, in total (balance, limits, card, tags, "
        "installment quote, routing); 0 offers none",
    )
    group.add_argument(
        "--ack-log",
        default="",
        include_in_web_ui=True,
        help="append every acknowledged financial transaction to this file as a JSON line "
        "(worker processes write PATH.worker-<host>-<pid>); empty: no ack log",
    )
    group.add_argument(
        "--history",
        default="",
        include_in_web_ui=True,
        help="append the client's history to this file as JSON lines: acknowledged writes, reads "
        "of accounts' transactions and indeterminate requests, for the stale-read and "
        "indeterminate verdicts of a drill (workers write PATH.worker-<host>-<pid>); empty: none",
    )
    group.add_argument(
        "--timeline",
        default="",
        include_in_web_ui=True,
        help="append every request's outcome to this file as a JSON line {t, cell, ok}, as it "
        "happens (the drill's safeguards read it mid-run; workers write PATH.worker-<host>-<pid>); "
        "empty: none",
    )
    group.add_argument(
        "--read-back-ratio",
        type=float,
        default=1.0,
        include_in_web_ui=True,
        help="with --history: the share of acknowledged clearings and repayments the cardholder "
        "reads back at once (its account's newest transactions must show it), 0..1",
    )
    group.add_argument(
        "--customers",
        type=int,
        default=CUSTOMERS_DEFAULT,
        include_in_web_ui=True,
        help=f"customers to open through the API when no population file is given or found "
        f"(1..{CUSTOMERS_MAX})",
    )
    group.add_argument(
        "--population",
        default="",
        include_in_web_ui=True,
        help="population file: loaded when it exists, else written with the customers opened "
        "(it holds full card numbers: mode 0600)",
    )
    group.add_argument(
        "--max-error-ratio",
        type=float,
        default=0.01,
        include_in_web_ui=True,
        help="SLA gate: failed requests / requests at most this (declines are not failures; "
        "response code 91 is)",
    )
    group.add_argument(
        "--max-p99-ms",
        type=float,
        default=50.0,
        include_in_web_ui=True,
        help="SLA gate: 99th percentile latency of all requests at most this many milliseconds",
    )
    group.add_argument(
        "--min-tps-ratio",
        type=float,
        default=0.95,
        include_in_web_ui=True,
        help="SLA gate: achieved / offered transactions per second at least this, per traffic "
        "class (successful requests only); 0 disables",
    )
    group.add_argument(
        "--api-tokens",
        default=os.environ.get("WATERTIGHT_API_TOKENS", ""),
        include_in_web_ui=True,
        help="the API tokens: a JSON file whose api_tokens holds one token per client kind (the "
        "secrets file `watertight status --json` names; default $WATERTIGHT_API_TOKENS)",
    )
    group.add_argument(
        "--summary-json",
        default="",
        include_in_web_ui=True,
        help="write the figures and the gate verdict to this JSON file when Locust quits",
    )


def read(parsed_options: argparse.Namespace | None) -> LoadOptions:
    """The arguments as typed values, checked against their bounds (ValueError names the argument)."""
    if parsed_options is None:
        raise ValueError("no parsed options: run through the locust command line")

    def number(name: str) -> float:
        # the web UI converts with the type of the default, but a None default would stay a string
        return float(getattr(parsed_options, name))

    options = LoadOptions(
        rate_financial_tps=number("rate_financial"),
        rate_nonfinancial_tps=number("rate_nonfinancial"),
        ack_log_path=str(parsed_options.ack_log or ""),
        customers=int(number("customers")),
        population_path=str(parsed_options.population or ""),
        max_error_ratio=number("max_error_ratio"),
        max_p99_ms=number("max_p99_ms"),
        min_tps_ratio=number("min_tps_ratio"),
        summary_json_path=str(parsed_options.summary_json or ""),
        api_tokens_path=str(getattr(parsed_options, "api_tokens", "") or ""),
        history_path=str(getattr(parsed_options, "history", "") or ""),
        read_back_ratio=float(getattr(parsed_options, "read_back_ratio", 1.0)),
        timeline_path=str(getattr(parsed_options, "timeline", "") or ""),
    )
    for name, rate in options.offered_tps().items():
        if not 0 <= rate <= RATE_TPS_MAX:
            raise ValueError(f"--rate-{name} must be within 0..{RATE_TPS_MAX:.0f}, got {rate}")
    if not 1 <= options.customers <= CUSTOMERS_MAX:
        raise ValueError(f"--customers must be within 1..{CUSTOMERS_MAX}, got {options.customers}")
    if not 0 <= options.max_error_ratio <= 1:
        raise ValueError(f"--max-error-ratio must be within 0..1, got {options.max_error_ratio}")
    if options.max_p99_ms <= 0:
        raise ValueError(f"--max-p99-ms must be positive, got {options.max_p99_ms}")
    if not 0 <= options.read_back_ratio <= 1:
        raise ValueError(f"--read-back-ratio must be within 0..1, got {options.read_back_ratio}")
    if not 0 <= options.min_tps_ratio <= 1:
        raise ValueError(f"--min-tps-ratio must be within 0..1, got {options.min_tps_ratio}")
    if not options.api_tokens_path:
        raise ValueError(
            "--api-tokens is required (or $WATERTIGHT_API_TOKENS): the core refuses requests without "
            "a token; `watertight status --json` names the local topology's file under secrets"
        )
    return options
