"""App server settings, read from a JSON file (rendered by the topology) or built in tests.

The keys of card and identity data come either from ``keys_file`` (a key ring, versioned, read
again when it changes: rotation without restart) or from ``pan_key_hex`` (one key, version 1).
Never: print a key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import msgspec

from cardcore.common.crypto import KeyRingError, PanVault, parse_ring
from cardcore.platform import auth
from cardcore.platform.admission import ServeLimitSettings
from cardcore.platform.tls import TlsListen, client_context, server_context
from cardcore.platform.upstream import is_tls

Positive = Annotated[int, msgspec.Meta(ge=1)]


class CellSettings(msgspec.Struct, forbid_unknown_fields=True):
    dsn: str
    # host:port of each database member -> its site, so readyz can say where the leader is
    member_sites: dict[str, str] = {}
    leader_site: str | None = None
    # host:port of each database member -> the base URL of its Patroni REST API: when given, the
    # app server serves only from the member holding the leader lock (see cardcore.platform.engine)
    patroni_urls: dict[str, str] = {}


class AppSettings(ServeLimitSettings, kw_only=True, forbid_unknown_fields=True):
    site: str
    cells: dict[str, CellSettings]
    cell_count: Positive
    # the accepted API tokens (cardcore.platform.auth.TokensFile: SHA-256 digests per client
    # kind), read again when it changes; relative to this settings file when not absolute
    api_tokens_file: str
    # one of the two: the key ring file ({"current": N, "keys": {"N": "<64 hex>", ...}}, relative
    # to this file when not absolute), or a single key (version 1)
    keys_file: str | None = None
    pan_key_hex: str | None = None
    host: str = "127.0.0.1"
    port: int = 8100
    # a TLS listener on ``host`` beside ``port``, for the gateway of the other center
    # (cardcore.platform.tls); its files are relative to this settings file when not absolute
    tls: TlsListen | None = None
    # the CA that https:// ``patroni_urls`` are verified with (relative to this file when not absolute)
    tls_ca_file: str | None = None
    slot_overrides: dict[int, int] = msgspec.field(default_factory=dict)
    hold_ttl_seconds: Positive = 7 * 24 * 3600
    batch_size_max: Annotated[int, msgspec.Meta(ge=1, le=4096)] = 256
    batch_wait_ms_max: Annotated[float, msgspec.Meta(ge=0, le=50)] = 1.0
    queue_depth_max: Annotated[int, msgspec.Meta(ge=1, le=100_000)] = 8192
    pool_size_max: Annotated[int, msgspec.Meta(ge=1, le=64)] = 8
    statement_timeout_ms: Positive = 5000
    connect_timeout_ms: Positive = 2000
    probe_interval_ms: Positive = 500
    catalogue_refresh_ms: Positive = 1000
    # card-not-present: this many wrong CVV2 or expiry dates in a row lock a card for online use
    cnp_failures_max: Annotated[int, msgspec.Meta(ge=1, le=100)] = 3
    cnp_lock_seconds: Annotated[int, msgspec.Meta(ge=1, le=30 * 24 * 3600)] = 1800
    # hostile clients: cardcore.platform.admission.ServeLimitSettings (its defaults are an app server's)

    def cell_numbers(self) -> list[int]:
        numbers = []
        for key in self.cells:
            if not key.isdigit() or not 1 <= int(key) <= self.cell_count:
                raise ValueError(f"cells: key {key!r} is not a cell number in 1..{self.cell_count}")
            numbers.append(int(key))
        return sorted(numbers)

    def pan_key(self) -> bytes:
        if self.pan_key_hex is None:
            raise ValueError("pan_key_hex: not set (the keys come from keys_file)")
        try:
            key = bytes.fromhex(self.pan_key_hex)
        except ValueError:
            raise ValueError("pan_key_hex: not hexadecimal") from None
        if len(key) != 32:
            raise ValueError("pan_key_hex: must be 64 hex characters (32 bytes)")
        return key

    def check_keys(self) -> None:
        if (self.keys_file is None) == (self.pan_key_hex is None):
            raise ValueError("give exactly one of keys_file (a key ring) and pan_key_hex (one key)")
        if self.pan_key_hex is not None:
            self.pan_key()


def load(path: str | Path) -> AppSettings:
    data = Path(path).read_bytes()
    try:
        settings = msgspec.json.decode(data, type=AppSettings)
    except msgspec.ValidationError as error:
        raise ValueError(f"{path}: {error}") from None
    settings.cell_numbers()
    settings.check_keys()
    here = Path(path).resolve().parent
    tokens = Path(settings.api_tokens_file)
    if not tokens.is_absolute():
        settings.api_tokens_file = str(here / tokens)
    auth.read_tokens_file(settings.api_tokens_file)  # a TokensFileError (ValueError) names it
    if settings.keys_file is not None:
        if not Path(settings.keys_file).is_absolute():
            settings.keys_file = str(here / settings.keys_file)
        read_key_ring(settings.keys_file)  # a KeyRingError (ValueError) names what is wrong
    for key, cell in settings.cells.items():
        for member, url in cell.patroni_urls.items():
            if is_tls(url) and settings.tls_ca_file is None:
                raise ValueError(
                    f"{path}: cells.{key}.patroni_urls.{member}: {url} is https:// and tls_ca_file is not set"
                )
    if settings.tls_ca_file is not None:
        settings.tls_ca_file = str(here / settings.tls_ca_file)
        client_context(settings.tls_ca_file)  # a ValueError names the file
    if settings.tls is not None:
        settings.tls.resolve(here)
        if settings.tls.port == settings.port:
            raise ValueError(f"{path}: tls.port {settings.tls.port} is the port served in clear")
        server_context(settings.tls.cert_file, settings.tls.key_file)  # a ValueError names the file
    return settings


def parse_key_ring(data: bytes, source: str) -> PanVault:
    try:
        document = msgspec.json.decode(data)
    except msgspec.DecodeError as error:
        raise KeyRingError(f"{source}: not JSON: {error}") from None
    if not isinstance(document, dict):
        raise KeyRingError(f'{source}: expected {{"current": N, "keys": {{...}}}}')
    try:
        return parse_ring(document)
    except KeyRingError as error:
        raise KeyRingError(f"{source}: {error}") from None


def read_key_ring(path: str) -> PanVault:
    try:
        data = Path(path).read_bytes()
    except OSError as error:
        raise KeyRingError(f"{path}: cannot read the key ring: {error.strerror or error}") from None
    return parse_key_ring(data, path)
