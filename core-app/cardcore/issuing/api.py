"""Issuing: real-time account opening and the card life cycle.

PANs are the BIN, the cell and a random serial (never the next of a sequence: a PAN must not
tell the next one); their CVV2 is derived under the current key and never stored. A national id
is kept as a keyed hash (to recognise a returning applicant under any key version) and as a
ciphertext bound to its customer (so a key rotation can hash it again).
Never: return a full PAN or a CVV2 except in the answers of an application and a replacement;
log one anywhere.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Annotated, Any, Literal

import asyncpg
import msgspec

from cardcore.common import ids
from cardcore.common.money import decimal_of, fen_of
from cardcore.common.types import AMOUNT_FEN_MAX
from cardcore.issuing.decision import decide
from cardcore.platform.http import ApiError, Request, Route, bad_request, conflict, not_found
from cardcore.platform.service import CoreService, mask_name
from cardcore.platform.state import load_accounts, write_rule_tags


class Applicant(msgspec.Struct, forbid_unknown_fields=True):
    name: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]
    id_number: Annotated[str, msgspec.Meta(pattern=r"^[0-9A-Z]{6,32}$")]
    mobile: Annotated[str, msgspec.Meta(pattern=r"^\+?[0-9]{6,15}$")]
    birth_date: Annotated[
        date,
        msgspec.Meta(
            description="In the past. The schema cannot say what today is: a date not before today "
            "is refused with 400."
        ),
    ]
    annual_income: Annotated[int, msgspec.Meta(ge=0, le=AMOUNT_FEN_MAX)]


class ApplicationRequest(msgspec.Struct, forbid_unknown_fields=True):
    applicant: Applicant
    product_code: str | None = None


class CardStatusRequest(msgspec.Struct, forbid_unknown_fields=True):
    status: Literal["active", "locked", "lost", "stolen", "closed"]


TERMINAL = frozenset({"lost", "stolen", "closed"})
TRANSITIONS = {
    "inactive": {"active", "locked", "lost", "stolen", "closed"},
    "active": {"locked", "lost", "stolen", "closed"},
    "locked": {"active", "lost", "stolen", "closed"},
}


def card_view(row: Any) -> dict[str, Any]:
    view = {
        "card_id": row["card_id"],
        "pan_masked": row["pan_masked"],
        "status": row["status"],
        "expiry": row["expiry"],
        "customer_id": row["customer_id"],
        "account_id": row["account_id"],
    }
    if row["replaced_by"]:
        view["replaced_by"] = row["replaced_by"]
    return view


CARD_COLUMNS = "card_id, pan_masked, status, expiry, customer_id, account_id, replaced_by"


def new_expiry(today: date, years: int) -> str:
    return f"{today.month:02d}/{(today.year + years) % 100:02d}"


# random serials: with 10 million per cell, a few tries find a free one long before a cell is full
SERIAL_TRIES_MAX = 20


@dataclass(frozen=True)
class IssuedCard:
    card_id: str
    pan: str
    expiry: str
    cvv2: str


async def insert_card(
    conn: asyncpg.Connection, service: CoreService, cell: int, account_id: str, customer_id: str, years: int
) -> IssuedCard:
    vault = service.vault
    card_id = ids.new_id(ids.PREFIX_CARD, cell)
    expiry = new_expiry(datetime.now(UTC).date(), years)
    for _ in range(SERIAL_TRIES_MAX):
        pan = ids.new_pan(cell, secrets.randbelow(ids.SERIAL_MAX))
        tokens = vault.tokens(pan)
        if await conn.fetchval("SELECT 1 FROM cards WHERE pan_token = ANY($1::bytea[])", tokens):
            continue  # taken (under this key or another): draw again
        inserted = await conn.fetchval(
            "INSERT INTO cards (card_id, account_id, customer_id, pan_token, pan_cipher, pan_masked, expiry,"
            " status, key_version, cvv_key_version) VALUES ($1, $2, $3, $4, $5, $6, $7, 'inactive', $8, $8)"
            " ON CONFLICT (pan_token) DO NOTHING RETURNING 1",
            card_id,
            account_id,
            customer_id,
            tokens[0],
            vault.encrypt(pan, card_id),
            ids.mask_pan(pan),
            expiry,
            vault.current,
        )
        if inserted:
            return IssuedCard(card_id, pan, expiry, vault.cvv2(pan, expiry, vault.current))
    raise ApiError(503, "pan_space_exhausted", f"no free card number found in {SERIAL_TRIES_MAX} tries")


def routes(service: CoreService) -> list[Route]:
    async def list_products(request: Request) -> tuple[int, Any]:
        catalogue = service.any_engine().catalogue
        return 200, {
            "products": [
                {
                    "product_code": code,
                    "name": catalogue.product_names[code],
                    "default": code == catalogue.default_product,
                    "pricing": {
                        "apr": params["apr"],
                        "cash_fee_rate": params["cash_fee_rate"],
                        "installment_fee_rates": params["installment_fee_rates"],
                    },
                    "params": params,
                }
                for code, params in sorted(catalogue.products.items())
            ]
        }

    async def apply(request: Request) -> tuple[int, Any]:
        body: ApplicationRequest = request.decode(ApplicationRequest)
        applicant = body.applicant
        today = datetime.now(UTC).date()
        if applicant.birth_date >= today:
            raise bad_request("applicant.birth_date", "birth_date must be in the past")
        engine = service.engine_for_cell(service.router.cell_for_applicant(applicant.id_number))
        pool = engine.require_ready()
        catalogue = engine.catalogue
        product_code = body.product_code or catalogue.default_product
        if product_code not in catalogue.products:
            # a product the catalogue does not have is not found, as for a pricing rule naming it
            raise not_found("product_code", f"unknown product_code {product_code!r}")
        params = catalogue.products[product_code]
        decision = decide(applicant.birth_date, applicant.annual_income, today, params)
        declined = {
            "decision": "declined",
            "reasons": decision.reasons,
            "customer_id": None,
            "account_id": None,
            "card_id": None,
            "pan": None,
            "expiry": None,
            "cvv2": None,
            "credit_limit": 0,
            "cell": engine.cell,
        }
        if not decision.approved:
            return 201, declined
        cell = engine.cell
        customer_id = ids.new_id(ids.PREFIX_CUSTOMER, cell)
        account_id = ids.new_id(ids.PREFIX_ACCOUNT, cell)
        vault = service.vault
        id_hashes = vault.id_hashes(applicant.id_number)
        limit = decision.credit_limit_fen
        async with pool.acquire() as conn, conn.transaction():
            known = await conn.fetchval(
                "SELECT 1 FROM customers WHERE id_number_hash = ANY($1::bytea[])", id_hashes
            )
            inserted = None
            if not known:
                inserted = await conn.fetchval(
                    "INSERT INTO customers (customer_id, name, id_number_hash, id_number_cipher, key_version,"
                    " mobile, birth_date, annual_income_fen) VALUES ($1, $2, $3, $4, $5, $6, $7, $8)"
                    " ON CONFLICT (id_number_hash) DO NOTHING RETURNING 1",
                    customer_id,
                    applicant.name,
                    id_hashes[0],
                    vault.encrypt_id(applicant.id_number, customer_id),
                    vault.current,
                    applicant.mobile,
                    applicant.birth_date,
                    applicant.annual_income,
                )
            if not inserted:
                return 201, {
                    **declined,
                    "reasons": ["the applicant already holds an account with this issuer"],
                }
            await conn.execute(
                "INSERT INTO accounts (account_id, customer_id, product_code, cycle_day) VALUES ($1, $2, $3, $4)",
                account_id,
                customer_id,
                product_code,
                # spread over the month by the keyed hash (after its 2-byte key version)
                int.from_bytes(id_hashes[0][2:4], "big") % 28 + 1,
            )
            # children are shares of the total (limits/lines.py)
            shares = [None, Decimal(1), decimal_of(params["cash_share"]), Decimal(1)]
            await conn.execute(
                "INSERT INTO lines (account_id, line, limit_fen, share)"
                " SELECT $1, l, x, s FROM unnest($2::text[], $3::bigint[], $4::numeric[]) AS u(l, x, s)",
                account_id,
                ["total", "purchase", "cash", "installment"],
                [limit] + [fen_of(limit, share) for share in shares[1:] if share is not None],
                shares,
            )
            card = await insert_card(conn, service, cell, account_id, customer_id, int(params["card_years"]))
            states = await load_accounts(conn, [account_id], datetime.now(UTC), lock=False)
            await write_rule_tags(conn, list(states.values()), catalogue.tag_rules)
        return 201, {
            "decision": "approved",
            "reasons": decision.reasons,
            "customer_id": customer_id,
            "account_id": account_id,
            "card_id": card.card_id,
            "pan": card.pan,
            "expiry": card.expiry,
            "cvv2": card.cvv2,
            "credit_limit": limit,
            "product_code": product_code,
            "cell": cell,
        }

    async def get_card(request: Request) -> tuple[int, Any]:
        card_id = request.params["card_id"]
        pool = service.engine_for_id(card_id, ids.PREFIX_CARD, "card_id").require_ready()
        row = await pool.fetchrow(f"SELECT {CARD_COLUMNS} FROM cards WHERE card_id = $1", card_id)
        if row is None:
            raise not_found("card_id", f"card {card_id} not found")
        return 200, card_view(row)

    async def change_status(card_id: str, wanted: str) -> dict[str, Any]:
        pool = service.engine_for_id(card_id, ids.PREFIX_CARD, "card_id").require_ready()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {CARD_COLUMNS} FROM cards WHERE card_id = $1 FOR UPDATE", card_id
            )
            if row is None:
                raise not_found("card_id", f"card {card_id} not found")
            current = row["status"]
            if current == wanted:
                return card_view(row)
            if wanted not in TRANSITIONS.get(current, set()):
                raise conflict(
                    "invalid_transition", f"a card that is {current} cannot become {wanted}", "status"
                )
            row = await conn.fetchrow(
                f"UPDATE cards SET status = $2 WHERE card_id = $1 RETURNING {CARD_COLUMNS}", card_id, wanted
            )
        return card_view(row)

    async def activate(request: Request) -> tuple[int, Any]:
        request.expect_no_fields()
        return 200, await change_status(request.params["card_id"], "active")

    async def set_status(request: Request) -> tuple[int, Any]:
        body: CardStatusRequest = request.decode(CardStatusRequest)
        return 200, await change_status(request.params["card_id"], body.status)

    async def replace(request: Request) -> tuple[int, Any]:
        request.expect_no_fields()
        card_id = request.params["card_id"]
        engine = service.engine_for_id(card_id, ids.PREFIX_CARD, "card_id")
        pool = engine.require_ready()
        async with pool.acquire() as conn, conn.transaction():
            row = await conn.fetchrow(
                f"SELECT {CARD_COLUMNS} FROM cards WHERE card_id = $1 FOR UPDATE", card_id
            )
            if row is None:
                raise not_found("card_id", f"card {card_id} not found")
            if row["replaced_by"]:
                raise conflict(
                    "already_replaced",
                    f"card {card_id} was already replaced by {row['replaced_by']}",
                    "card_id",
                )
            product = await conn.fetchval(
                "SELECT product_code FROM accounts WHERE account_id = $1", row["account_id"]
            )
            years = int(engine.catalogue.products[product]["card_years"])
            issued = await insert_card(
                conn, service, engine.cell, row["account_id"], row["customer_id"], years
            )
            # a card reported lost or stolen stays so (as final as closed): the networks keep
            # getting 41 / 43 for its number, which tells them to retain the plastic
            await conn.execute(
                "UPDATE cards SET status = CASE WHEN status IN ('lost', 'stolen') THEN status ELSE 'closed' END,"
                " replaced_by = $2 WHERE card_id = $1",
                card_id,
                issued.card_id,
            )
            new_row = await conn.fetchrow(
                f"SELECT {CARD_COLUMNS} FROM cards WHERE card_id = $1", issued.card_id
            )
        # the new card's number and CVV2 appear in this answer only (CONTRACT)
        return 201, {**card_view(new_row), "replaces": card_id, "pan": issued.pan, "cvv2": issued.cvv2}

    async def get_customer(request: Request) -> tuple[int, Any]:
        customer_id = request.params["customer_id"]
        engine = service.engine_for_id(customer_id, ids.PREFIX_CUSTOMER, "customer_id")
        pool = engine.require_ready()
        async with pool.acquire() as conn:
            customer = await conn.fetchrow(
                "SELECT customer_id, name FROM customers WHERE customer_id = $1", customer_id
            )
            if customer is None:
                raise not_found("customer_id", f"customer {customer_id} not found")
            cards = await conn.fetch(
                f"SELECT {CARD_COLUMNS} FROM cards WHERE customer_id = $1 ORDER BY created_at", customer_id
            )
            accounts = await conn.fetch(
                "SELECT account_id, product_code, status, cycle_day FROM accounts WHERE customer_id = $1 ORDER BY created_at",
                customer_id,
            )
            tags = await conn.fetch(
                "SELECT tag FROM customer_tags WHERE customer_id = $1 ORDER BY tag", customer_id
            )
        return 200, {
            "customer_id": customer_id,
            "cell": engine.cell,
            "name_masked": mask_name(customer["name"]),
            "cards": [card_view(c) for c in cards],
            "accounts": [dict(a) for a in accounts],
            "tags": [t["tag"] for t in tags],
        }

    return [
        Route("GET", "/v1/products", list_products, "The card products of the catalogue", tag="issuing"),
        Route(
            "POST",
            "/v1/applications",
            apply,
            "Apply for a card: decided in real time",
            ApplicationRequest,
            tag="issuing",
        ),
        Route("GET", "/v1/cards/{card_id}", get_card, "A card, masked", tag="issuing"),
        Route("POST", "/v1/cards/{card_id}/activate", activate, "Activate a new card", tag="issuing"),
        Route(
            "POST",
            "/v1/cards/{card_id}/status",
            set_status,
            "Lock, unlock, report lost or stolen, close",
            CardStatusRequest,
            tag="issuing",
        ),
        Route(
            "POST",
            "/v1/cards/{card_id}/replace",
            replace,
            "Issue a replacement card; the old one is closed (or stays lost or stolen)",
            tag="issuing",
        ),
        Route(
            "GET",
            "/v1/customers/{customer_id}",
            get_customer,
            "A customer with cards, accounts and tags",
            tag="issuing",
        ),
    ]
