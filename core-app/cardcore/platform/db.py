"""Schema migrations and connection set-up for a cell database.

Owns: applying ``migrations/NNN_*.sql`` in order, once each, under an advisory lock so several
app servers starting together do not race; connecting to whichever member of a cell is writable.
Never: change a migration that has shipped; let one dead or frozen member delay a connection to
the one that serves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg

MIGRATION_LOCK_KEY = 7_419_001
MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def migration_files() -> list[tuple[int, str, str]]:
    found = []
    for item in MIGRATIONS_DIR.glob("*.sql"):
        found.append((int(item.name.split("_", 1)[0]), item.name, item.read_text(encoding="utf-8")))
    return sorted(found)


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


async def connect_writable(dsn: str, members: list[str], **kwargs: Any) -> asyncpg.Connection:
    """A connection to the writable member among ``members`` (``host:port``), trying them all at
    once, each with the full ``timeout``: libpq-style multi-host tries them in turn within one
    timeout, so a member that accepts TCP but never answers (frozen, or cut off by a partition)
    first in the list would use it all up and the primary behind it would never be reached.
    Without members, the DSN as it is."""
    kwargs["target_session_attrs"] = "read-write"
    if len(members) < 2:
        return await asyncpg.connect(dsn, **kwargs)
    attempts = []
    for member in members:
        host, _, port = member.rpartition(":")
        attempts.append(asyncio.ensure_future(asyncpg.connect(dsn, host=host, port=int(port), **kwargs)))
    chosen: asyncpg.Connection | None = None
    errors: list[BaseException] = []
    try:
        pending = set(attempts)
        while pending and chosen is None:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for attempt in done:
                error = attempt.exception()
                if error is not None:
                    errors.append(error)
                elif chosen is None:
                    chosen = attempt.result()
                else:
                    attempt.result().terminate()
    finally:
        for attempt in attempts:
            if not attempt.done():
                attempt.cancel()
        # one that connected while we were choosing must not stay open
        for attempt in attempts:
            if attempt.done() and not attempt.cancelled() and attempt.exception() is None:
                if attempt.result() is not chosen:
                    attempt.result().terminate()
    if chosen is not None:
        return chosen
    # every member answered, none writable (a promotion under way): say so rather than a timeout
    for error in errors:
        if isinstance(error, asyncpg.TargetServerAttributeNotMatched):
            raise error
    raise errors[-1]
