"""The app server: the six modules' routes over one ``CoreService``, plus health, readiness,
metrics and the OpenAPI description. Never: start serving a cell it cannot name in /readyz.
"""

from __future__ import annotations

import contextvars
import logging
import os
from collections.abc import Callable
from typing import Any

import msgspec

from cardcore.accounting import api as accounting_api
from cardcore.accounting import ops as _accounting_ops  # noqa: F401  (registers the repayment op)
from cardcore.authorization import api as authorization_api
from cardcore.common import api as common_api
from cardcore.common.pricing import TERMS_ALLOWED
from cardcore.common.types import SUPPORTED_CURRENCIES
from cardcore.installments import api as installments_api
from cardcore.issuing import api as issuing_api
from cardcore.issuing import keys as issuing_keys
from cardcore.limits import api as limits_api
from cardcore.platform import metrics
from cardcore.platform import settings as settings_module
from cardcore.platform.auth import AccessControl
from cardcore.platform.engine import UNAVAILABLE_ERRORS
from cardcore.platform.http import ApiError, JsonApp, RawText, Request, Route, RouteTable
from cardcore.platform.service import CoreService

log = logging.getLogger("cardcore.app")

CONFIG_ENV = "WATERTIGHT_APP_CONFIG"
current_cell: contextvars.ContextVar[str] = contextvars.ContextVar("current_cell", default="")


class _AuthAnswer(msgspec.Struct):
    response_code: str = ""


def outcome_of(status: int) -> str:
    return f"{status // 100}xx"


def database_unavailable(
    error: Exception, on_unavailable: Callable[[int], None] | None = None
) -> ApiError | None:
    """A cell's database lost in the middle of a request (a failover, a partition) makes the cell
    unavailable: 503 ``cell_unavailable`` as CONTRACT says, not a 500; ``on_unavailable`` hears
    which cell (its engine re-checks who leads at once). Anything else: None."""
    if not isinstance(error, UNAVAILABLE_ERRORS):
        return None
    cell = current_cell.get() or "?"
    if on_unavailable is not None and cell.isdigit():
        on_unavailable(int(cell))
    log.warning("cell %s: request failed, database unavailable: %s: %s", cell, type(error).__name__, error)
    return ApiError(
        503,
        "cell_unavailable",
        f"cell {cell} is unavailable ({type(error).__name__}); retry with the same idempotency_key",
        None,
    )


