"""One cell as seen by an app server: its database, its catalogue cache and its group commit.

Financial requests are queued and written in batches: one database transaction (one commit,
one synchronous-replication round trip) for up to ``batch_size_max`` requests, gathered for at
most ``batch_wait_ms_max``. Inside a batch every account is locked in id order, decisions are
made in Python over the loaded state, and the effects are written with set-based SQL.

Fencing: where the cell's members run under Patroni (``patroni_urls``), the engine serves only
from the member whose Patroni says it holds the leader lock (``GET /primary``: 200 only for a
running primary with the lock), re-asks every ``probe_interval_ms`` and at once after any database
error, and drops every connection to a member the moment it is no longer the one: "not in
recovery" is not enough, a deposed primary whose Patroni died or froze is writable too. A
connection serves only when its server is the very PostgreSQL the lock holder's Patroni reported:
the same ``pg_postmaster_start_time()`` (an address would not do: on Kubernetes the member is a
Service name and the server sees its pod's address). ``epoch`` changes with every change of
member, so nothing cached outlives a failover.

Never: answer a financial request before its commit; post twice for one idempotency key; read or
write through a member that does not hold the leader lock when Patroni runs the cell.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Any, Protocol

import asyncpg
import msgspec

from cardcore.common import catalogue, ids
from cardcore.common.crypto import PanVault, version_of
from cardcore.common.pricing import PricingRule, rule_id_of
from cardcore.common.tags import BUILTIN_TAGS, TagRule
from cardcore.limits.lines import AccountState
from cardcore.platform import db
from cardcore.platform.http import ApiError, encode
from cardcore.platform.settings import AppSettings, CellSettings
from cardcore.platform.state import Writes, business_date, state_from_row, value_date
from cardcore.platform.tls import client_context
from cardcore.platform.upstream import UpstreamError, UpstreamPool

log = logging.getLogger("cardcore.engine")

BATCH_RETRIES_MAX = 3
SUBMIT_TIMEOUT_S = 10.0
LEADER_PROBE_TIMEOUT_S = 0.5


def postmaster_started(body: bytes) -> datetime | None:
    """``postmaster_start_time`` of a Patroni status answer (``str()`` of an aware datetime, e.g.
    2026-12-01 07:08:57.853386+00:00), or None when it is missing or not a time."""
    try:
        value = msgspec.json.decode(body).get("postmaster_start_time")
        started = datetime.fromisoformat(value) if isinstance(value, str) else None
    except (msgspec.DecodeError, AttributeError, ValueError):
        return None
    return started if started is not None and started.tzinfo is not None else None


class NoLeaderError(Exception):
    """No member holds the cell's leader lock (a failover under way), or more than one says so."""


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ConnectionError,
    asyncio.TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.ConnectionDoesNotExistError,
    asyncpg.CannotConnectNowError,
    asyncpg.ReadOnlySQLTransactionError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
    asyncpg.QueryCanceledError,
    asyncpg.PostgresConnectionError,
    # every member answers, none is writable: a promotion under way, or a cell's members all
    # standbys (the centers following dr during a failback)
    asyncpg.TargetServerAttributeNotMatched,
    # committed on the primary only: PostgreSQL stopped waiting for the sync standby
    db.CommitNotConfirmedError,
    # fenced: no member holds the leader lock, or the connection is not to the one that does
    NoLeaderError,
    # the pool a request was using was terminated under it by that fencing ("release() called on
    # a free connection holder"): the request's fate is unknown to it, as after a reset
    asyncpg.exceptions.InternalClientError,
)
RETRY_ERRORS = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)
# the request hash of an idempotency key a reversal claimed before its request arrived: the late
# request gets the answer stored with the claim (see ``replay``)
CLAIMED_HASH = hashlib.sha256(b"claimed by a reversal before the request arrived").digest()

Result = tuple[int, bytes]


def unavailable(cell: int, why: str) -> ApiError:
    return ApiError(
        503,
        "cell_unavailable",
        f"cell {cell} is unavailable ({why}); retry with the same idempotency_key",
        None,
    )


@dataclass(slots=True)
class Needs:
    pan_tokens: set[bytes] = field(default_factory=set)
    auth_ids: set[str] = field(default_factory=set)
    account_ids: set[str] = field(default_factory=set)
    plan_ids: set[str] = field(default_factory=set)
    transaction_ids: set[str] = field(default_factory=set)
    original_keys: set[str] = field(default_factory=set)  # keys of earlier requests a reversal names


