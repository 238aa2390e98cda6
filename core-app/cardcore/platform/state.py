"""Loading account state (set-based) and writing a batch's effects (set-based).

Owns: the SQL that turns rows into ``AccountState`` and the buffered writes of a transaction into
a handful of ``unnest`` statements. Never: commit (the caller owns the transaction).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import msgspec

from cardcore.accounting.journal import BANK, Entry
from cardcore.issuing.decision import age_on
from cardcore.limits.lines import AccountState, StatementRef

_decode_pairs = msgspec.json.Decoder(list[list[Any]])
_decode_rows = msgspec.json.Decoder(list[list[Any]] | None)
STATE_BY_ACCOUNTS = "SELECT cardcore_account_rows($1::text[], $2)"
STATE_BY_CUSTOMER = (
    "SELECT cardcore_account_rows(ARRAY(SELECT account_id FROM accounts WHERE customer_id = $1"
    " ORDER BY created_at LIMIT 1), $2)"
)


def _pairs(value: Any) -> list[list[Any]]:
    """A json_agg column: text from asyncpg, already a list inside a decoded document."""
    if value is None:
        return []
    if isinstance(value, str):
        decoded: list[list[Any]] = _decode_pairs.decode(value)
        return decoded
    return list(value)


def _date(value: Any) -> date:
    return value if isinstance(value, date) else date.fromisoformat(value)


def state_from_row(row: Sequence[Any], today: date) -> tuple[AccountState, bool]:
    """An account from one row of ``cardcore_account_rows``; and whether stale holds still
    count in the lines it read (they are taken out here: the database expires them too)."""
    birth_date = _date(row[6])
    state = AccountState(
        account_id=row[0],
        customer_id=row[1],
        product_code=row[2],
        status=row[3],
        limits={},
        held={},
        total_spend_fen=row[4],
        installment_plan_count=row[5],
        age=age_on(birth_date, today),
    )
    for line, limit_fen, held_fen, share in _pairs(row[7]):
        state.limits[line] = limit_fen
        state.held[line] = held_fen
        if share is not None:
            state.shares[line] = Decimal(share)
    for gl, balance_fen in _pairs(row[8]):
        state.balances[gl] = balance_fen
    for line, amount_fen in _pairs(row[9]):
        state.temporary[line] = state.temporary.get(line, 0) + amount_fen
    for tag, source in _pairs(row[10]):
        state.tags[tag] = source
    # holds past their expiry no longer count, even before anyone marks them expired
    expired = _pairs(row[11])
    for line, hold_fen in expired:
        state.held[line] -= hold_fen
    statement = row[12] if len(row) > 12 else None
    if statement:
        statement_id, on, due, balance, minimum, converted, fixed, revolving, rate, floor = statement
        state.last_statement = StatementRef(
            statement_id,
            _date(on),
            _date(due),
            balance,
            minimum,
            converted,
            fixed,
            revolving,
            Decimal(rate),
            floor,
        )
    return state, bool(expired)


def states_from_rows(raw: Any, today: date) -> dict[str, AccountState]:
    rows = _decode_rows.decode(raw) if isinstance(raw, str | bytes) else raw
    states: dict[str, AccountState] = {}
    for row in rows or ():
        state, _ = state_from_row(row, today)
        states[state.account_id] = state
    return states


async def load_accounts(
    conn: asyncpg.Connection, account_ids: Iterable[str], now: datetime, lock: bool
) -> dict[str, AccountState]:
    """Accounts with lines, balances, live temporary raises, tags and their last statement, in
    one round trip (two with ``lock``).

    ``lock`` first takes the account rows FOR UPDATE in id order (so two batches never deadlock)
    and expires their stale holds, lines included (``cardcore_expire_holds``), then reads the
    state in a new statement, so the read sees everything committed before the lock was granted."""
    ids = sorted(set(account_ids))
    if not ids:
        return {}
    if lock:
        await conn.execute(
            "SELECT cardcore_expire_holds(ARRAY(SELECT account_id FROM accounts WHERE account_id = ANY($1::text[])"
            " ORDER BY account_id FOR UPDATE), $2)",
            ids,
            now,
        )
    return states_from_rows(await conn.fetchval(STATE_BY_ACCOUNTS, ids, now), now.date())


async def load_customer_account(
    conn: asyncpg.Connection, customer_id: str, now: datetime
) -> AccountState | None:
    """The (first) account of a customer, read in one round trip, without a lock."""
    states = states_from_rows(await conn.fetchval(STATE_BY_CUSTOMER, customer_id, now), now.date())
    return next(iter(states.values()), None)


def business_date(clock: date | None, now: datetime) -> date:
    """The cell's business date: the latest date a cycle was started for, or today if later."""
    today = now.date()
    return today if clock is None or clock < today else clock


