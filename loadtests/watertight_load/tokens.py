"""The API tokens of the card traffic: which client kind each route belongs to, and its header.

Owns: reading the tokens file (``--api-tokens``: a JSON document whose ``api_tokens`` holds one
token per client kind, as ``watertight up`` writes its secrets file, or a Kubernetes Secret
mounted as a file), and the ``Authorization`` header of each route the traffic sends: the card
network's side (authorizations, clearing, reversals, refunds) as the acquirer, the customers'
side (applications, cards, balances, repayments, installments) as the channel.
Never: log or print a token, or send one of the wrong kind (the core answers 403 and counts it).
"""

from __future__ import annotations

import json
from pathlib import Path

ACQUIRER = "acquirer"
CHANNEL = "channel"
OPERATOR = "operator"
KINDS = (ACQUIRER, CHANNEL, OPERATOR)
ENV_TOKENS_FILE = "WATERTIGHT_API_TOKENS"

# the routes of the card network's side (CONTRACT: authorizations, reversals, clearing, refunds)
_ACQUIRER_PREFIXES = ("/v1/authorizations", "/v1/clearing", "/v1/refunds")
_OPERATOR_PREFIXES = ("/v1/admin/", "/v1/pricing/", "/metrics")


class TokensError(ValueError):
    """The tokens file is missing or incomplete; the message names it (never a token)."""


def client_kind(route: str) -> str:
    """The client kind of a route template the traffic sends (all of them acquirer or channel)."""
    if route.startswith(_ACQUIRER_PREFIXES):
        return ACQUIRER
    if route.startswith(_OPERATOR_PREFIXES):
        return OPERATOR
    return CHANNEL


class Tokens:
    def __init__(self, tokens: dict[str, str]) -> None:
        missing = [kind for kind in KINDS if not tokens.get(kind)]
        if missing:
            raise TokensError(f"api_tokens: no token for {', '.join(missing)}")
        self._headers = {kind: {"authorization": f"Bearer {tokens[kind]}"} for kind in KINDS}

    @classmethod
    def load(cls, path: str | Path) -> Tokens:
        try:
            document = json.loads(Path(path).read_text())
        except (OSError, ValueError) as error:
            raise TokensError(f"cannot read the API tokens file {path}: {error}") from None
        tokens = document.get("api_tokens") if isinstance(document, dict) else None
        if not isinstance(tokens, dict):
            raise TokensError(f"{path}: no api_tokens in it")
        return cls({str(kind): str(value) for kind, value in tokens.items()})

    def headers(self, route: str) -> dict[str, str]:
        """The Authorization header of a request to ``route`` (a template or a path)."""
        return self._headers[client_kind(route)]

    def __repr__(self) -> str:
        return "Tokens(acquirer, channel, operator)"
