"""API tokens for the tests' HTTP clients: every request gets the token its route needs.

The core refuses a request without ``Authorization: Bearer <token>`` of the client kind its
route belongs to (CONTRACT). So that tests need not think about it, every httpx client the
suite makes (``httpx.Client``, ``httpx.AsyncClient``, ``httpx.get`` ...) gets ``RouteTokenAuth``
unless the test makes the client with an ``auth`` of its own (``install``, called by conftest,
adds a request hook): the hook adds the token the route needs, looked up by the request's host
and port among the servers the suite started (``register``: the stacks of fixtures_core and every
``LocalRuntime``, whose topology's URLs conftest registers), unless the request carries an
Authorization header already. A test that wants no credentials makes its client with
``auth=ANONYMOUS`` (``httpx.get(..., auth=ANONYMOUS)`` is not enough: the module-level functions
make a client of their own) or sets the header itself.
"""

from __future__ import annotations

import json
import secrets
import threading
from collections.abc import Callable, Generator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from cardcore.platform import auth

TokensOf = Callable[[], auth.ClientTokens]
_registry: dict[str, TokensOf] = {}
_lock = threading.Lock()


def _key(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}"


def register(url: str, tokens: TokensOf) -> None:
    """Requests to ``url``'s host and port get the tokens ``tokens()`` gives (called per request,
    so a rotation is seen)."""
    with _lock:
        _registry[_key(url)] = tokens


def tokens_for(url: str) -> auth.ClientTokens | None:
    with _lock:
        found = _registry.get(_key(url))
    return found() if found is not None else None


class RouteTokenAuth(httpx.Auth):
    """The token of the route's client kind; ``tokens`` fixed, or (None) found by the URL."""

    def __init__(self, tokens: auth.ClientTokens | None = None) -> None:
        self.tokens = tokens

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        if "authorization" not in request.headers:
            tokens = self.tokens or tokens_for(str(request.url))
            if tokens is not None:
                value = tokens.header_value(request.method, request.url.path)
                if value is not None:
                    request.headers["authorization"] = value
        yield request


class _Anonymous(httpx.Auth):
    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        yield request


ANONYMOUS = _Anonymous()
_installed = False


def _add_token(request: httpx.Request) -> None:
    if "authorization" in request.headers:
        return
    tokens = tokens_for(str(request.url))
    if tokens is not None:
        value = tokens.header_value(request.method, request.url.path)
        if value is not None:
            request.headers["authorization"] = value


async def _add_token_async(request: httpx.Request) -> None:
    _add_token(request)


def install() -> None:
    """Every httpx client made without an ``auth`` sends the route's token (once per process)."""
    global _installed
    if _installed:
        return
    _installed = True
    for cls, hook in ((httpx.Client, _add_token), (httpx.AsyncClient, _add_token_async)):
        original = cls.__init__

        def patched(
            self: Any, *args: Any, __original: Any = original, __hook: Any = hook, **kwargs: Any
        ) -> None:
            if kwargs.get("auth") is None:
                hooks = dict(kwargs.get("event_hooks") or {})
                hooks["request"] = [__hook, *hooks.get("request", [])]
                kwargs["event_hooks"] = hooks
            __original(self, *args, **kwargs)

        cls.__init__ = patched  # type: ignore[method-assign]


def new_tokens() -> dict[str, str]:
    return {kind: auth.new_token() for kind in auth.KINDS}


def write_tokens_file(path: Path, accepted: dict[str, list[str]]) -> Path:
    """A server's tokens file (digests) accepting ``accepted`` tokens per kind."""
    path.touch(mode=0o600)
    path.write_text(json.dumps(auth.digests_document(accepted)))
    return path


def of_run(run_dir: Path) -> auth.ClientTokens:
    """The tokens of a local topology's run directory (its secrets file)."""
    return auth.ClientTokens.from_secrets(json.loads((Path(run_dir) / "secrets.json").read_text()))


def bad_token() -> str:
    return secrets.token_urlsafe(32)
