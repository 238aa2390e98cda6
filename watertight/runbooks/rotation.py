"""Rotations on the local target without downtime: the API tokens, and the keys of card data.

API tokens, in two phases.

``begin``: a new token per client kind is made and accepted first (``api_tokens_next``: every app
server, gateway and the entry reads its tokens file again by itself, no restart; the step waits
until each running one accepts it), and only then handed out (``api_tokens`` of the secrets file)
while the old one stays accepted (``api_tokens_previous``). So no client is ever given a token a
server would refuse. Clients move over at their own pace (Locust, the drill and bench read the
secrets file when they start). ``finish``: the old tokens are no longer accepted; the step waits
until every running server refuses them.

Keys of card and identity data (``rotate_keys``): a new master key version is added to the ring
and every running app server is waited for until it knows it; only then is it made current (new
cards, national ids and idempotency digests under it), again waited for; then every cell's cards
and customers under older versions are rewrapped through the entry (``POST
/v1/admin/keys/rewrap?cell=N``, a bounded batch per call) until none is left. The old versions stay
in the ring: the CVV2 of a card issued under one is derived under it for the card's life, and
idempotency records made under one are compared under it until they expire. A run that finds a
rotation unfinished (a version not current yet, or rows left to rewrap) finishes it instead of
starting another.

Owns: the phases, their check mode and their bounded waits. Never: print a token or a key, restart
a server, retire the old tokens before a ``begin`` made new ones (a second ``begin`` while one is
under way changes nothing), or make a key current before every running app server knows it.
"""

from __future__ import annotations

import json
import secrets as secrets_module
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from cardcore.platform import auth

from watertight import render
from watertight.monitoring import config as monitoring_config
from watertight.runbooks.ops import StepError
from watertight.runtime.local import LocalRuntime, RuntimeError_, http_json

APPLY_TIMEOUT_S = 30.0
REWRAP_TIMEOUT_S = 600.0
REWRAP_BATCH_ROWS = 500
POLL_S = 0.2
SERVERS = ("app", "gateway", "entry")

Result = dict[str, Any]


def _runtime(run_dir: str) -> LocalRuntime:
    try:
        return LocalRuntime(Path(run_dir))
    except RuntimeError_ as error:
        raise StepError(str(error)) from None


