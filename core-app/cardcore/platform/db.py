"""Schema migrations and connection set-up for a cell database.

Owns: applying ``migrations/NNN_*.sql`` in order, once each, under an advisory lock so several
app servers starting together do not race; connecting to whichever member of a cell is writable;
refusing a commit the sync standby never confirmed.
Never: change a migration that has shipped; let one dead or frozen member delay a connection to
the one that serves; report as done a commit PostgreSQL stopped waiting on the sync standby for.
"""

from __future__ import annotations

import asyncio
import itertools
from pathlib import Path
from typing import Any

import asyncpg

MIGRATION_LOCK_KEY = 7_419_001
# PostgreSQL's WARNING when a backend stops waiting for its sync standby (a cancel request, e.g. an
# operator's pg_cancel_backend on the sessions stuck behind a lost standby, or a shutdown):
# "canceling wait for synchronous replication ..." / "canceling the wait for synchronous
# replication and terminating connection ..."
SYNC_WAIT_CANCELLED = "wait for synchronous replication"
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migration_files() -> list[tuple[int, str, str]]:
    """Every migration, in order. Two files with one number would apply only the first one a
    database saw (a version is applied once): that is refused, naming both."""
    found = []
    for item in MIGRATIONS_DIR.glob("*.sql"):
        found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text(encoding="utf-8")))
    found.sort()
    for (version, first, _), (other, second, _) in itertools.pairwise(found):
        if version == other:
            raise RuntimeError(
                f"migrations {first} and {second} share the number {version}: renumber the newer one"
            )
    return found


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply missing migrations; returns the names applied."""
    applied: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations (version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {row[0] for row in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, sql in migration_files():
            if version in done:
                continue
            async with conn.transaction():
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            applied.append(name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)
    return applied


class CommitNotConfirmedError(Exception):
    """The statement's commit is durable on the primary only: PostgreSQL stopped waiting for the
    sync standby (and says so with a WARNING, not an error). A failover now would lose it, so it
    must not be acknowledged; a retry with the same idempotency key finds it, or does it again."""


class ConfirmedCommitConnection(asyncpg.Connection):
    """A connection whose statements raise ``CommitNotConfirmedError`` when PostgreSQL committed
    without the sync standby's confirmation. Without this, a cancel that reaches a COMMIT waiting
    on a silent standby (a partition, a frozen center) turns into a success. (The statement
    timeout never does: PostgreSQL disarms it before the commit waits; our own client timeout
    sends a cancel too, but has already failed the request.)"""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sync_wait_cancelled = False

    def _process_log_message(self, fields: dict[str, str], last_query: str) -> None:
        # asyncpg's protocol calls this for every NOTICE or WARNING as it arrives, before the
        # statement's result. Not a log listener: a pool clears those at every release (so the
        # guard held for a pooled connection's first use only) and warns about each one.
        if SYNC_WAIT_CANCELLED in fields.get("M", ""):
            self._sync_wait_cancelled = True
        super()._process_log_message(fields, last_query)

    def _confirm(self, query: str) -> None:
        if self._sync_wait_cancelled:
            self._sync_wait_cancelled = False
            raise CommitNotConfirmedError(
                f"{query.strip()[:40]!r} committed on the primary without the sync standby's confirmation"
            )

    async def execute(self, query: str, *args: Any, timeout: float | None = None) -> str:  # noqa: ASYNC109 (asyncpg's signature)
        self._sync_wait_cancelled = False
        result = await super().execute(query, *args, timeout=timeout)
        self._confirm(query)
        return result

    async def _execute(self, query: str, args: Any, limit: int, timeout: float | None, **kwargs: Any) -> Any:  # noqa: ASYNC109
        self._sync_wait_cancelled = False
        result = await super()._execute(query, args, limit, timeout, **kwargs)
        self._confirm(query)
        return result


TIMELINE_SQL = "SELECT pg_walfile_name(pg_current_wal_lsn())"
CHOICE_GRACE_S = 0.25  # how long the other members may take to answer once one writable has


async def _connect_member(dsn: str, member: str, **kwargs: Any) -> asyncpg.Connection:
    """A connection to ``member`` (``host:port``) alone, with the DSN's other parameters."""
    host, _, port = member.rpartition(":")
    return await asyncpg.connect(dsn, host=host, port=int(port), **kwargs)


async def _writable_on_timeline(dsn: str, member: str, **kwargs: Any) -> tuple[int, asyncpg.Connection]:
    """A connection to ``member`` if it is writable, with the timeline it writes on."""
    conn = await _connect_member(dsn, member, **kwargs)
    try:
        walfile = await conn.fetchval(TIMELINE_SQL, timeout=kwargs.get("timeout"))
    except BaseException:
        conn.terminate()
        raise
    return int(str(walfile)[:8], 16), conn


async def connect_writable(dsn: str, members: list[str], **kwargs: Any) -> asyncpg.Connection:
    """A connection to the writable member among ``members`` (``host:port``), trying them all at
    once, each with the full ``timeout``: libpq-style multi-host tries them in turn within one
    timeout, so a member that accepts TCP but never answers (frozen, or cut off by a partition)
    first in the list would use it all up and the primary behind it would never be reached.
    One member: that one only (the DSN's hosts are not tried). Without members, the DSN as it is.

    When two answer writable (a deposed primary whose Patroni is gone beside the one a promotion
    made: what only the leader lock tells apart, see engine's fencing), the newest timeline wins,
    as the best a client that knows nothing of Patroni can do; those that answer within
    ``CHOICE_GRACE_S`` of the first are compared. Connections opened before the promotion stay
    where they are: that, not this choice, is why the app fences by the leader lock."""
    kwargs["target_session_attrs"] = "read-write"
    kwargs.setdefault("connection_class", ConfirmedCommitConnection)
    if not members:
        return await asyncpg.connect(dsn, **kwargs)
    if len(members) == 1:  # the lock holder alone: never the DSN's other hosts (one may be frozen)
        return await _connect_member(dsn, members[0], **kwargs)
    attempts = [asyncio.ensure_future(_writable_on_timeline(dsn, member, **kwargs)) for member in members]
    answered: list[tuple[int, asyncpg.Connection]] = []
    errors: list[BaseException] = []
    chosen: asyncpg.Connection | None = None
    try:
        pending: set[asyncio.Future[tuple[int, asyncpg.Connection]]] = set(attempts)
        grace_ends: float | None = None
        loop = asyncio.get_running_loop()
        while pending:
            wait_s = None if grace_ends is None else max(0.0, grace_ends - loop.time())
            done, pending = await asyncio.wait(pending, timeout=wait_s, return_when=asyncio.FIRST_COMPLETED)
            for attempt in done:
                error = attempt.exception()
                if error is not None:
                    errors.append(error)
                else:
                    answered.append(attempt.result())
            if answered and grace_ends is None:
                grace_ends = loop.time() + CHOICE_GRACE_S
            if not done and grace_ends is not None:  # the grace ran out
                break
        if answered:
            chosen = max(answered, key=lambda found: found[0])[1]
    finally:
        for attempt in attempts:
            if not attempt.done():
                attempt.cancel()
        # one that connected while we were choosing must not stay open
        for attempt in attempts:
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                if attempt.result()[1] is not chosen:
                    attempt.result()[1].terminate()
    if chosen is not None:
        return chosen
    # every member answered, none writable (a promotion under way): say so rather than a timeout
    for error in errors:
        if isinstance(error, asyncpg.TargetServerAttributeNotMatched):
            raise error
    raise errors[-1]
