"""Loading account state (set-based) and writing a batch's effects (set-based).

Owns: the SQL that turns rows into ``AccountState`` and the buffered writes of a transaction into
a handful of ``unnest`` statements. Never: commit (the caller owns the transaction).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date, datetime
from typing import Any

import asyncpg
import msgspec

from cardcore.accounting.journal import BANK, Entry
from cardcore.issuing.decision import age_on
from cardcore.limits.lines import AccountState

_STATE_COLUMNS = """
SELECT a.account_id, a.customer_id, a.product_code, a.status, c.total_spend_fen, c.installment_plan_count,
  c.birth_date,
  (SELECT json_agg(json_build_array(l.line, l.limit_fen, l.held_fen)) FROM lines l
    WHERE l.account_id = a.account_id) AS lines,
  (SELECT json_agg(json_build_array(b.gl, b.balance_fen)) FROM balances b
    WHERE b.account_id = a.account_id) AS balances,
  (SELECT json_agg(json_build_array(t.line, t.amount_fen)) FROM temporary_raises t
    WHERE t.account_id = a.account_id AND t.expires_at > $2) AS temporary,
  (SELECT json_agg(json_build_array(ct.tag, ct.source)) FROM customer_tags ct
    WHERE ct.customer_id = a.customer_id) AS tags,
  (SELECT json_agg(json_build_array(h.line, h.hold_fen)) FROM authorizations h
    WHERE h.account_id = a.account_id AND h.status = 'open' AND h.expires_at <= $2) AS expired
