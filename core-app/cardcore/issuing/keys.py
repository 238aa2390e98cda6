"""The key ring of a cell's card and identity data, for operators: what is under which key
version, and the rewrap that moves it to the current one (``watertight runbook rotate-keys``
calls it until nothing is left).

Owns: ``GET /v1/admin/keys?cell=N`` and ``POST /v1/admin/keys/rewrap?cell=N``: cards (PAN token
and ciphertext) and customers (national-id hash and ciphertext) under an older key are decrypted
and written again under the current one, a bounded batch per call, rows locked and skipped when
another rewrap holds them. Idempotency digests are not rewrapped (the request is not kept): they
stay readable as long as their key is in the ring, and expire with their records.
Never: return, log or keep a PAN or a national id; rewrap under a key not every app server knows
(the runbook makes the new key known everywhere before it is made current).
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from cryptography.exceptions import InvalidTag

from cardcore.common.crypto import KeyRingError
from cardcore.platform.http import ApiError, Request, Route
from cardcore.platform.service import CoreService, cell_param

REWRAP_ROWS_MAX = 1000


class RewrapRequest(msgspec.Struct, forbid_unknown_fields=True):
    limit: Annotated[int, msgspec.Meta(ge=1, le=REWRAP_ROWS_MAX)] = 200


_BY_VERSION = """
SELECT 'cards', key_version, count(*) FROM cards GROUP BY key_version
UNION ALL SELECT 'customers', key_version, count(*) FROM customers GROUP BY key_version
UNION ALL SELECT 'idempotency', get_byte(request_hash, 0) * 256 + get_byte(request_hash, 1), count(*)
  FROM idempotency GROUP BY 2
"""


def routes(service: CoreService) -> list[Route]:
    async def rows_by_version(conn: Any) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {"cards": {}, "customers": {}, "idempotency": {}}
        for table, version, count in await conn.fetch(_BY_VERSION):
            found[table][str(version)] = count
        return found

    async def remaining(conn: Any, current: int) -> dict[str, int]:
        cards = await conn.fetchval("SELECT count(*) FROM cards WHERE key_version <> $1", current)
        customers = await conn.fetchval(
            "SELECT count(*) FROM customers WHERE key_version <> $1 AND id_number_cipher IS NOT NULL", current
        )
        return {"cards": cards, "customers": customers}

    async def describe(request: Request) -> tuple[int, Any]:
        (engine,) = cell_param(service, request.query)
        pool = engine.require_ready()
        vault = service.vault
        async with pool.acquire() as conn:
            return 200, {
                "cell": engine.cell,
                "current": vault.current,
                "versions": sorted(vault.versions),
                "rows_by_version": await rows_by_version(conn),
                "remaining": await remaining(conn, vault.current),
            }

    async def rewrap(request: Request) -> tuple[int, Any]:
        (engine,) = cell_param(service, request.query)
        body: RewrapRequest = request.decode(RewrapRequest) if request.body.strip() else RewrapRequest()
        pool = engine.require_ready()
        vault = service.vault
        current = vault.current
        async with pool.acquire() as conn, conn.transaction():
            cards = await conn.fetch(
                "SELECT card_id, pan_cipher, key_version FROM cards WHERE key_version <> $1"
                " ORDER BY card_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                current,
                body.limit,
            )
            customers = await conn.fetch(
                "SELECT customer_id, id_number_cipher, key_version FROM customers"
                " WHERE key_version <> $1 AND id_number_cipher IS NOT NULL"
                " ORDER BY customer_id LIMIT $2 FOR UPDATE SKIP LOCKED",
                current,
                body.limit,
            )
            try:
                card_rows = []
                for card_id, cipher, version in cards:
                    pan = vault.decrypt(cipher, card_id, version)
                    card_rows.append((card_id, vault.token(pan), vault.encrypt(pan, card_id)))
                customer_rows = []
                for customer_id, cipher, _version in customers:
                    id_number = vault.decrypt_id(cipher, customer_id)
                    customer_rows.append(
                        (customer_id, vault.id_hash(id_number), vault.encrypt_id(id_number, customer_id))
                    )
            except (InvalidTag, KeyRingError) as error:
                # a key missing from this server's ring, or a ciphertext that is not its row's
                raise ApiError(
                    409,
                    "key_unavailable",
                    f"cell {engine.cell}: cannot rewrap: {type(error).__name__}: {error}",
                ) from None
            if card_rows:
                await conn.execute(
                    "UPDATE cards c SET pan_token = u.token, pan_cipher = u.cipher, key_version = $4"
                    " FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(card_id, token, cipher)"
                    " WHERE c.card_id = u.card_id",
                    [row[0] for row in card_rows],
                    [row[1] for row in card_rows],
                    [row[2] for row in card_rows],
                    current,
                )
            if customer_rows:
                await conn.execute(
                    "UPDATE customers c SET id_number_hash = u.hash, id_number_cipher = u.cipher, key_version = $4"
                    " FROM unnest($1::text[], $2::bytea[], $3::bytea[]) AS u(customer_id, hash, cipher)"
                    " WHERE c.customer_id = u.customer_id",
                    [row[0] for row in customer_rows],
                    [row[1] for row in customer_rows],
                    [row[2] for row in customer_rows],
                    current,
                )
            left = await remaining(conn, current)
        return 200, {
            "cell": engine.cell,
            "current": current,
            "rewrapped": {"cards": len(card_rows), "customers": len(customer_rows)},
            "remaining": left,
        }

    return [
        Route(
            "GET",
            "/v1/admin/keys",
            describe,
            "Which key versions the cell's card and identity data are under",
            tag="operations",
        ),
        Route(
            "POST",
            "/v1/admin/keys/rewrap",
            rewrap,
            "Move a batch of the cell's card and identity data to the current key",
            RewrapRequest,
            tag="operations",
        ),
    ]