def build(service: CoreService) -> JsonApp:
    registry = metrics.Registry()
    site = service.settings.site
    requests_total = registry.counter(
        "watertight_requests_total",
        "Requests served, by route, cell, site and outcome.",
        ("route", "cell", "site", "outcome"),
    )
    latency = registry.histogram("watertight_request_seconds", "Request latency.", ("route", "cell", "site"))
    decisions = registry.counter(
        "watertight_authorizations_total",
        "Authorization decisions by ISO 8583 response code.",
        ("cell", "site", "response_code"),
    )
    batch_size = registry.histogram(
        "watertight_batch_size",
        "Financial requests per group commit.",
        ("cell", "site"),
        (1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
    )
    batch_seconds = registry.histogram(
        "watertight_batch_seconds", "Time to run and commit one batch.", ("cell", "site")
    )
    cell_ready = registry.gauge(
        "watertight_cell_ready", "1 when the cell's primary is reachable.", ("cell", "site")
    )
    queue_depth = registry.gauge(
        "watertight_commit_queue_depth",
        "Financial requests waiting for the cell's group commit when scraped.",
        ("cell", "site"),
    )
    queue_capacity = registry.gauge(
        "watertight_commit_queue_capacity",
        "Most financial requests the cell's group-commit queue holds (more are answered 503).",
        ("cell", "site"),
    )
    answer_decoder = msgspec.json.Decoder(_AuthAnswer)

    for engine in service.engines.values():
        labels = (str(engine.cell), site)
        # a series that appears only at its first event is invisible to rate() and increase():
        # the codes the alerts watch exist from the start
        for code in ("00", "91"):
            decisions.inc((str(engine.cell), site, code), 0)
        queue_capacity.set(labels, service.settings.queue_depth_max)

        def on_batch(size: int, seconds: float, labels: tuple[str, str] = labels) -> None:
            batch_size.observe(labels, size)
            batch_seconds.observe(labels, seconds)

        engine.on_batch = on_batch

    original_for_cell = service.engine_for_cell

    def engine_for_cell(cell: int) -> Any:
        current_cell.set(str(cell))
        return original_for_cell(cell)

    service.engine_for_cell = engine_for_cell  # type: ignore[method-assign]

    async def healthz(request: Request) -> tuple[int, Any]:
        return 200, {"status": "ok", "site": site}

    async def readyz(request: Request) -> tuple[int, Any]:
        body = service.readiness()
        return (200 if body["ready"] else 503), body

    async def metrics_text(request: Request) -> tuple[int, Any]:
        for engine in service.engines.values():
            cell_ready.set((str(engine.cell), site), 1 if engine.ready else 0)
            queue_depth.set((str(engine.cell), site), engine.queue_depth)
        return 200, RawText(registry.render())

    routes: list[Route] = []
    for module in (
        issuing_api,
        issuing_keys,
        limits_api,
        authorization_api,
        installments_api,
        accounting_api,
        common_api,
    ):
        routes += module.routes(service)

    authorize_route = next(r for r in routes if r.template == "/v1/authorizations" and r.method == "POST")
    authorize_handler = authorize_route.handler

    async def authorize_counted(request: Request) -> tuple[int, Any]:
        status, data = await authorize_handler(request)
        if status == 200 and isinstance(data, bytes):
            decisions.inc((current_cell.get(), site, answer_decoder.decode(data).response_code))
        return status, data

    authorize_route.handler = authorize_counted

    async def openapi(request: Request) -> tuple[int, Any]:
        return 200, document

    routes += [
        Route("GET", "/healthz", healthz, "The process is alive", tag="operations"),
        Route("GET", "/readyz", readyz, "Which cells this server can serve", tag="operations"),
        Route("GET", "/metrics", metrics_text, "Prometheus metrics", tag="operations"),
        Route("GET", "/openapi.json", openapi, "This description", tag="operations"),
    ]
    document = openapi_document(routes, service.settings.cell_count)

    def observe(route: Route | None, status: int, seconds: float) -> None:
        template = route.template if route is not None else "unmatched"
        cell = current_cell.get()
        requests_total.inc((template, cell, site, outcome_of(status)))
        latency.observe((template, cell, site), seconds)

    def suspect(cell: int) -> None:
        if cell in service.engines:
            service.engines[cell].suspect()

    app = JsonApp(
        RouteTable(routes),
        observe,
        on_error=lambda error: database_unavailable(error, suspect),
        access=AccessControl(service.settings.api_tokens_file),
        limits=service.settings.serve_limits(),
    )
    app.startup.append(service.keys.start)
    for engine in service.engines.values():
        app.startup.append(engine.start)
        app.shutdown.append(engine.stop)
    app.shutdown.append(service.keys.stop)
    return app


# what the routes answer on success when it is not 200 (POST that creates; both when it may
# find the thing there already)
_CREATED: dict[tuple[str, str], tuple[str, ...]] = {
    ("POST", "/v1/applications"): ("201",),
    ("POST", "/v1/cards/{card_id}/replace"): ("201",),
    ("POST", "/v1/installments"): ("201",),
    ("POST", "/v1/customers/{customer_id}/limits/temporary"): ("201",),
    ("POST", "/v1/tags"): ("201", "200"),
    ("POST", "/v1/pricing/rules"): ("201", "200"),
}
_CELL = {"name": "cell", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 99}}
_QUERY: dict[tuple[str, str], list[dict[str, Any]]] = {
    ("GET", "/v1/admin/trial-balance"): [{**_CELL, "required": True}],
    ("GET", "/v1/admin/keys"): [{**_CELL, "required": True}],
    ("POST", "/v1/admin/keys/rewrap"): [{**_CELL, "required": True}],
    ("POST", "/v1/admin/cycle"): [{**_CELL, "required": False}],
    ("POST", "/v1/tags"): [{**_CELL, "required": False}],
    ("GET", "/v1/tags/{tag}/customers"): [
        {**_CELL, "required": False},
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": common_api.CUSTOMERS_PER_PAGE_MAX},
        },
    ],
    ("POST", "/v1/pricing/rules"): [{**_CELL, "required": False}],
    ("GET", "/v1/pricing/rules"): [
        {**_CELL, "required": False},
        {
            "name": "layer",
            "in": "query",
            "required": False,
            "schema": {"enum": ["product", "account", "transaction"]},
        },
    ],
    ("GET", "/v1/accounts/{account_id}/transactions"): [
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": accounting_api.PAGE_SIZE_MAX},
        },
        {
            "name": "cursor",
            "in": "query",
            "required": False,
            "description": "the next_cursor of the page before",
            "schema": {"type": "string", "pattern": accounting_api.CURSOR_PATTERN},
        },
    ],
}
# ids carry their kind and cell: anything else is not one of ours (the core answers 404)
_ID_PATTERN = {
    "customer_id": "^CU[0-9]{2}[A-Z2-7]{16}$",
    "account_id": "^AC[0-9]{2}[A-Z2-7]{16}$",
    "card_id": "^CD[0-9]{2}[A-Z2-7]{16}$",
    "auth_id": "^AU[0-9]{2}[A-Z2-7]{16}$",
    "plan_id": "^IP[0-9]{2}[A-Z2-7]{16}$",
}
# links between operations, so a stateful client reaches deep: what an answer names, the routes
# that take it
_LINK_SOURCES: dict[tuple[str, str], dict[str, str]] = {
    ("POST", "/v1/applications"): {
        "card_id": "$response.body#/card_id",
        "customer_id": "$response.body#/customer_id",
        "account_id": "$response.body#/account_id",
    },
    ("POST", "/v1/cards/{card_id}/replace"): {"card_id": "$response.body#/card_id"},
    ("POST", "/v1/authorizations"): {"auth_id": "$response.body#/auth_id"},
    ("POST", "/v1/installments"): {"plan_id": "$response.body#/plan_id"},
}
_PUBLIC = {("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/openapi.json")}
_ERRORS = {
    "400": "Bad input: the field is named; nothing was written",
    "401": "No bearer token, or not a valid one",
    "403": "A token of another client kind",
    "404": "Not found (an id that is not one of this core's, or no such route)",
    "405": "Method not allowed (Allow lists the ones that are)",
    "408": "The body did not arrive in time",
    "409": "Conflict: an idempotency key reused with another body, or a state that does not allow it",
    "413": "The body is too large",
    "422": "Understood but not possible (e.g. more than the hold)",
    "503": "The cell is unavailable, drained, or the server is shedding load (retry)",
    "504": "The cell did not answer in time (retry with the same idempotency key)",
}


