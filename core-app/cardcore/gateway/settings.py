"""Gateway settings, read from a JSON file (rendered by the topology) or built in tests.

Example::

    {"site": "prod", "host": "127.0.0.1", "port": 8001, "cell_count": 2,
     "upstreams": {"1": ["http://127.0.0.1:8101", "http://127.0.0.1:8201"],
                   "2": ["http://127.0.0.1:8101", "http://127.0.0.1:8201"]},
     "api_tokens_file": "api-tokens.json"}

Every cell 1..cell_count needs at least one upstream; the same URL may serve several cells. An
``https://`` upstream (an app server in the other center, cardcore.platform.tls) is verified
against ``tls_ca_file``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import msgspec

from cardcore.common.routing import Router
from cardcore.platform import auth
from cardcore.platform.admission import ServeLimitSettings
from cardcore.platform.tls import client_context
from cardcore.platform.upstream import is_tls, parse_base_url

ENV_CONFIG = "WATERTIGHT_GATEWAY_CONFIG"

Millis = Annotated[int, msgspec.Meta(ge=1, le=600_000)]


class GatewayConfigError(ValueError):
    """The configuration is unusable; the message names the key."""


class GatewaySettings(ServeLimitSettings, kw_only=True, forbid_unknown_fields=True):
    site: str
    cell_count: Annotated[int, msgspec.Meta(ge=1, le=99)]
    upstreams: dict[str, list[str]]
    # the accepted API tokens (cardcore.platform.auth.TokensFile), read again when it changes;
    # relative to the settings file when not absolute
    api_tokens_file: str
    host: str = "127.0.0.1"
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)] = 8000
    slot_overrides: dict[int, int] = msgspec.field(default_factory=dict)
    health_interval_ms: Millis = 500
    health_timeout_ms: Millis = 500
    request_timeout_ms: Millis = 5000
    connect_timeout_ms: Millis = 300
    pool_size_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 64
    # cells drained for maintenance: a JSON file {"drained_cells": [2]} that operators (the
    # drain-cell runbook) rewrite; read again when it changes, checked every drain_poll_ms
    drain_file: str | None = None
    drain_poll_ms: Millis = 250
    # the CA that https:// upstreams are verified with (relative to the settings file when not
    # absolute); required when an upstream is https://
    tls_ca_file: str | None = None
    # hostile clients (cardcore.platform.admission.ServeLimitSettings has the other limits): a
    # gateway and the entry take every client's connections, an app server only the gateways'
    connections_max: Annotated[int, msgspec.Meta(ge=64, le=1_000_000)] = 16384
    connections_per_client_max: Annotated[int, msgspec.Meta(ge=16, le=1_000_000)] = 2048

    def validate(self) -> None:
        """Checks msgspec cannot express; raises GatewayConfigError naming the key."""
        if not self.site:
            raise GatewayConfigError("site: must not be empty")
        try:
            Router(self.cell_count, self.slot_overrides)
        except ValueError as error:
            raise GatewayConfigError(str(error)) from None
        for key, urls in self.upstreams.items():
            if not key.isdigit() or not 1 <= int(key) <= self.cell_count:
                raise GatewayConfigError(
                    f"upstreams: key {key!r} is not a cell number in 1..{self.cell_count}"
                )
            if not urls:
                raise GatewayConfigError(f"upstreams.{key}: needs at least one upstream URL")
            for url in urls:
                try:
                    parse_base_url(url)
                except ValueError as error:
                    raise GatewayConfigError(f"upstreams.{key}: {error}") from None
                if is_tls(url) and self.tls_ca_file is None:
                    raise GatewayConfigError(f"upstreams.{key}: {url} is https:// and tls_ca_file is not set")
        missing = [cell for cell in range(1, self.cell_count + 1) if str(cell) not in self.upstreams]
        if missing:
            raise GatewayConfigError(f"upstreams: no upstream for cell(s) {', '.join(map(str, missing))}")

    def cell_upstreams(self) -> dict[int, list[str]]:
        """cell -> base URLs without a trailing slash, duplicates removed, order kept."""
        return {
            int(key): list(dict.fromkeys(url.rstrip("/") for url in urls))
            for key, urls in self.upstreams.items()
        }


def parse(data: bytes | str, source: str = "gateway settings") -> GatewaySettings:
    try:
        settings = msgspec.json.decode(data, type=GatewaySettings)
    except msgspec.ValidationError as error:
        raise GatewayConfigError(f"{source}: {error}") from None
    except msgspec.DecodeError as error:
        raise GatewayConfigError(f"{source}: not valid JSON: {error}") from None
    try:
        settings.validate()
    except GatewayConfigError as error:
        raise GatewayConfigError(f"{source}: {error}") from None
    return settings


def load(path: str | Path) -> GatewaySettings:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise GatewayConfigError(f"{path}: cannot read: {error.strerror or error}") from None
    settings = parse(data, str(path))
    tokens = Path(settings.api_tokens_file)
    if not tokens.is_absolute():
        settings.api_tokens_file = str(Path(path).resolve().parent / tokens)
    try:
        auth.read_tokens_file(settings.api_tokens_file)
    except auth.TokensFileError as error:
        raise GatewayConfigError(f"{path}: api_tokens_file: {error}") from None
    if settings.tls_ca_file is not None:
        settings.tls_ca_file = str(Path(path).resolve().parent / settings.tls_ca_file)
        try:
            client_context(settings.tls_ca_file)
        except ValueError as error:
            raise GatewayConfigError(f"{path}: tls_ca_file: {error}") from None
    return settings


def load_from_env() -> GatewaySettings:
    path = os.environ.get(ENV_CONFIG)
    if not path:
        raise GatewayConfigError(f"{ENV_CONFIG} is not set: point it at the gateway's JSON settings file")
    return load(path)
