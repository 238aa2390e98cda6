"""The customers the traffic runs over: opened through the API, or loaded from a file.

Owns: opening customers (``POST /v1/applications`` then activating the card) spread over every
cell the core serves, writing them to a population file a later run (e.g. a drill) can reuse,
and loading that file. Applicants earn enough for the Gold product's top limit (500,000 CNY) so
that a long run does not exhaust their lines.
Never: log a full card number or a CVV2 (``Customer`` masks them when printed); open more than
``CUSTOMERS_MAX`` customers; write the file readable by others (it holds card numbers and CVV2s,
as an acquirer's card store would: the one place outside the core's own answers that does).
"""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import urllib.error
import urllib.request
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

from watertight_load.ack_log import now_rfc3339
from watertight_load.options import CUSTOMERS_MAX
from watertight_load.tokens import Tokens
from watertight_load.traffic import cell_of_customer_id, mask_pan

PRODUCT_CODE = "GOLD"
ANNUAL_INCOME_FEN = 100_000_000  # 1,000,000 CNY: the Gold limit is capped at 500,000 CNY
OPEN_CONCURRENCY = 16
REQUEST_TIMEOUT_S = 10.0
FILE_VERSION = 2  # 2: each customer has the CVV2 of the card (card-not-present traffic needs it)

logger = logging.getLogger("watertight.load")


class PopulationError(RuntimeError):
    pass


@dataclass(frozen=True)
class Customer:
    customer_id: str
    account_id: str
    card_id: str
    pan: str = field(repr=False)
    expiry: str
    cell: int
    cvv2: str = field(default="", repr=False)

    def __repr__(self) -> str:
        return f"Customer({self.customer_id}, cell {self.cell}, card {mask_pan(self.pan)})"

    __str__ = __repr__


@dataclass
class Population:
    customers: list[Customer]
    host: str = ""

    def __post_init__(self) -> None:
        if not self.customers:
            raise PopulationError("a population needs at least one customer")
        if len(self.customers) > CUSTOMERS_MAX:
            raise PopulationError(f"{len(self.customers)} customers: at most {CUSTOMERS_MAX}")

    def any(self) -> Customer:
        return random.choice(self.customers)

    def cells(self) -> dict[int, int]:
        """Customers per cell."""
        counts: dict[int, int] = {}
        for customer in self.customers:
            counts[customer.cell] = counts.get(customer.cell, 0) + 1
        return dict(sorted(counts.items()))

    def to_dicts(self) -> list[dict[str, Any]]:
        return [asdict(customer) for customer in self.customers]

    @classmethod
    def from_dicts(cls, rows: Iterable[dict[str, Any]], host: str = "") -> Population:
        return cls([Customer(**row) for row in rows], host)

    def save(self, path: str | Path) -> None:
        """Write atomically with mode 0600: the file holds full card numbers."""
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        document = {
            "version": FILE_VERSION,
            "host": self.host,
            "created": now_rfc3339(),
            "customers": self.to_dicts(),
        }
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as file:
            json.dump(document, file)
        os.replace(temporary, target)

    @classmethod
    def load(cls, path: str | Path) -> Population:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise PopulationError(f"cannot read the population file {path}: {error}") from error
        if document.get("version") != FILE_VERSION:
            raise PopulationError(f"{path}: population file version {document.get('version')} not understood")
        return cls.from_dicts(document["customers"], document.get("host", ""))


