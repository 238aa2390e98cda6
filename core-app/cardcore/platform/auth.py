"""Who may call what: one bearer token per client kind, checked in constant time.

Owns: the client kind CONTRACT gives each request (``required_kind``: acquirer, channel or
operator; the three public probes need none), the accepted tokens (SHA-256 digests read from a
file that operators rewrite to rotate them, two or more per kind during a change, read again
when it changes), and the 401 / 403 answers. The gateways, the entry and the app servers all
check, so a request that reaches an app server across sites without passing a gateway is
refused there too.

Never: log, echo, store or put into a metric a presented token (only its kind, once known);
compare a token with ``==``; let a request through whose token it could not verify (a missing
or unreadable tokens file refuses to start, a bad rewrite keeps the last good set).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import secrets
from collections.abc import Iterable, Mapping
from typing import Annotated, Any

import msgspec

from cardcore.platform.watched import WatchedFile

log = logging.getLogger("cardcore.auth")

ACQUIRER = "acquirer"
CHANNEL = "channel"
OPERATOR = "operator"
KINDS = (ACQUIRER, CHANNEL, OPERATOR)
# a request to a path no route names: any valid token, and the server answers 404 / 405
ANY = "any"

TOKEN_BYTES_MAX = 512
TOKENS_PER_KIND_MAX = 4
POLL_S_DEFAULT = 1.0

PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/healthz"),
        ("HEAD", "/healthz"),
        ("GET", "/readyz"),
        ("HEAD", "/readyz"),
        ("GET", "/openapi.json"),
    }
)
# card networks' side: moving holds and postings for a card
_ACQUIRER_RESOURCES = frozenset({"authorizations", "clearing", "refunds"})
# the bank's own staff: the cycle, trial balance, prices, limits, tag definitions, metrics
_OPERATOR_RESOURCES = frozenset({"admin", "pricing"})


def required_kind(method: str, path: str) -> str | None:
    """The client kind a request needs (CONTRACT), ``ANY`` for a path no route has, None for the
    public probes (GET /healthz, /readyz, /openapi.json)."""
    if (method, path) in PUBLIC_ROUTES:
        return None
    if path == "/metrics":
        return OPERATOR
    parts = path.split("/")
    if len(parts) < 3 or parts[0] != "" or parts[1] != "v1" or not parts[2]:
        return ANY
    resource = parts[2]
    if resource in _ACQUIRER_RESOURCES:
        return ACQUIRER
    if resource in _OPERATOR_RESOURCES:
        return OPERATOR
    if resource == "tags" and len(parts) == 3:
        return OPERATOR  # POST /v1/tags: a tag definition
    if resource == "customers" and len(parts) >= 5 and parts[4] == "limits" and method != "GET":
        return OPERATOR  # setting a limit, permanent or temporary
    return CHANNEL


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe."""
    return secrets.token_urlsafe(32)


def digest(token: str | bytes) -> str:
    """What a server keeps of a token: its SHA-256, hex. Tokens are 256 random bits, so an
    unkeyed hash does not let anyone find them again."""
    raw = token.encode("utf-8") if isinstance(token, str) else token
    return hashlib.sha256(raw).hexdigest()


def digests_document(tokens: Mapping[str, Iterable[str]]) -> dict[str, list[str]]:
    """The tokens file a server reads, from every token each kind accepts (newest first)."""
    document = {kind: [digest(token) for token in tokens.get(kind, ())] for kind in KINDS}
    TokensFile(**document).check("tokens")
    return document


_HEX64 = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]


class TokensFile(msgspec.Struct, forbid_unknown_fields=True):
    """``{"acquirer": [sha256 hex, ...], "channel": [...], "operator": [...]}``."""

    acquirer: list[_HEX64]
    channel: list[_HEX64]
    operator: list[_HEX64]

    def check(self, source: str) -> None:
        seen: dict[str, str] = {}
        for kind in KINDS:
            values = getattr(self, kind)
            if not 1 <= len(values) <= TOKENS_PER_KIND_MAX:
                raise TokensFileError(
                    f"{source}: {kind}: needs 1..{TOKENS_PER_KIND_MAX} token digests, has {len(values)}"
                )
            for value in values:
                if value in seen and seen[value] != kind:
                    raise TokensFileError(f"{source}: one token is accepted as both {seen[value]} and {kind}")
                seen[value] = kind


class TokensFileError(ValueError):
    """The tokens file is missing, unreadable or malformed; the message names the file and key."""


_decode_tokens = msgspec.json.Decoder(TokensFile).decode