def _answers(url: str, token: str) -> int:
    """The status a server gives a request that needs the operator's token (its /metrics, which
    answers without a database); 0 when nothing answered."""
    request = urllib.request.Request(url, headers={"authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=2.0) as response:
            response.read()
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0


def _wait_servers(runtime: LocalRuntime, token: str, accepted: bool) -> tuple[float, list[str]]:
    """Until every running server accepts (or refuses) ``token``; (seconds, servers checked)."""
    started = time.monotonic()
    servers = [
        c
        for c in runtime.components
        if c.kind in SERVERS and runtime.expected(c) and runtime.running(c) and c.ready_url
    ]
    pending = {c.name: (c.ready_url or "").rsplit("/", 1)[0] + "/metrics" for c in servers}
    while pending:
        for name, url in list(pending.items()):
            status = _answers(url, token)
            if (accepted and status == 200) or (not accepted and status == 401):
                del pending[name]
        if not pending:
            break
        if time.monotonic() - started > APPLY_TIMEOUT_S:
            raise StepError(
                f"{', '.join(sorted(pending))} did not {'accept the new' if accepted else 'refuse the old'} "
                f"API tokens within {APPLY_TIMEOUT_S:.0f} s; read their logs in {runtime.run_dir / 'logs'}"
            )
        time.sleep(POLL_S)
    return round(time.monotonic() - started, 2), sorted(c.name for c in servers)


def rotate_api_tokens(run_dir: str, phase: str = "begin", check: bool = False) -> Result:
    """One phase of the rotation (see the module docstring)."""
    if phase not in ("begin", "finish"):
        raise StepError(f"phase must be begin or finish; got {phase!r}")
    runtime = _runtime(run_dir)
    secrets = runtime.read_secrets()
    under_way = bool(secrets.get(render.SECRET_API_TOKENS_PREVIOUS))
    if phase == "begin":
        if under_way:
            return {
                "changed": False,
                "msg": "a rotation is under way already (the previous tokens are still accepted); "
                "run phase=finish once every client uses the new ones",
                "seconds": 0.0,
            }
        if check:
            return {
                "changed": True,
                "msg": "would hand out a new token per client kind and keep the current ones accepted",
                "seconds": 0.0,
            }
        # accepted everywhere first (a begin interrupted here is taken up again with the same tokens)
        upcoming = secrets.setdefault(
            render.SECRET_API_TOKENS_NEXT, {kind: auth.new_token() for kind in auth.KINDS}
        )
        runtime.write_secrets(secrets)
        rewritten = runtime.rewrite_files([render.API_TOKENS_FILE], SERVERS)
        seconds, servers = _wait_servers(runtime, upcoming[auth.OPERATOR], True)
        # then handed out
        secrets[render.SECRET_API_TOKENS_PREVIOUS] = dict(secrets[render.SECRET_API_TOKENS])
        secrets[render.SECRET_API_TOKENS] = secrets.pop(render.SECRET_API_TOKENS_NEXT)
        runtime.write_secrets(secrets)
        runtime.rewrite_files([render.API_TOKENS_FILE], SERVERS)
        # Prometheus reads its token file at every scrape: it scrapes with the new token at once
        runtime.rewrite_files([monitoring_config.TOKEN_FILE], [monitoring_config.PROMETHEUS])
        return {
            "changed": True,
            "msg": f"new API tokens handed out in {runtime.secrets_path}; the previous ones stay accepted; "
            f"{len(servers)} running servers accept both (files rewritten for {len(rewritten)})",
            "seconds": seconds,
            "servers": servers,
        }
    if not under_way:
        return {
            "changed": False,
            "msg": "no rotation under way: only the current tokens are accepted",
            "seconds": 0.0,
        }
    if check:
        return {"changed": True, "msg": "would stop accepting the previous API tokens", "seconds": 0.0}
    retired = secrets.pop(render.SECRET_API_TOKENS_PREVIOUS)
    runtime.write_secrets(secrets)
    runtime.rewrite_files([render.API_TOKENS_FILE], SERVERS)
    seconds, servers = _wait_servers(runtime, retired[auth.OPERATOR], False)
    return {
        "changed": True,
        "msg": f"the previous API tokens are retired: {len(servers)} running servers refuse them",
        "seconds": seconds,
        "servers": servers,
    }


def _running_apps(runtime: LocalRuntime) -> list[Any]:
    return [c for c in runtime.components if c.kind == "app" and runtime.expected(c) and runtime.running(c)]


def _wait_apps_know(runtime: LocalRuntime, version: int, as_current: bool) -> float:
    """Until every running app server's /readyz lists ``version`` (as its current one)."""
    started = time.monotonic()
    apps = _running_apps(runtime)
    if not apps:
        raise StepError("no app server runs: nothing can rewrap; run `watertight up` first")
    pending = {c.name: c.ready_url or "" for c in apps}
    while pending:
        for name, url in list(pending.items()):
            keys = (http_json(url, timeout_s=2.0)[1] or {}).get("keys") or {}
            if (keys.get("current") == version) if as_current else (version in (keys.get("versions") or [])):
                del pending[name]
        if not pending:
            break
        if time.monotonic() - started > APPLY_TIMEOUT_S:
            what = f"make key version {version} current" if as_current else f"learn key version {version}"
            raise StepError(
                f"{', '.join(sorted(pending))} did not {what} within {APPLY_TIMEOUT_S:.0f} s; "
                f"read their logs in {runtime.run_dir / 'logs'}"
            )
        time.sleep(POLL_S)
    return time.monotonic() - started


def _admin(runtime: LocalRuntime, method: str, path: str, body: Any = None) -> dict[str, Any]:
    """One operator request through the entry; StepError unless it answers 200."""
    headers = {"content-type": "application/json", **runtime.client_tokens().headers(method, path)}
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        runtime.topology.entry_url + path, data=data, method=method, headers=headers
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            answer: dict[str, Any] = json.loads(response.read())
            return answer
    except urllib.error.HTTPError as error:
        raise StepError(f"{method} {path}: {error.code} {error.read()[:300]!r}") from None
    except OSError as error:
        raise StepError(f"{method} {path}: the entry did not answer: {error}") from None


def _left_to_rewrap(runtime: LocalRuntime) -> dict[int, int]:
    left = {}
    for cell in runtime.topology.cell_numbers:
        remaining = _admin(runtime, "GET", f"/v1/admin/keys?cell={cell}")["remaining"]
        left[cell] = int(remaining["cards"]) + int(remaining["customers"])
    return left


def rotate_keys(run_dir: str, check: bool = False) -> Result:
    """Rotate (or finish rotating) the master key of card and identity data; see the module docstring."""
    runtime = _runtime(run_dir)
    started = time.monotonic()
    secrets = runtime.read_secrets()
    ring = secrets[render.SECRET_KEY_RING]
    keys = {int(version): key for version, key in ring["keys"].items()}
    current, newest = int(ring["current"]), max(keys)
    left = _left_to_rewrap(runtime) if newest == current else {}
    starting = newest == current and not any(left.values())
    target = newest + 1 if starting else newest
    if check:
        what = (
            f"would add key version {target}, make it current and rewrap every cell"
            if starting
            else f"would finish the rotation to key version {target} (rows left: {left or 'not counted yet'})"
        )
        return {"changed": True, "msg": what, "seconds": 0.0}
    if starting:
        keys[target] = secrets_module.token_hex(32)
        secrets[render.SECRET_KEY_RING] = {"current": current, "keys": {str(v): k for v, k in keys.items()}}
        runtime.write_secrets(secrets)
        runtime.rewrite_files([render.KEY_RING_FILE], ["app"])
    # known everywhere before anything is written under it
    _wait_apps_know(runtime, target, as_current=False)
    if current != target:
        secrets[render.SECRET_KEY_RING] = {"current": target, "keys": {str(v): k for v, k in keys.items()}}
        runtime.write_secrets(secrets)
        runtime.rewrite_files([render.KEY_RING_FILE], ["app"])
    _wait_apps_know(runtime, target, as_current=True)
    rewrapped = {"cards": 0, "customers": 0}
    deadline = time.monotonic() + REWRAP_TIMEOUT_S
    for cell in runtime.topology.cell_numbers:
        while True:
            answer = _admin(
                runtime, "POST", f"/v1/admin/keys/rewrap?cell={cell}", {"limit": REWRAP_BATCH_ROWS}
            )
            rewrapped["cards"] += int(answer["rewrapped"]["cards"])
            rewrapped["customers"] += int(answer["rewrapped"]["customers"])
            if not answer["remaining"]["cards"] and not answer["remaining"]["customers"]:
                break
            if time.monotonic() > deadline:
                raise StepError(
                    f"cell {cell}: rows still under older keys after {REWRAP_TIMEOUT_S:.0f} s "
                    f"({answer['remaining']}); run the runbook again to go on"
                )
    return {
        "changed": True,
        "msg": f"key version {target} is current; rewrapped {rewrapped['cards']} cards and "
        f"{rewrapped['customers']} customers; versions {sorted(keys)} stay in the ring (CVV2s and "
        "idempotency records made under them)",
        "seconds": round(time.monotonic() - started, 2),
        "version": target,
        "rewrapped": rewrapped,
    }


STEPS = {"rotate_api_tokens": rotate_api_tokens, "rotate_keys": rotate_keys}