def _call(
    host: str, method: str, path: str, body: Any = None, tokens: Tokens | None = None
) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    headers = {"content-type": "application/json", **(tokens.headers(path) if tokens is not None else {})}
    request = urllib.request.Request(host.rstrip("/") + path, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        try:
            return error.code, json.loads(error.read() or b"null")
        except ValueError:
            return error.code, None


def cells_served(host: str) -> list[int]:
    """The cells the gateway at ``host`` routes (from its ``/readyz``); [] when it does not say."""
    try:
        _, body = _call(host, "GET", "/readyz")
    except (OSError, ValueError):
        return []
    if not isinstance(body, dict) or not isinstance(body.get("cells"), dict):
        return []
    return sorted(int(cell) for cell in body["cells"])


def _applicant() -> dict[str, Any]:
    birth = date(random.randint(1965, 2000), random.randint(1, 12), random.randint(1, 28))
    return {
        "name": "持卡人",
        # unique across runs: applicants are hashed to cells by their national id
        "id_number": "LT" + secrets.token_hex(8).upper(),
        "mobile": f"139{random.randrange(10**8):08d}",
        "birth_date": birth.isoformat(),
        "annual_income": ANNUAL_INCOME_FEN,
    }


def open_customer(host: str, tokens: Tokens) -> Customer:
    """Open one account (application, then card activation) and return its customer."""
    status, opened = _call(
        host, "POST", "/v1/applications", {"applicant": _applicant(), "product_code": PRODUCT_CODE}, tokens
    )
    if status != 201 or not isinstance(opened, dict):
        raise PopulationError(f"application answered {status}: {_error_code(opened)}")
    if opened.get("decision") != "approved":
        raise PopulationError(f"application declined: {opened.get('reasons')}")
    status, card = _call(host, "POST", f"/v1/cards/{opened['card_id']}/activate", None, tokens)
    if status != 200:
        raise PopulationError(f"card activation answered {status}: {_error_code(card)}")
    return Customer(
        customer_id=opened["customer_id"],
        account_id=opened["account_id"],
        card_id=opened["card_id"],
        pan=opened["pan"],
        expiry=opened["expiry"],
        cell=cell_of_customer_id(opened["customer_id"]),
        cvv2=opened.get("cvv2") or "",
    )


def _error_code(body: Any) -> str:
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        return str(body["error"].get("code"))
    return "no error body"


def open_population(host: str, count: int, tokens: Tokens, concurrency: int = OPEN_CONCURRENCY) -> Population:
    """Open ``count`` customers, then more (at most ``count`` again) until every cell has one."""
    if not 1 <= count <= CUSTOMERS_MAX:
        raise PopulationError(f"customers must be within 1..{CUSTOMERS_MAX}, got {count}")
    cells = cells_served(host)
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        customers = list(pool.map(lambda _: open_customer(host, tokens), range(count)))
    extra_max = count
    while cells and extra_max > 0 and set(cells) - {customer.cell for customer in customers}:
        customers.append(open_customer(host, tokens))
        extra_max -= 1
    population = Population(customers, host)
    missing = set(cells) - set(population.cells())
    if missing:
        logger.warning("no customer landed in cell(s) %s: their traffic is not exercised", sorted(missing))
    return population


def _stale(path: str) -> bool:
    """A population file of an older version (e.g. without CVV2s) is opened again, not used."""
    try:
        version = json.loads(Path(path).read_text()).get("version")
    except (OSError, ValueError):
        return False  # let load() say what is wrong with it
    if version != FILE_VERSION:
        logger.warning(
            "population %s is of version %s, not %d: opening a new one", path, version, FILE_VERSION
        )
        return True
    return False


def population_for_run(host: str, count: int, tokens: Tokens, path: str = "") -> Population:
    """The population of a run: the file at ``path`` when it exists, else ``count`` customers
    opened now (and written to ``path`` when one is given)."""
    if path and Path(path).exists() and not _stale(path):
        population = Population.load(path)
        if population.host and population.host.rstrip("/") != host.rstrip("/"):
            logger.warning("population %s was opened against %s, not %s", path, population.host, host)
        logger.info(
            "loaded %d customers from %s (per cell: %s)", len(population.customers), path, population.cells()
        )
        return population
    population = open_population(host, count, tokens)
    logger.info(
        "opened %d customers through %s (per cell: %s)", len(population.customers), host, population.cells()
    )
    if path:
        population.save(path)
        logger.info("population written to %s (mode 0600: it holds card numbers)", path)
    return population