def value_date(state: AccountState, business: date) -> date:
    """From when a posting made now counts: the business date, but never on or before the
    account's last statement (a statement once cut is final)."""
    last = state.last_statement
    if last is not None and last.statement_date >= business:
        return last.statement_date + timedelta(days=1)
    return business


async def read_business_date(conn: asyncpg.Connection, now: datetime) -> date:
    return business_date(await conn.fetchval("SELECT business_date FROM business_clock"), now)


@dataclass(slots=True)
class TransactionRow:
    """A line of the account's transactions (and, once a statement is cut, of that statement)."""

    transaction_id: str
    account_id: str
    kind: str
    amount_fen: int
    value_date: date
    entry: Entry | None = None
    details: dict[str, Any] | None = None
    auth_id: str | None = None
    plan_id: str | None = None
    original_transaction_id: str | None = None


@dataclass(slots=True)
class Writes:
    """Effects of one database transaction, written together at its end."""

    entries: list[Entry] = field(default_factory=list)
    transactions: list[TransactionRow] = field(default_factory=list)
    auth_inserts: list[tuple[Any, ...]] = field(default_factory=list)
    # auth_id -> (hold, status, authorized amount or None, expires_at or None)
    auth_updates: dict[str, tuple[int, str, int | None, datetime | None]] = field(default_factory=dict)
    plan_inserts: list[tuple[Any, ...]] = field(default_factory=list)
    plan_updates: dict[str, tuple[int, str]] = field(default_factory=dict)
    statement_updates: dict[str, tuple[int, int]] = field(default_factory=dict)  # id -> (converted, minimum)
    idempotency: list[tuple[str, bytes, int, bytes]] = field(default_factory=list)
    # card-not-present failures: card_id -> (failures in a row, locked until); written apart, only
    # when a batch has some (a wrong CVV2 or expiry, or the first success after one)
    card_cnp: dict[str, tuple[int, datetime | None]] = field(default_factory=dict)

    async def flush(
        self, conn: asyncpg.Connection, accounts: Iterable[AccountState], tag_rules: dict[str, Any]
    ) -> None:
        """Write everything in one round trip (``cardcore_apply_batch_v3``)."""
        accounts = list(accounts)
        entry_index = {id(entry): index for index, entry in enumerate(self.entries, start=1)}
        deltas: dict[tuple[str, str], int] = {}
        for entry in self.entries:
            assert entry.value_date is not None, f"{entry.kind} entry without a value date"
            for leg in entry.legs:
                if leg.account_id != BANK:  # the bank's ledgers derive from postings: no hot row
                    key = (leg.account_id, leg.gl)
                    deltas[key] = deltas.get(key, 0) + leg.debit_fen - leg.credit_fen
        changed = [s for s in accounts if s.changed_metrics]
        tags_add, tags_remove = rule_tag_changes(changed, tag_rules)
        document = {
            "entries": [
                [e.account_id, e.kind, e.transaction_id, e.business_date, e.value_date] for e in self.entries
            ],
            "legs": [
                [entry_index[id(entry)], seq, leg.account_id, leg.gl, leg.debit_fen, leg.credit_fen]
                for entry in self.entries
                for seq, leg in enumerate(entry.legs, start=1)
            ],
            "balances": [[account, gl, deltas[(account, gl)]] for account, gl in sorted(deltas)],
            "auth_inserts": self.auth_inserts,
            "auth_updates": [
                [auth_id, hold, status, amount, expires_at]
                for auth_id, (hold, status, amount, expires_at) in self.auth_updates.items()
            ],
            "transactions": [
                [
                    t.transaction_id,
                    t.account_id,
                    t.kind,
                    t.amount_fen,
                    t.auth_id,
                    t.plan_id,
                    entry_index[id(t.entry)] if t.entry is not None else None,
                    msgspec.json.encode(t.details).decode() if t.details is not None else None,
                    t.value_date,
                    t.original_transaction_id,
                ]
                for t in self.transactions
            ],
            "plan_inserts": self.plan_inserts,
            "plan_updates": [
                [plan_id, periods, status] for plan_id, (periods, status) in self.plan_updates.items()
            ],
            "statement_updates": [
                [statement_id, converted, minimum]
                for statement_id, (converted, minimum) in self.statement_updates.items()
            ],
            "held": [
                [s.account_id, line, amount]
                for s in accounts
                if s.changed_held
                for line, amount in s.held.items()
            ],
            "customers": [[s.customer_id, s.total_spend_fen, s.installment_plan_count] for s in changed],
            "tags_add": tags_add,
            "tags_remove": tags_remove,
            "idempotency": [
                [key, digest.hex(), status, response.decode()]
                for key, digest, status, response in self.idempotency
            ],
        }
        await conn.execute("SELECT cardcore_apply_batch_v3($1::json)", msgspec.json.encode(document).decode())
        if self.card_cnp:
            await conn.execute(
                "UPDATE cards c SET cnp_failures = u.failures, cnp_locked_until = u.locked_until"
                " FROM unnest($1::text[], $2::smallint[], $3::timestamptz[]) AS u(card_id, failures, locked_until)"
                " WHERE c.card_id = u.card_id",
                list(self.card_cnp),
                [failures for failures, _ in self.card_cnp.values()],
                [locked for _, locked in self.card_cnp.values()],
            )