def _when(field: str, values: list[str], then: dict[str, Any]) -> dict[str, Any]:
    """JSON Schema's "if ``field`` is one of ``values`` then ``then``"."""
    condition = {"const": values[0]} if len(values) == 1 else {"enum": values}
    return {"if": {"properties": {field: condition}, "required": [field]}, "then": then}


def _number_branch(schema: dict[str, Any]) -> dict[str, Any]:
    """The non-null branch of an optional property's schema (``anyOf: [X, null]``), or itself."""
    for branch in schema.get("anyOf", ()):
        if branch.get("type") != "null":
            return dict(branch)
    return schema


_NO_NUL = "^[^\\u0000]*$"


def _no_nul(schema: Any) -> None:
    """Every free-text string of ``schema`` (no pattern, format or enum of its own) says it holds
    no U+0000; so does every property name."""
    if isinstance(schema, list):
        for item in schema:
            _no_nul(item)
        return
    if not isinstance(schema, dict):
        return
    if schema.get("type") == "string" and not {"pattern", "format", "enum", "const"} & set(schema):
        schema["pattern"] = _NO_NUL
    if schema.get("type") == "object" and "additionalProperties" not in schema:
        schema["propertyNames"] = {"pattern": _NO_NUL}
    for key, value in schema.items():
        if key == "properties" and isinstance(value, dict):
            for item in value.values():
                _no_nul(item)
        elif isinstance(value, dict | list):
            _no_nul(value)