def parse_tokens(data: bytes, source: str) -> TokensFile:
    try:
        document = _decode_tokens(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as error:
        raise TokensFileError(f"{source}: {error}") from None
    document.check(source)
    return document


def read_tokens_file(path: str) -> TokensFile:
    try:
        with open(path, "rb") as handle:
            data = handle.read()
    except OSError as error:
        raise TokensFileError(f"{path}: cannot read the API tokens file: {error.strerror or error}") from None
    return parse_tokens(data, path)


class TokenRing:
    """The accepted tokens, as digests; ``kind_of`` compares with every one of them."""

    def __init__(self, document: TokensFile) -> None:
        self._entries = [(bytes.fromhex(value), kind) for kind in KINDS for value in getattr(document, kind)]

    def kind_of(self, token: bytes) -> str | None:
        """The kind whose token this is, or None. Constant time in the token (every digest is
        compared, no early exit)."""
        presented = hashlib.sha256(token).digest()
        found: str | None = None
        for accepted, kind in self._entries:
            if hmac.compare_digest(presented, accepted):
                found = kind
        return found

    def __len__(self) -> int:
        return len(self._entries)


UNAUTHORIZED = 401
FORBIDDEN = 403


class Refusal(msgspec.Struct):
    status: int
    code: str
    message: str

    def body(self) -> bytes:
        return msgspec.json.encode(
            {"error": {"code": self.code, "message": self.message, "field": "authorization"}}
        )

    def headers(self) -> list[tuple[bytes, bytes]]:
        if self.status == UNAUTHORIZED:
            return [(b"www-authenticate", b'Bearer realm="watertight"')]
        return []


_MISSING = Refusal(UNAUTHORIZED, "unauthorized", "this request needs an Authorization: Bearer <token> header")
_MALFORMED = Refusal(UNAUTHORIZED, "unauthorized", "the Authorization header is not Bearer <token>")
_UNKNOWN = Refusal(UNAUTHORIZED, "unauthorized", "the bearer token is not valid")


def bearer_token(headers: Iterable[tuple[bytes, bytes]]) -> bytes | Refusal | None:
    """The token of an ASGI header list: None when there is no Authorization header, a Refusal
    when it is not ``Bearer <token>``."""
    value: bytes | None = None
    for name, raw in headers:
        if name == b"authorization":
            if value is not None:
                return _MALFORMED  # two of them: refuse rather than guess which one counts
            value = bytes(raw)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    token = token.strip()
    if scheme.lower() != b"bearer" or not token or len(token) > TOKEN_BYTES_MAX or b" " in token:
        return _MALFORMED
    return token


class AccessControl:
    """The tokens file of one server, watched for changes, and the check of each request."""

    def __init__(self, path: str, poll_s: float = POLL_S_DEFAULT) -> None:
        # raises TokensFileError: the server refuses to start without its tokens
        self._file = WatchedFile(path, lambda data: TokenRing(parse_tokens(data, path)), "API tokens", poll_s)

    @property
    def ring(self) -> TokenRing:
        return self._file.value

    def refresh(self) -> None:
        self._file.refresh()

    async def start(self) -> None:
        await self._file.start()

    async def stop(self) -> None:
        await self._file.stop()

    def check(self, method: str, path: str, headers: Iterable[tuple[bytes, bytes]]) -> Refusal | None:
        """None when the request may go on; else the answer it gets (nothing read, nothing written)."""
        needed = required_kind(method, path)
        if needed is None:
            return None
        token = bearer_token(headers)
        if token is None:
            return _MISSING
        if isinstance(token, Refusal):
            return token
        kind = self.ring.kind_of(token)
        if kind is None:
            return _UNKNOWN
        if needed != ANY and kind != needed:
            return Refusal(
                FORBIDDEN,
                "forbidden",
                f"{method} {_template_hint(path)} is for {needed} clients; this token is a {kind}'s",
            )
        return None


def _template_hint(path: str) -> str:
    """The first two segments of a path: enough to say which route, without echoing ids."""
    parts = [part for part in path.split("/") if part][:2]
    return "/" + "/".join(parts) + ("/..." if len(path.strip("/").split("/")) > 2 else "")


class ClientTokens:
    """The client side: one token per kind, and the header each request needs (the toolkit's
    clients, the drill, bench and the tests send every request with the token of its route)."""

    def __init__(self, tokens: Mapping[str, str]) -> None:
        missing = [kind for kind in KINDS if not tokens.get(kind)]
        if missing:
            raise ValueError(f"api_tokens: no token for {', '.join(missing)}")
        self.tokens = {kind: str(tokens[kind]) for kind in KINDS}

    @classmethod
    def from_secrets(cls, document: Mapping[str, Any]) -> ClientTokens:
        """From a secrets file's document: its ``api_tokens`` (CONTRACT)."""
        tokens = document.get("api_tokens")
        if not isinstance(tokens, Mapping):
            raise ValueError("the secrets file has no api_tokens")
        return cls(tokens)

    def kind_for(self, method: str, path: str) -> str | None:
        needed = required_kind(method, path.split("?", 1)[0])
        return CHANNEL if needed == ANY else needed

    def header_value(self, method: str, path: str) -> str | None:
        """``Bearer <token>`` for this request, None for the public probes."""
        kind = self.kind_for(method, path)
        return None if kind is None else f"Bearer {self.tokens[kind]}"

    def headers(self, method: str, path: str) -> dict[str, str]:
        value = self.header_value(method, path)
        return {} if value is None else {"authorization": value}

    def raw_headers(self, method: str, path: str) -> list[tuple[bytes, bytes]]:
        value = self.header_value(method, path)
        return [] if value is None else [(b"authorization", value.encode("ascii"))]

    def __repr__(self) -> str:  # never the tokens themselves
        return "ClientTokens(acquirer, channel, operator)"