def rule_tag_changes(
    accounts: list[AccountState], tag_rules: dict[str, Any]
) -> tuple[list[list[str]], list[list[str]]]:
    """Rule-based tags to add and remove so each customer matches the rules (manual tags stay);
    updates ``state.tags`` to match."""
    from cardcore.common.tags import holds

    add: list[list[str]] = []
    remove: list[list[str]] = []
    for state in accounts:
        metrics = state.metrics()
        for tag, rule in tag_rules.items():
            present = state.tags.get(tag)
            wanted = holds(rule, metrics)
            if wanted and present is None:
                add.append([state.customer_id, tag])
                state.tags[tag] = "rule"
            elif not wanted and present == "rule":
                remove.append([state.customer_id, tag])
                del state.tags[tag]
    return add, remove


async def write_rule_tags(
    conn: asyncpg.Connection, accounts: list[AccountState], tag_rules: dict[str, Any]
) -> None:
    """Bring each customer's rule-based tags in line with the rules, outside a batch."""
    add, remove = rule_tag_changes(accounts, tag_rules)
    if add:
        await conn.execute(
            "INSERT INTO customer_tags (customer_id, tag, source) SELECT c, t, 'rule' FROM unnest($1::text[],"
            " $2::text[]) AS u(c, t) ON CONFLICT DO NOTHING",
            [a[0] for a in add],
            [a[1] for a in add],
        )
    if remove:
        await conn.execute(
            "DELETE FROM customer_tags ct USING unnest($1::text[], $2::text[]) AS u(c, t)"
            " WHERE ct.customer_id = u.c AND ct.tag = u.t AND ct.source = 'rule'",
            [r[0] for r in remove],
            [r[1] for r in remove],
        )