def _constrain(components: dict[str, Any]) -> None:
    """What the server checks beyond its request types, said in the schemas where JSON Schema can
    say it (the rest is in the fields' descriptions: a Luhn check digit, a time relative to now,
    one field compared with another). Each line here mirrors a check in the code it names."""
    # Request.decode (platform/http.py): no text holds U+0000, which PostgreSQL cannot store
    _no_nul(components)
    # check_currency (authorization/ops.py), Repay: the only currency this issuer books
    for schema in components.values():
        properties = schema.get("properties", {})
        if "currency" in properties:
            properties["currency"] = {
                **properties["currency"],
                "enum": sorted(SUPPORTED_CURRENCIES),
                "description": "ISO 4217; this issuer books CNY only",
            }
    # check_authorization_format: card not present, so the CVV2 printed on the card
    components["AuthorizationRequest"]["allOf"] = [
        _when("channel", ["online"], {"required": ["cvv2"], "properties": {"cvv2": {"type": "string"}}})
    ]
    # Clear: an authorization id of this core (anything else is refused before it is looked up)
    components["ClearingRequest"]["properties"]["auth_id"] = {
        "type": "string",
        "pattern": _ID_PATTERN["auth_id"],
    }
    # validate_rule (common/pricing.py)
    price = components["PriceSpec"]
    price_properties = price["properties"]
    for name in ("value", "multiplier"):
        price_properties[name] = {
            "anyOf": [
                {**_number_branch(price_properties[name]), "minimum": 0, "maximum": 10},
                {"type": "null"},
            ],
            "default": None,
        }
    price["allOf"] = [
        {
            "description": "exactly one of value (a price) and multiplier (of the price below)",
            "oneOf": [
                {
                    "required": ["value"],
                    "properties": {"value": {"type": "number"}, "multiplier": {"type": "null"}},
                },
                {
                    "required": ["multiplier"],
                    "properties": {"multiplier": {"type": "number"}, "value": {"type": "null"}},
                },
            ],
        },
        _when(
            "item",
            ["installment_fee_rate"],
            {"properties": {"terms": {"enum": [*sorted(TERMS_ALLOWED), None]}}},
        ),
    ]
    components["PricingRule"]["allOf"] = [
        _when(
            "layer",
            ["product"],
            {
                "required": ["product_code"],
                "properties": {"product_code": {"type": "string", "minLength": 1}},
            },
        ),
        _when(
            "layer",
            ["account"],
            {"required": ["account_id"], "properties": {"account_id": {"type": "string", "minLength": 1}}},
        ),
        # only transaction-layer campaigns take conditions
        _when("layer", ["product", "account"], {"properties": {"conditions": {"type": "null"}}}),
    ]


