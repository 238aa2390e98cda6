"""Common services: the tag system and pricing rules (routing lookups are the gateway's).

Never: let a rule-based tag be set by hand or a manual one be removed by a rule.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec

from cardcore.common import ids
from cardcore.common.pricing import PricingRule, rule_id_of, validate_rule
from cardcore.common.tags import TAG_RE, TagRule
from cardcore.platform.engine import CellEngine
from cardcore.platform.http import Request, Route, bad_request, conflict, encode, not_found
from cardcore.platform.service import CoreService, cell_param
from cardcore.platform.state import load_accounts, write_rule_tags

TagName = Annotated[str, msgspec.Meta(pattern=TAG_RE)]
CUSTOMERS_PER_PAGE_MAX = 1000
RULE_SWEEP_BATCH = 500


class TagDefinitionRequest(msgspec.Struct, forbid_unknown_fields=True):
    tag: TagName
    description: Annotated[str, msgspec.Meta(min_length=1, max_length=200)]
    rule: TagRule | None = None


async def sweep_rule(engine: CellEngine, tag: str) -> int:
    """Evaluate a new rule over every customer of the cell, in bounded batches. Returns matches."""
    pool = engine.require_ready()
    last = ""
    matched = 0
    while True:
        async with pool.acquire() as conn, conn.transaction():
            account_ids = [
                r[0]
                for r in await conn.fetch(
                    "SELECT account_id FROM accounts WHERE account_id > $1 ORDER BY account_id LIMIT $2",
                    last,
                    RULE_SWEEP_BATCH,
                )
            ]
            states = await load_accounts(conn, account_ids, datetime.now(UTC), lock=True)
            await write_rule_tags(conn, list(states.values()), engine.catalogue.tag_rules)
            matched += sum(1 for s in states.values() if s.tags.get(tag) is not None)
        if len(account_ids) < RULE_SWEEP_BATCH:
            return matched
        last = account_ids[-1]


def same_definition(existing: Any, description: str, rule: Any) -> bool:
    """Whether a stored tag definition row is the one given (``rule`` as builtins, or None)."""
    stored_rule = msgspec.json.decode(existing["rule"]) if existing["rule"] else None
    return bool(existing["description"] == description and stored_rule == rule)


def routes(service: CoreService) -> list[Route]:
    def customer_engine(customer_id: str) -> CellEngine:
        return service.engine_for_id(customer_id, ids.PREFIX_CUSTOMER, "customer_id")

    async def customer_tags(request: Request) -> tuple[int, Any]:
        customer_id = request.params["customer_id"]
        pool = customer_engine(customer_id).require_ready()
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM customers WHERE customer_id = $1", customer_id):
                raise not_found("customer_id", f"customer {customer_id} not found")
            rows = await conn.fetch(
                "SELECT tag, source, created_at FROM customer_tags WHERE customer_id = $1 ORDER BY tag",
                customer_id,
            )
        return 200, {
            "customer_id": customer_id,
            "tags": [{"tag": r["tag"], "source": r["source"], "since": r["created_at"]} for r in rows],
        }

    async def put_tag(request: Request) -> tuple[int, Any]:
        customer_id, tag = request.params["customer_id"], request.params["tag"]
        engine = customer_engine(customer_id)
        pool = engine.require_ready()
        definition = engine.catalogue.tag_definitions.get(tag)
        if definition is None:
            raise not_found("tag", f"tag {tag!r} is not defined; define it with POST /v1/tags")
        if definition[1] is not None:
            raise conflict("rule_tag", f"tag {tag!r} is set by its rule, not by hand", "tag")
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM customers WHERE customer_id = $1", customer_id):
                raise not_found("customer_id", f"customer {customer_id} not found")
            await conn.execute(
                "INSERT INTO customer_tags (customer_id, tag, source) VALUES ($1, $2, 'manual') ON CONFLICT DO NOTHING",
                customer_id,
                tag,
            )
        return 200, {"customer_id": customer_id, "tag": tag, "source": "manual"}

    async def delete_tag(request: Request) -> tuple[int, Any]:
        customer_id, tag = request.params["customer_id"], request.params["tag"]
        engine = customer_engine(customer_id)
        pool = engine.require_ready()
        definition = engine.catalogue.tag_definitions.get(tag)
        if definition is not None and definition[1] is not None:
            raise conflict("rule_tag", f"tag {tag!r} is set by its rule, not by hand", "tag")
        async with pool.acquire() as conn:
            if not await conn.fetchval("SELECT 1 FROM customers WHERE customer_id = $1", customer_id):
                raise not_found("customer_id", f"customer {customer_id} not found")
            deleted = await conn.fetchval(
                "DELETE FROM customer_tags WHERE customer_id = $1 AND tag = $2 AND source = 'manual' RETURNING 1",
                customer_id,
                tag,
            )
        if not deleted:
            raise not_found("tag", f"customer {customer_id} has no tag {tag!r}")
        return 200, {"customer_id": customer_id, "tag": tag, "deleted": True}

    async def define_tag(request: Request) -> tuple[int, Any]:
        """One tag definition copied into every cell (``?cell=N``: that cell only). A definition
        the cell holds already, the same, is no conflict: a retry after some cells failed defines
        it in the cells still missing it. Only a *different* definition is (409), and then no
        cell is written: every cell is checked before any is. ``201`` when this request defined
        it in at least one cell, ``200`` when every cell had it already. ``&check=only``: the
        check alone (the gateway's first round of a fan-out), nothing written: ``200``."""
        body: TagDefinitionRequest = request.decode(TagDefinitionRequest)
        check = request.query.get("check")
        if check not in (None, "only"):
            raise bad_request("check", "check must be 'only' (check for a conflict, write nothing)")
        rule = msgspec.to_builtins(body.rule) if body.rule is not None else None
        engines = cell_param(service, request.query, required=False)
        missing: list[CellEngine] = []
        for engine in engines:
            async with engine.require_ready().acquire() as conn:
                existing = await conn.fetchrow(
                    "SELECT description, rule FROM tag_definitions WHERE tag = $1", body.tag
                )
            if existing is None:
                missing.append(engine)
            elif not same_definition(existing, body.description, rule):
                raise conflict(
                    "tag_exists",
                    f"tag {body.tag!r} is already defined differently in cell {engine.cell}",
                    "tag",
                )
        answer = {"tag": body.tag, "description": body.description, "rule": body.rule}
        if check == "only":
            return 200, answer
        created = False
        for engine in missing:
            async with engine.require_ready().acquire() as conn:
                inserted = await conn.fetchval(
                    "INSERT INTO tag_definitions (tag, description, rule) VALUES ($1, $2, $3::jsonb)"
                    " ON CONFLICT (tag) DO NOTHING RETURNING 1",
                    body.tag,
                    body.description,
                    encode(body.rule).decode() if body.rule is not None else None,
                )
                if not inserted:
                    # defined by another request since the check: the same or a conflict, as above
                    existing = await conn.fetchrow(
                        "SELECT description, rule FROM tag_definitions WHERE tag = $1", body.tag
                    )
                    if not same_definition(existing, body.description, rule):
                        raise conflict(
                            "tag_exists",
                            f"tag {body.tag!r} was defined differently in cell {engine.cell} meanwhile",
                            "tag",
                        )
                    continue
            created = True
            await engine.refresh_catalogue()
            if body.rule is not None:
                await sweep_rule(engine, body.tag)
        return (201 if created else 200), answer

    async def tag_customers(request: Request) -> tuple[int, Any]:
        tag = request.params["tag"]
        limit_raw = request.query.get("limit", str(CUSTOMERS_PER_PAGE_MAX))
        if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= CUSTOMERS_PER_PAGE_MAX:
            raise bad_request("limit", f"limit must be 1..{CUSTOMERS_PER_PAGE_MAX}")
        customers: list[str] = []
        for engine in cell_param(service, request.query, required=False):
            if tag not in engine.catalogue.tag_definitions:
                raise not_found("tag", f"tag {tag!r} is not defined")
            pool = engine.require_ready()
            rows = await pool.fetch(
                "SELECT customer_id FROM customer_tags WHERE tag = $1 ORDER BY customer_id LIMIT $2",
                tag,
                int(limit_raw),
            )
            customers += [r[0] for r in rows]
        return 200, {"tag": tag, "customers": customers}

    async def add_rule(request: Request) -> tuple[int, Any]:
        rule: PricingRule = request.decode(PricingRule)
        problem = validate_rule(rule)
        if problem is not None:
            raise bad_request(*problem)
        if rule.layer == "account":
            assert rule.account_id is not None
            engines = [service.engine_for_id(rule.account_id, ids.PREFIX_ACCOUNT, "account_id")]
        else:
            engines = cell_param(service, request.query, required=False)
        rule_id = rule_id_of(rule)
        # every cell checked before any is written: a refusal writes nothing anywhere
        for engine in engines:
            pool = engine.require_ready()
            if rule.layer == "product" and rule.product_code not in engine.catalogue.products:
                raise not_found("product_code", f"product {rule.product_code} not found")
            if rule.layer == "account" and not await pool.fetchval(
                "SELECT 1 FROM accounts WHERE account_id = $1", rule.account_id
            ):
                raise not_found("account_id", f"account {rule.account_id} not found")
        # content-addressed: a cell that has the rule already is no conflict (a retry after a
        # partial failure adds it where it is missing); 201 when this request added it anywhere
        created = False
        for engine in engines:
            inserted = await engine.require_ready().fetchval(
                "INSERT INTO pricing_rules (rule_id, layer, body) VALUES ($1, $2, $3::jsonb) ON CONFLICT DO NOTHING RETURNING 1",
                rule_id,
                rule.layer,
                encode(rule).decode(),
            )
            created = created or bool(inserted)
            await engine.refresh_catalogue()
        return (201 if created else 200), {"rule_id": rule_id, **msgspec.to_builtins(rule)}

    async def list_rules(request: Request) -> tuple[int, Any]:
        layer = request.query.get("layer")
        if layer is not None and layer not in ("product", "account", "transaction"):
            raise bad_request("layer", "layer must be product, account or transaction")
        seen: dict[str, Any] = {}
        for engine in cell_param(service, request.query, required=False):
            engine.require_ready()
            for rule_id, rule in engine.catalogue.rules:
                if layer is None or rule.layer == layer:
                    seen[rule_id] = {"rule_id": rule_id, **msgspec.to_builtins(rule)}
        return 200, {"rules": list(seen.values())}

    def routing(value: str, prefix: str, field: str) -> dict[str, Any]:
        cell = service.router.cell_for_id(value, prefix)
        if cell is None:
            raise not_found(field, f"{field} is not an id this issuer gave out")
        engine = service.engines.get(cell)
        return {
            "cell": cell,
            "leader_site": engine.leader_site if engine is not None and engine.ready else None,
        }

    async def route_customer(request: Request) -> tuple[int, Any]:
        return 200, routing(request.params["customer_id"], ids.PREFIX_CUSTOMER, "customer_id")

    async def route_card(request: Request) -> tuple[int, Any]:
        return 200, routing(request.params["card_id"], ids.PREFIX_CARD, "card_id")

    return [
        Route(
            "GET",
            "/v1/routing/customers/{customer_id}",
            route_customer,
            "The cell of a customer and where it is led",
            tag="common",
        ),
        Route(
            "GET",
            "/v1/routing/cards/{card_id}",
            route_card,
            "The cell of a card and where it is led",
            tag="common",
        ),
        Route("GET", "/v1/customers/{customer_id}/tags", customer_tags, "The customer's tags", tag="common"),
        Route("PUT", "/v1/customers/{customer_id}/tags/{tag}", put_tag, "Set a manual tag", tag="common"),
        Route(
            "DELETE",
            "/v1/customers/{customer_id}/tags/{tag}",
            delete_tag,
            "Remove a manual tag",
            tag="common",
        ),
        Route(
            "POST",
            "/v1/tags",
            define_tag,
            "Define a tag, manual or with a rule",
            TagDefinitionRequest,
            tag="common",
        ),
        Route("GET", "/v1/tags/{tag}/customers", tag_customers, "Customers carrying a tag", tag="common"),
        Route(
            "POST",
            "/v1/pricing/rules",
            add_rule,
            "Add a pricing rule (product, account or transaction layer)",
            PricingRule,
            tag="common",
        ),
        Route("GET", "/v1/pricing/rules", list_rules, "The pricing rules", tag="common"),
    ]