@dataclass(slots=True)
class Op:
    kind: str
    key: str
    request_hash: bytes  # the keyed digest of ``canonical`` under the current key version
    request: Any
    path_id: str | None
    future: asyncio.Future[Result]
    canonical: bytes = b""  # kind, path id and the encoded request: digested again under an older key
    # how the handler is to apply it, not part of what the request is (nor of its hash): a
    # reversal by key asked of every cell first applies only where its original is known
    mode: str = ""


class VaultSource(Protocol):
    """Where an engine finds the keys as they are now (``service.KeyRing``: a rotation changes them)."""

    @property
    def vault(self) -> PanVault: ...


class OpHandler(Protocol):
    """One kind of financial request. A handler class may set ``claimable = True``: a late request
    of its kind whose key a reversal claimed first gets the answer stored with the claim."""

    def needs(self, op: Op, needs: Needs, vault: PanVault) -> None: ...

    def apply(self, ctx: BatchContext, op: Op) -> tuple[int, dict[str, Any]]: ...


HANDLERS: dict[str, OpHandler] = {}


def register(kind: str, handler: OpHandler) -> None:
    HANDLERS[kind] = handler


@dataclass(slots=True)
class Catalogue:
    products: dict[str, dict[str, Any]] = field(default_factory=dict)
    product_names: dict[str, str] = field(default_factory=dict)
    default_product: str = ""
    rules: list[tuple[str, PricingRule]] = field(default_factory=list)
    tag_definitions: dict[str, tuple[str, TagRule | None]] = field(default_factory=dict)

    @property
    def tag_rules(self) -> dict[str, TagRule]:
        return {tag: rule for tag, (_, rule) in self.tag_definitions.items() if rule is not None}


class BatchContext:
    """What handlers see inside one batch: loaded rows, locked accounts, and the write buffer."""

    def __init__(self, engine: CellEngine, conn: asyncpg.Connection, now: datetime) -> None:
        self.engine = engine
        self.conn = conn
        self.now = now
        self.cell = engine.cell
        self.catalogue = engine.catalogue
        self.vault = engine.vault
        self.settings = engine.settings
        self.cards: dict[bytes, dict[str, Any]] = {}  # by PAN token (of any key version)
        self.auths: dict[str, dict[str, Any]] = {}
        self.plans: dict[str, dict[str, Any]] = {}
        self.transactions: dict[str, dict[str, Any]] = {}
        self.accounts: dict[str, AccountState] = {}
        self.booked_transactions: set[str] = set()
        self.writes = Writes()
        self.business_date: date = now.date()
        # idempotency records of the keys this batch's reversals name (read before the lock)
        self.originals: dict[str, tuple[bytes, int, bytes]] = {}
        # what the requests applied so far in this batch answered, by key: (kind, body)
        self.answered: dict[str, tuple[str, dict[str, Any]]] = {}
        # keys claimed in this batch by a reversal of a request not yet seen: the stored answer
        self.claimed: dict[str, tuple[bytes, int, bytes]] = {}

    def new_id(self, prefix: str) -> str:
        return ids.new_id(prefix, self.cell)

    def card_for_pan(self, pan: str) -> dict[str, Any] | None:
        """The card of a PAN among those loaded, found by its token under any key version."""
        for token in self.vault.tokens(pan):
            card = self.cards.get(token)
            if card is not None:
                return card
        return None

    def account(self, account_id: str) -> AccountState | None:
        return self.accounts.get(account_id)

    def value_date(self, state: AccountState) -> date:
        """The value date of what this batch posts on ``state``'s account."""
        return value_date(state, self.business_date)

    async def load(self, needs: Needs, keys: list[str]) -> dict[str, tuple[bytes, int, bytes]]:
        """Everything the batch needs, with its accounts locked, in one round trip; returns the
        idempotency records of ``keys`` that exist."""
        raw = await self.conn.fetchval(
            "SELECT cardcore_load_batch_v3($1::text[], $2::bytea[], $3::text[], $4::text[], $5::text[], $6::text[],"
            " $7::text[], $8)",
            keys,
            list(needs.pan_tokens),
            list(needs.auth_ids),
            list(needs.plan_ids),
            list(needs.transaction_ids),
            list(needs.account_ids),
            list(needs.original_keys),
            self.now,
        )
        loaded = _decode_loaded(raw)
        self.business_date = business_date(loaded.clock, self.now)
        self.originals = {
            key: (bytes.fromhex(digest), status, response.encode())
            for key, digest, status, response in loaded.originals or ()
        }
        for token, card_id, account_id, status, expiry, cvv_version, failures, locked in loaded.cards or ():
            self.cards[bytes.fromhex(token)] = {
                "card_id": card_id,
                "account_id": account_id,
                "status": status,
                "expiry": expiry,
                "cvv_key_version": cvv_version,
                "cnp_failures": failures,
                "cnp_locked": bool(locked),
            }
        for auth_id, auth_account, auth_card, line, amount, hold, status, expired, card_status in (
            loaded.auths or ()
        ):
            self.auths[auth_id] = {
                "auth_id": auth_id,
                "account_id": auth_account,
                "card_id": auth_card,
                "line": line,
                "amount_fen": amount,
                "hold_fen": hold,
                "status": status,
                "expired": expired,
                "card_status": card_status,
            }
        for plan_id, account_id, principal, terms, schedule, periods_billed, status in loaded.plans or ():
            self.plans[plan_id] = {
                "plan_id": plan_id,
                "account_id": account_id,
                "principal_fen": principal,
                "terms": terms,
                "schedule": schedule,
                "periods_billed": periods_billed,
                "status": status,
            }
        for transaction_id, account_id, kind, amount, converted_by, mcc, valued, refunded in (
            loaded.txns or ()
        ):
            self.transactions[transaction_id] = {
                "transaction_id": transaction_id,
                "account_id": account_id,
                "kind": kind,
                "amount_fen": amount,
                "converted_by": converted_by,
                "mcc": mcc,
                "value_date": valued,
                "refunded_fen": refunded,
            }
        today = self.now.date()
        for row in loaded.accounts or ():
            # the load expired the stale holds on the lines as well: nothing to write back
            state, _ = state_from_row(row, today)
            self.accounts[state.account_id] = state
        return {
            key: (bytes.fromhex(digest), status, response.encode())
            for key, digest, status, response in loaded.idem or ()
        }


