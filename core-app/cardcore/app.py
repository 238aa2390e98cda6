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
from cardcore.installments import api as installments_api
from cardcore.issuing import api as issuing_api
from cardcore.limits import api as limits_api
from cardcore.platform import metrics
from cardcore.platform import settings as settings_module
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
    answer_decoder = msgspec.json.Decoder(_AuthAnswer)

    for engine in service.engines.values():
        labels = (str(engine.cell), site)

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
        return 200, RawText(registry.render())

    routes: list[Route] = []
    for module in (issuing_api, limits_api, authorization_api, installments_api, accounting_api, common_api):
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
    document = openapi_document(routes)

    def observe(route: Route | None, status: int, seconds: float) -> None:
        template = route.template if route is not None else "unmatched"
        cell = current_cell.get()
        requests_total.inc((template, cell, site, outcome_of(status)))
        latency.observe((template, cell, site), seconds)

    def suspect(cell: int) -> None:
        if cell in service.engines:
            service.engines[cell].suspect()

    app = JsonApp(RouteTable(routes), observe, on_error=lambda error: database_unavailable(error, suspect))
    for engine in service.engines.values():
        app.startup.append(engine.start)
        app.shutdown.append(engine.stop)
    return app


def openapi_document(routes: list[Route]) -> dict[str, Any]:
    request_types = [r.request_type for r in routes if r.request_type is not None]
    refs, components = msgspec.json.schema_components(
        request_types, ref_template="#/components/schemas/{name}"
    )
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
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "tags": [route.tag],
            "operationId": f"{route.method.lower()}_{route.template.strip('/').replace('/', '_').replace('{', '').replace('}', '')}",
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}},
                "4XX": {
                    "description": "Rejected: nothing was written",
                    "content": {"application/json": {"schema": error_ref}},
                },
                "5XX": {
                    "description": "The cell is unavailable",
                    "content": {"application/json": {"schema": error_ref}},
                },
            },
        }
        parameters = [
            {"name": segment[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
            for segment in route.segments
            if segment.startswith("{")
        ]
        if parameters:
            operation["parameters"] = parameters
        if route.request_type is not None:
            operation["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": ref_of[route.request_type]}},
            }
        paths.setdefault(route.template, {})[route.method.lower()] = operation
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Watertight card core",
            "version": "1.0.0",
            "description": "Money in fen (minor units, integers). Financial POSTs take an idempotency_key.",
        },
        "paths": paths,
        "components": {"schemas": components},
    }


def create_app() -> JsonApp:
    """Factory for granian: settings from the file named by $WATERTIGHT_APP_CONFIG."""
    path = os.environ.get(CONFIG_ENV)
    if not path:
        raise SystemExit(f"set {CONFIG_ENV} to the app server's settings file")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return build(CoreService(settings_module.load(path)))


__all__ = ["ApiError", "build", "create_app"]