FROM accounts a JOIN customers c USING (customer_id)
"""
STATE_BY_ACCOUNTS = _STATE_COLUMNS + "WHERE a.account_id = ANY($1::text[])"
STATE_BY_CUSTOMER = (
    _STATE_COLUMNS
    + "WHERE a.account_id = (SELECT account_id FROM accounts WHERE customer_id = $1 ORDER BY created_at LIMIT 1)"
)
_decode_pairs = msgspec.json.Decoder(list[list[Any]])


def _state_of(row: asyncpg.Record, today: date) -> tuple[AccountState, bool]:
    """An account from one row of the state query; and whether stale holds still count in it."""
    state = AccountState(
        account_id=row[0],
        customer_id=row[1],
        product_code=row[2],
        status=row[3],
        limits={},
        held={},
        total_spend_fen=row[4],
        installment_plan_count=row[5],
        age=age_on(row[6], today),
    )
    for line, limit_fen, held_fen in _decode_pairs.decode(row[7] or "[]"):
        state.limits[line] = limit_fen
        state.held[line] = held_fen
    for gl, balance_fen in _decode_pairs.decode(row[8] or "[]"):
        state.balances[gl] = balance_fen
    for line, amount_fen in _decode_pairs.decode(row[9] or "[]"):
        state.temporary[line] = state.temporary.get(line, 0) + amount_fen
    for tag, source in _decode_pairs.decode(row[10] or "[]"):
        state.tags[tag] = source
    # holds past their expiry no longer count, even before anyone marks them expired
    expired = _decode_pairs.decode(row[11] or "[]")
    for line, hold_fen in expired:
        state.held[line] -= hold_fen
    return state, bool(expired)


async def load_accounts(
    conn: asyncpg.Connection, account_ids: Iterable[str], now: datetime, lock: bool
) -> dict[str, AccountState]:
    """Accounts with lines, balances, live temporary raises and tags, in two round trips at most.

    ``lock`` first takes the account rows FOR UPDATE in id order (so two batches never deadlock),
    then reads the state in a new statement, so the read sees everything committed before the
    lock was granted; it also marks stale holds expired."""
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    if lock:
        await conn.execute(
            "SELECT 1 FROM accounts WHERE account_id = ANY($1::text[]) ORDER BY account_id FOR UPDATE", ids
        )
    states: dict[str, AccountState] = {}
    stale: list[str] = []
    for row in await conn.fetch(STATE_BY_ACCOUNTS, ids, now):
        state, has_stale = _state_of(row, now.date())
        states[state.account_id] = state
        if has_stale:
            stale.append(state.account_id)
    if lock and stale:
        await conn.execute(
            "UPDATE authorizations SET status = 'expired', hold_fen = 0 WHERE account_id = ANY($1::text[])"
            " AND status = 'open' AND expires_at <= $2",
            stale,
            now,
        )
        for account_id in stale:
            states[account_id].changed_held = True
    return states


async def load_customer_account(
    conn: asyncpg.Connection, customer_id: str, now: datetime
) -> AccountState | None:
    """The (first) account of a customer, read in one round trip, without a lock."""
    row = await conn.fetchrow(STATE_BY_CUSTOMER, customer_id, now)
    return None if row is None else _state_of(row, now.date())[0]


@dataclass(slots=True)
class Writes:
    """Effects of one database transaction, written together at its end."""

    entries: list[Entry] = field(default_factory=list)
    transactions: list[tuple[Any, ...]] = field(default_factory=list)
    auth_inserts: list[tuple[Any, ...]] = field(default_factory=list)
    auth_updates: dict[str, tuple[int, str]] = field(default_factory=dict)
    plan_inserts: list[tuple[Any, ...]] = field(default_factory=list)
    plan_updates: dict[str, tuple[int, str]] = field(default_factory=dict)
    idempotency: list[tuple[str, bytes, int, bytes]] = field(default_factory=list)

    async def flush(
        self, conn: asyncpg.Connection, accounts: Iterable[AccountState], tag_rules: dict[str, Any]
    ) -> None:
        accounts = list(accounts)
        if self.entries:
            await self._write_entries(conn)
        if self.auth_inserts:
            await conn.execute(
                "INSERT INTO authorizations (auth_id, account_id, card_id, line, amount_fen, hold_fen, status,"
                " response_code, mcc, merchant_id, channel, expires_at) SELECT * FROM unnest($1::text[],"
                " $2::text[], $3::text[], $4::text[], $5::bigint[], $6::bigint[], $7::text[], $8::text[],"
                " $9::text[], $10::text[], $11::text[], $12::timestamptz[])",
                *columns(self.auth_inserts, 12),
            )
        if self.auth_updates:
            ids = list(self.auth_updates)
            await conn.execute(
                "UPDATE authorizations a SET hold_fen = u.hold_fen, status = u.status FROM unnest($1::text[],"
                " $2::bigint[], $3::text[]) AS u(auth_id, hold_fen, status) WHERE a.auth_id = u.auth_id",
                ids,
                [self.auth_updates[i][0] for i in ids],
                [self.auth_updates[i][1] for i in ids],
            )
        if self.transactions:
            await conn.execute(
                "INSERT INTO transactions (transaction_id, account_id, kind, amount_fen, auth_id, plan_id,"
                " entry_id, details) SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[],"
                " $5::text[], $6::text[], $7::bigint[], $8::jsonb[])",
                *columns(
                    [
                        (*t[:6], t[6].entry_id if isinstance(t[6], Entry) else t[6], t[7])
                        for t in self.transactions
                    ],
                    8,
                ),
            )
        if self.plan_inserts:
            await conn.execute(
                "INSERT INTO installment_plans (plan_id, account_id, transaction_id, principal_fen, terms,"
                " fee_rate, apr, schedule, status, pricing_trace) SELECT * FROM unnest($1::text[], $2::text[],"
                " $3::text[], $4::bigint[], $5::smallint[], $6::numeric[], $7::numeric[], $8::jsonb[],"
                " $9::text[], $10::jsonb[])",
                *columns(self.plan_inserts, 10),
            )
        if self.plan_updates:
            ids = list(self.plan_updates)
            await conn.execute(
                "UPDATE installment_plans p SET periods_billed = u.periods, status = u.status FROM"
                " unnest($1::text[], $2::smallint[], $3::text[]) AS u(plan_id, periods, status)"
                " WHERE p.plan_id = u.plan_id",
                ids,
                [self.plan_updates[i][0] for i in ids],
                [self.plan_updates[i][1] for i in ids],
            )
        held = [
            (s.account_id, line, amount)
            for s in accounts
            if s.changed_held
            for line, amount in s.held.items()
        ]
        if held:
            await conn.execute(
                "UPDATE lines l SET held_fen = u.held FROM unnest($1::text[], $2::text[], $3::bigint[])"
                " AS u(account_id, line, held) WHERE l.account_id = u.account_id AND l.line = u.line",
                *columns(held, 3),
            )
        changed = [s for s in accounts if s.changed_metrics]
        if changed:
            await conn.execute(
                "UPDATE customers c SET total_spend_fen = u.spend, installment_plan_count = u.plans FROM"
                " unnest($1::text[], $2::bigint[], $3::integer[]) AS u(customer_id, spend, plans)"
                " WHERE c.customer_id = u.customer_id",
                [s.customer_id for s in changed],
                [s.total_spend_fen for s in changed],
                [s.installment_plan_count for s in changed],
            )
            await write_rule_tags(conn, changed, tag_rules)
        if self.idempotency:
            await conn.execute(
                "INSERT INTO idempotency (key, request_hash, status, response) SELECT * FROM"
                " unnest($1::text[], $2::bytea[], $3::smallint[], $4::bytea[])",
                *columns(self.idempotency, 4),
            )

    async def _write_entries(self, conn: asyncpg.Connection) -> None:
        ids = await conn.fetch(
            "SELECT nextval('journal_entry_id') FROM generate_series(1, $1::integer)", len(self.entries)
        )
        for entry, row in zip(self.entries, ids, strict=True):
            entry.entry_id = row[0]
        await conn.execute(
            "INSERT INTO journal_entries (entry_id, account_id, kind, transaction_id, business_date)"
            " SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[], $5::date[])",
            [e.entry_id for e in self.entries],
            [e.account_id for e in self.entries],
            [e.kind for e in self.entries],
            [e.transaction_id for e in self.entries],
            [e.business_date for e in self.entries],
        )
        legs = [
            (entry.entry_id, seq, leg.account_id, leg.gl, leg.debit_fen, leg.credit_fen)
            for entry in self.entries
            for seq, leg in enumerate(entry.legs, start=1)
        ]
        await conn.execute(
            "INSERT INTO postings (entry_id, seq, account_id, gl, debit_fen, credit_fen) SELECT * FROM"
            " unnest($1::bigint[], $2::smallint[], $3::text[], $4::text[], $5::bigint[], $6::bigint[])",
            *columns(legs, 6),
        )
        deltas: dict[tuple[str, str], int] = {}
        for entry in self.entries:
            for leg in entry.legs:
                if leg.account_id != BANK:  # the bank's ledgers derive from postings: no hot row
                    key = (leg.account_id, leg.gl)
                    deltas[key] = deltas.get(key, 0) + leg.debit_fen - leg.credit_fen
        keys = sorted(deltas)
        await conn.execute(
            "INSERT INTO balances (account_id, gl, balance_fen) SELECT * FROM unnest($1::text[], $2::text[],"
            " $3::bigint[]) ON CONFLICT (account_id, gl) DO UPDATE SET balance_fen = balances.balance_fen"
            " + EXCLUDED.balance_fen",
            [k[0] for k in keys],
            [k[1] for k in keys],
            [deltas[k] for k in keys],
        )


def columns(rows: list[tuple[Any, ...]], width: int) -> list[list[Any]]:
    return [[row[i] for row in rows] for i in range(width)] if rows else [[] for _ in range(width)]


async def write_rule_tags(
    conn: asyncpg.Connection, accounts: list[AccountState], tag_rules: dict[str, Any]
) -> None:
    """Bring each customer's rule-based tags in line with the rules; manual tags stay as they are."""
    from cardcore.common.tags import holds

    add: list[tuple[str, str]] = []
    remove: list[tuple[str, str]] = []
    for state in accounts:
        metrics = state.metrics()
        for tag, rule in tag_rules.items():
            present = state.tags.get(tag)
            wanted = holds(rule, metrics)
            if wanted and present is None:
                add.append((state.customer_id, tag))
                state.tags[tag] = "rule"
            elif not wanted and present == "rule":
                remove.append((state.customer_id, tag))
                del state.tags[tag]
    if add:
        await conn.execute(
            "INSERT INTO customer_tags (customer_id, tag, source) SELECT c, t, 'rule' FROM unnest($1::text[],"
            " $2::text[]) AS u(c, t) ON CONFLICT DO NOTHING",
            *columns(add, 2),
        )
    if remove:
        await conn.execute(
            "DELETE FROM customer_tags ct USING unnest($1::text[], $2::text[]) AS u(c, t)"
            " WHERE ct.customer_id = u.c AND ct.tag = u.t AND ct.source = 'rule'",
            *columns(remove, 2),
        )