class _Loaded(msgspec.Struct):
    idem: list[tuple[str, str, int, str]] | None = None
    originals: list[tuple[str, str, int, str]] | None = None
    cards: list[tuple[str, str, str, str, str, int | None, int, bool | None]] | None = None
    auths: list[tuple[str, str | None, str | None, str, int, int, str, bool, str | None]] | None = None
    plans: list[tuple[str, str, int, int, list[dict[str, int]], int, str]] | None = None
    txns: list[tuple[str, str, str, int, str | None, str | None, date, int]] | None = None
    accounts: list[list[Any]] | None = None
    clock: date | None = None


_decode_loaded = msgspec.json.Decoder(_Loaded).decode


class CellEngine:
    def __init__(
        self, cell: int, cell_settings: CellSettings, settings: AppSettings, keys: VaultSource
    ) -> None:
        self.cell = cell
        self.cell_settings = cell_settings
        self.settings = settings
        self.keys = keys
        self.catalogue = Catalogue()
        self.pool: asyncpg.Pool | None = None
        self.ready = False
        self.leader_site: str | None = cell_settings.leader_site
        self.last_error = "not started"
        self._writer_conn: asyncpg.Connection | None = None
        # fencing: the member (host:port) every connection goes to, and a change counter
        self.serving_member: str | None = None
        self.holder_started: datetime | None = None  # when the lock holder's PostgreSQL started
        self.epoch = 0
        # an https:// Patroni is verified with the run's CA (settings.tls_ca_file, checked at load)
        context = client_context(settings.tls_ca_file) if settings.tls_ca_file is not None else None
        self._patroni = {
            member: UpstreamPool(url, size_max=2, connect_timeout=LEADER_PROBE_TIMEOUT_S, ssl_context=context)
            for member, url in cell_settings.patroni_urls.items()
        }
        self._probe_now = asyncio.Event()
        self._queue: asyncio.Queue[Op] = asyncio.Queue(maxsize=settings.queue_depth_max)
        self._tasks: list[asyncio.Task[None]] = []
        self.batches_committed = 0
        self.ops_committed = 0
        self.on_batch: Callable[[int, float], None] | None = None

    @property
    def queue_depth(self) -> int:
        """Financial requests waiting for the writer now (at most ``queue_depth_max``)."""
        return self._queue.qsize()

    @property
    def vault(self) -> PanVault:
        """The keys as they are now; a batch takes them once (``BatchContext.vault``)."""
        return self.keys.vault

    # ---- life cycle -------------------------------------------------------------------------

    def _server_settings(self, role: str) -> dict[str, str]:
        return {
            "statement_timeout": str(self.settings.statement_timeout_ms),
            "lock_timeout": str(self.settings.statement_timeout_ms),
            "application_name": f"cardcore-{self.settings.site}-cell{self.cell}-{role}",
        }

    def _members(self) -> list[str]:
        """Where connections may go: the lock holder when Patroni runs the cell (none while no
        member holds it), else every member (the writable one is chosen)."""
        if self._patroni:
            if self.serving_member is None:
                raise NoLeaderError("no member holds the leader lock")
            return [self.serving_member]
        return list(self.cell_settings.member_sites)

    async def _connect(self, role: str) -> asyncpg.Connection:
        return await db.connect_writable(
            self.cell_settings.dsn,
            self._members(),
            timeout=self.settings.connect_timeout_ms / 1000,
            command_timeout=self.settings.statement_timeout_ms / 1000,
            server_settings=self._server_settings(role),
        )

    async def _pool_connect(self, dsn: str, **kwargs: Any) -> asyncpg.Connection:
        """The pool's way to open a connection: to the writable member, as ``_connect``."""
        kwargs.pop("loop", None)
        return await db.connect_writable(dsn, self._members(), **kwargs)

    async def start(self) -> None:
        """Connect, migrate, seed the catalogue; keeps going in the background if the cell is down."""
        self._tasks.append(asyncio.create_task(self._probe_loop(), name=f"probe-cell{self.cell}"))
        self._tasks.append(asyncio.create_task(self._writer_loop(), name=f"writer-cell{self.cell}"))
        self._tasks.append(asyncio.create_task(self._catalogue_loop(), name=f"catalogue-cell{self.cell}"))
        try:
            await self._ensure_pool()
        except UNAVAILABLE_ERRORS as error:
            self.last_error = f"{type(error).__name__}: {error}"
            log.warning(
                "cell %s: database not reachable at start (%s); will keep trying", self.cell, self.last_error
            )

    async def _ensure_pool(self) -> asyncpg.Pool:
        if self.pool is None:
            conn = await self._connect("migrate")
            try:
                applied = await db.migrate(conn)
                if applied:
                    log.info("cell %s: applied migrations %s", self.cell, ", ".join(applied))
                await seed_catalogue(conn)
            finally:
                await conn.close()
            self.pool = await asyncpg.create_pool(
                self.cell_settings.dsn,
                min_size=1,
                max_size=self.settings.pool_size_max,
                timeout=self.settings.connect_timeout_ms / 1000,
                command_timeout=self.settings.statement_timeout_ms / 1000,
                server_settings=self._server_settings("pool"),
                reset=_keep_session,
                connect=self._pool_connect,
                connection_class=db.ConfirmedCommitConnection,
            )
            await self.refresh_catalogue()
        return self.pool

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            try:
                await task
            except (asyncio.CancelledError, Exception):
                pass
        if self._writer_conn is not None:
            await self._writer_conn.close()
        if self.pool is not None:
            await self.pool.close()
        for patroni in self._patroni.values():
            await patroni.close()

    async def _holds_lock(self, member: str) -> tuple[bool, datetime | None]:
        """Whether the member's Patroni says it holds the lock, and when its PostgreSQL started."""
        try:
            response = await self._patroni[member].request("GET", "/primary", seconds=LEADER_PROBE_TIMEOUT_S)
        except UpstreamError:
            return False, None
        if response.status != 200:
            return False, None
        return True, postmaster_started(response.body)

    async def leader_member(self) -> str:
        """The member whose Patroni says it is the running primary holding the cell's leader lock;
        raises NoLeaderError when none does or several do. Remembers when the holder's PostgreSQL
        started (``holder_started``), which a connection's server must match."""
        members = list(self._patroni)
        answers = await asyncio.gather(*(self._holds_lock(member) for member in members))
        holders = [
            (member, started) for member, (holds, started) in zip(members, answers, strict=True) if holds
        ]
        if len(holders) == 1:
            ((member, self.holder_started),) = holders
            return member
        if not holders:
            raise NoLeaderError("no member holds the leader lock")
        raise NoLeaderError(f"members {', '.join(m for m, _ in holders)} all say they hold the leader lock")

    async def _fence(self, member: str | None, why: str) -> None:
        """Serve from ``member`` from now on: every connection to another member is dropped."""
        if member == self.serving_member:
            return
        previous, self.serving_member = self.serving_member, member
        self.epoch += 1
        self.ready = False
        if previous is not None:
            log.warning(
                "cell %s: leaving %s (%s); serving from %s, epoch %d",
                self.cell,
                previous,
                why,
                member or "nobody",
                self.epoch,
            )
        await self._drop_writer()
        pool, self.pool = self.pool, None
        if pool is not None:
            pool.terminate()

    def suspect(self) -> None:
        """A request just failed on the database: check who leads now rather than at the next tick."""
        self._probe_now.set()

    async def _probe_once(self) -> None:
        if self._patroni:
            try:
                holder = await self.leader_member()
            except NoLeaderError as error:
                await self._fence(None, str(error))
                raise
            await self._fence(holder, "another member holds the leader lock")
        pool = await asyncio.wait_for(
            self._ensure_pool(), timeout=self.settings.connect_timeout_ms / 1000 + 5
        )
        async with pool.acquire(timeout=1.0) as conn:
            row = await conn.fetchrow(
                "SELECT pg_is_in_recovery(), host(inet_server_addr()), inet_server_port(),"
                " pg_postmaster_start_time()",
                timeout=1.0,
            )
        assert row is not None
        member = f"{row[1]}:{row[2]}"
        if self._patroni:
            if self.holder_started is None or row[3] != self.holder_started:
                why = (
                    f"connected to {member}, a PostgreSQL started at {row[3]}, not the lock holder"
                    f" {self.serving_member}'s (started at {self.holder_started or 'an unknown time'})"
                )
                await self._fence(None, why)
                raise NoLeaderError(why)
            member = self.serving_member or member
        self.leader_site = self.cell_settings.member_sites.get(member, self.cell_settings.leader_site)
        was_ready, self.ready = self.ready, not row[0]
        self.last_error = "" if self.ready else "connected to a replica"
        if self.ready and not was_ready:
            log.info(
                "cell %s: ready, primary at %s (site %s), epoch %d",
                self.cell,
                member,
                self.leader_site,
                self.epoch,
            )

    async def _probe_loop(self) -> None:
        interval = self.settings.probe_interval_ms / 1000
        while True:
            self._probe_now.clear()
            try:
                await self._probe_once()
            except asyncio.CancelledError:
                raise
            except Exception as error:  # any failure means: not ready, say why once
                if self.ready:
                    log.warning("cell %s: not ready: %s: %s", self.cell, type(error).__name__, error)
                self.ready = False
                self.last_error = f"{type(error).__name__}: {error}"
            try:
                await asyncio.wait_for(self._probe_now.wait(), timeout=interval)
            except TimeoutError:
                pass

    async def _catalogue_loop(self) -> None:
        """Catalogue rows may be changed through another app server: reload them periodically."""
        while True:
            await asyncio.sleep(self.settings.catalogue_refresh_ms / 1000)
            if self.ready:
                try:
                    await self.refresh_catalogue()
                except asyncio.CancelledError:
                    raise
                except Exception as error:
                    log.warning("cell %s: catalogue refresh failed: %s", self.cell, error)

    async def refresh_catalogue(self) -> None:
        assert self.pool is not None
        async with self.pool.acquire(timeout=2.0) as conn:
            products = await conn.fetch("SELECT product_code, name, is_default, params FROM products")
            rules = await conn.fetch("SELECT rule_id, body FROM pricing_rules ORDER BY created_at, rule_id")
            tags = await conn.fetch("SELECT tag, description, rule FROM tag_definitions")
        fresh = Catalogue()
        for code, name, is_default, params in products:
            fresh.products[code] = msgspec.json.decode(params)
            fresh.product_names[code] = name
            if is_default:
                fresh.default_product = code
        fresh.rules = [(rule_id, msgspec.json.decode(body, type=PricingRule)) for rule_id, body in rules]
        fresh.tag_definitions = {
            tag: (description, msgspec.json.decode(rule, type=TagRule) if rule else None)
            for tag, description, rule in tags
        }
        self.catalogue = fresh

    def require_ready(self) -> asyncpg.Pool:
        if not self.ready or self.pool is None:
            raise unavailable(self.cell, self.last_error or "not ready")
        return self.pool

    # ---- group commit -------------------------------------------------------------------------

    async def submit(
        self, kind: str, key: str, request: Any, path_id: str | None = None, mode: str = ""
    ) -> Result:
        """Queue a financial request; resolves after its batch commits (or is answered from the
        idempotency record)."""
        self.require_ready()
        # keyed: the body may hold a PAN, and an unkeyed digest of it would give the PAN back to
        # anyone who tries the few candidates its masked form leaves
        canonical = kind.encode() + b"\0" + (path_id or "").encode() + b"\0" + encode(request)
        digest = self.vault.request_digest(canonical)
        future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait(Op(kind, key, digest, request, path_id, future, canonical, mode))
        except asyncio.QueueFull:
            raise ApiError(
                503, "overloaded", f"cell {self.cell} write queue is full; retry later", None
            ) from None
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout=SUBMIT_TIMEOUT_S)
        except TimeoutError:
            raise ApiError(
                504,
                "timeout",
                f"cell {self.cell} did not commit within {SUBMIT_TIMEOUT_S:.0f} s; retry with the same idempotency_key",
            ) from None

    async def _collect(self) -> list[Op]:
        batch = [await self._queue.get()]
        size_max = self.settings.batch_size_max
        while len(batch) < size_max and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        wait_s = self.settings.batch_wait_ms_max / 1000
        if len(batch) < size_max and wait_s > 0 and self._queue.empty():
            await asyncio.sleep(wait_s)
            while len(batch) < size_max and not self._queue.empty():
                batch.append(self._queue.get_nowait())
        return batch

    async def _writer_loop(self) -> None:
        while True:
            batch = await self._collect()
            live = [op for op in batch if not op.future.done()]
            if not live:
                continue
            try:
                await self._execute(live)
            except Exception:  # never let the writer die: answer the batch and go on
                log.exception("cell %s: writer failed on a batch of %d", self.cell, len(live))
                self._fail(live, ApiError(500, "internal", "internal error in the writer", None))

    async def _execute(self, batch: list[Op]) -> None:
        for attempt in range(1, BATCH_RETRIES_MAX + 1):
            try:
                if self._writer_conn is None or self._writer_conn.is_closed():
                    self._writer_conn = await self._connect("writer")
                started = time.perf_counter()
                results = await self._run_batch(self._writer_conn, batch)
                self.batches_committed += 1
                self.ops_committed += len(batch)
                if self.on_batch is not None:
                    self.on_batch(len(batch), time.perf_counter() - started)
            except RETRY_ERRORS as error:
                log.info(
                    "cell %s: batch of %d retried (attempt %d): %s", self.cell, len(batch), attempt, error
                )
                continue
            except UNAVAILABLE_ERRORS as error:
                self.suspect()
                await self._drop_writer()
                reason = f"{type(error).__name__}: {error}"
                log.warning("cell %s: batch of %d not committed: %s", self.cell, len(batch), reason)
                self._fail(batch, unavailable(self.cell, reason))
                return
            except Exception as error:
                if key_committed_elsewhere(error) and attempt < BATCH_RETRIES_MAX:
                    # another app server committed one of these keys after we looked: run the
                    # batch again, and the replay answers with what that server committed
                    log.info(
                        "cell %s: batch of %d retried: a key was committed elsewhere", self.cell, len(batch)
                    )
                    continue
                if len(batch) == 1:
                    log.exception("cell %s: %s failed", self.cell, batch[0].kind)
                    self._fail(
                        batch, ApiError(500, "internal", f"internal error: {type(error).__name__}", None)
                    )
                    return
                # isolate the request that fails: each one alone
                log.warning(
                    "cell %s: batch of %d failed (%s); retrying one by one", self.cell, len(batch), error
                )
                for op in batch:
                    await self._execute([op])
                return
            for op, result in zip(batch, results, strict=True):
                if not op.future.done():
                    op.future.set_result(result)
            return
        self._fail(
            batch, ApiError(503, "contention", "too much contention; retry with the same idempotency_key")
        )

    async def _drop_writer(self) -> None:
        conn, self._writer_conn = self._writer_conn, None
        if conn is not None:
            conn.terminate()

    @staticmethod
    def _fail(batch: list[Op], error: ApiError) -> None:
        result = (error.status, encode(error.body()))
        for op in batch:
            if not op.future.done():
                op.future.set_result(result)

    async def _run_batch(self, conn: asyncpg.Connection, batch: list[Op]) -> list[Result]:
        results: list[Result | None] = [None] * len(batch)
        async with conn.transaction():
            ctx = BatchContext(self, conn, datetime.now(UTC))
            needs = Needs()
            for op in batch:
                HANDLERS[op.kind].needs(op, needs, ctx.vault)
            stored = await ctx.load(needs, [op.key for op in batch])
            first_of_key: dict[str, int] = {}
            live: list[int] = []
            for index, op in enumerate(batch):
                previous = stored.get(op.key)
                if previous is not None:
                    results[index] = replay(op, previous[0], previous[1], previous[2], ctx.vault)
                elif op.key in first_of_key:
                    continue  # answered after the first request with this key
                else:
                    first_of_key[op.key] = index
                    live.append(index)
            for index in live:
                op = batch[index]
                claimed = ctx.claimed.get(op.key)
                if claimed is not None:  # a reversal earlier in this batch claimed this key
                    results[index] = replay(op, *claimed)
                    continue
                try:
                    status, body = HANDLERS[op.kind].apply(ctx, op)
                except ApiError as error:
                    results[index] = (error.status, encode(error.body()))
                    continue
                data = encode(body)
                results[index] = (status, data)
                ctx.writes.idempotency.append((op.key, op.request_hash, status, data))
                ctx.answered[op.key] = (op.kind, body)
            await ctx.writes.flush(conn, ctx.accounts.values(), self.catalogue.tag_rules)
        for index, op in enumerate(batch):
            if results[index] is None:  # a repeat of a key first seen in this batch
                first = first_of_key[op.key]
                status, data = results[first]  # type: ignore[misc]
                results[index] = (
                    (status, data)
                    if op.request_hash == batch[first].request_hash
                    else replay(op, b"", 0, b"")
                )
        return [result for result in results if result is not None]