def openapi_document(routes: list[Route], cell_count: int = 99) -> dict[str, Any]:
    request_types = [r.request_type for r in routes if r.request_type is not None]
    refs, components = msgspec.json.schema_components(
        request_types, ref_template="#/components/schemas/{name}"
    )
    _constrain(components)
    ref_of = dict(zip(request_types, refs, strict=True))
    error_ref = {"$ref": "#/components/schemas/Error"}
    components["Error"] = {
        "type": "object",
        "required": ["error"],
        "properties": {
            "error": {
                "type": "object",
                "required": ["code", "message", "field"],
                "properties": {
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "field": {"type": ["string", "null"]},
                },
            }
        },
    }

    def operation_id(method: str, template: str) -> str:
        return f"{method.lower()}_{template.strip('/').replace('/', '_').replace('{', '').replace('}', '')}"

    targets: dict[str, list[tuple[Route, str]]] = {}
    for route in routes:
        for segment in route.segments:
            if segment.startswith("{"):
                targets.setdefault(segment[1:-1], []).append((route, segment[1:-1]))

    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        key = (route.method, route.template)
        public = key in _PUBLIC
        json_object = {"application/json": {"schema": {"type": "object"}}}
        responses: dict[str, Any] = {}
        for status in _CREATED.get(key, ("200",)):
            responses[status] = {"description": "OK", "content": json_object}
        if route.template == "/metrics":
            responses["200"] = {
                "description": "Prometheus text exposition format",
                "content": {RawText.content_type.decode(): {"schema": {"type": "string"}}},
            }
        if route.template == "/readyz":
            responses["503"] = {"description": "Cannot serve any cell", "content": json_object}
        sources = _LINK_SOURCES.get(key)
        if sources:
            links: dict[str, Any] = {}
            for name, expression in sources.items():
                for target, parameter in targets.get(name, []):
                    links[f"{operation_id(target.method, target.template)}_{parameter}"] = {
                        "operationId": operation_id(target.method, target.template),
                        "parameters": {parameter: expression},
                    }
            for status in _CREATED.get(key, ("200",))[:1]:
                responses[status]["links"] = links
        for status, description in _ERRORS.items():
            if public and status in ("401", "403"):
                continue
            responses.setdefault(
                status, {"description": description, "content": {"application/json": {"schema": error_ref}}}
            )
        if responses.get("405"):
            responses["405"]["headers"] = {"Allow": {"schema": {"type": "string"}, "required": True}}
        if responses.get("401"):
            responses["401"]["headers"] = {
                "WWW-Authenticate": {"schema": {"type": "string"}, "required": True}
            }
        if responses.get("503") and route.template not in ("/readyz",):
            responses["503"]["headers"] = {"Retry-After": {"schema": {"type": "string"}, "required": False}}
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": operation_id(route.method, route.template),
            "responses": responses,
        }
        if public:
            operation["security"] = []
        parameters = [
            {
                "name": segment[1:-1],
                "in": "path",
                "required": True,
                "schema": {
                    "type": "string",
                    **(
                        {"pattern": _ID_PATTERN[segment[1:-1]]}
                        if segment[1:-1] in _ID_PATTERN
                        else {"minLength": 1}
                    ),
                },
            }
            for segment in route.segments
            if segment.startswith("{")
        ] + [
            {**query, "schema": {**query["schema"], "maximum": cell_count}}
            if query["name"] == "cell"
            else query
            for query in _QUERY.get(key, [])
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.request_type is not None:
            operation["requestBody"] = {
                "required": key not in (("POST", "/v1/admin/keys/rewrap"),),
                "content": {"application/json": {"schema": ref_of[route.request_type]}},
            }
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Watertight card core",
            "version": "1.0.0",
            "description": "Money in fen (minor units, integers). Financial POSTs take an idempotency_key. "
            "Every request but GET /healthz, /readyz and /openapi.json carries the bearer token of its "
            "client kind: acquirer (authorizations, reversals, clearing, refunds), channel "
            "(applications, reads, repayments, installments, customer tags), operator (/v1/admin/*, "
            "pricing rules, setting limits, tag definitions, /metrics).",
        },
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def create_app() -> JsonApp:
    """Factory for granian: settings from the file named by $WATERTIGHT_APP_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise SystemExit(f"set {CONFIG_ENV} to the app server's settings file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build(CoreService(settings_module.load(path)))


__all__ = ["ApiError", "build", "create_app"]