def key_committed_elsewhere(error: BaseException) -> bool:
    return isinstance(error, asyncpg.UniqueViolationError) and error.constraint_name == "idempotency_pkey"


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool release without a reset query: handlers never change session state, and a reset
    is a round trip per request. (asyncpg still rolls back an open transaction.)"""


def replay(
    op: Op, request_hash: bytes, status: int, response: bytes, vault: PanVault | None = None
) -> Result:
    """The stored answer of ``op``'s key, or 409 when the key came with another request. A record
    made under an older key version is compared under that version; one of version 0 (written
    before digests were keyed, see migration 003) is answered without the body check; one a
    reversal claimed before the request arrived (migration 004) declines a claimable request."""
    if request_hash == CLAIMED_HASH:
        if getattr(HANDLERS[op.kind], "claimable", False):
            return (status, response)  # declined: it was reversed before it arrived
        error = ApiError(
            409,
            "idempotency_key_reversed",
            "a reversal named this idempotency_key before this request arrived",
            "idempotency_key",
        )
        return (error.status, encode(error.body()))
    same = request_hash == op.request_hash
    if not same and vault is not None and request_hash:
        same = version_of(request_hash) == 0 or vault.same_request(request_hash, op.canonical)
    if not same:
        error = ApiError(
            409,
            "idempotency_key_reused",
            "this idempotency_key was used with a different request",
            "idempotency_key",
        )
        return (error.status, encode(error.body()))
    return (status, response)


async def seed_catalogue(conn: asyncpg.Connection) -> None:
    """Products, built-in tags and campaigns every cell starts with (idempotent)."""
    for product in catalogue.PRODUCTS:
        await conn.execute(
            "INSERT INTO products (product_code, name, is_default, params) VALUES ($1, $2, $3, $4::jsonb)"
            " ON CONFLICT (product_code) DO NOTHING",
            product["product_code"],
            product["name"],
            product["is_default"],
            encode(product["params"]).decode(),
        )
    for tag, (description, rule) in BUILTIN_TAGS.items():
        await conn.execute(
            "INSERT INTO tag_definitions (tag, description, rule) VALUES ($1, $2, $3::jsonb) ON CONFLICT DO NOTHING",
            tag,
            description,
            encode(rule).decode() if rule is not None else None,
        )
    for raw in catalogue.CAMPAIGNS:
        campaign = msgspec.convert(raw, type=PricingRule)
        await conn.execute(
            "INSERT INTO pricing_rules (rule_id, layer, body) VALUES ($1, $2, $3::jsonb) ON CONFLICT DO NOTHING",
            rule_id_of(campaign),
            campaign.layer,
            encode(campaign).decode(),
        )
