"""Schemathesis hooks for the suite's run against a real stack (tests/test_openapi_fuzzing.py):
every request gets the bearer token its route needs, from the tokens file the run names in
$WATERTIGHT_API_TOKENS, unless the case carries an Authorization header already (so its own
auth checks, which remove or spoil the header, stay theirs)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import schemathesis
from cardcore.platform.auth import ClientTokens

_TOKENS = ClientTokens.from_secrets(json.loads(Path(os.environ["WATERTIGHT_API_TOKENS"]).read_text()))


@schemathesis.hook
def before_call(context: Any, case: Any, kwargs: dict[str, Any]) -> None:
    if kwargs.get("headers") is None:
        kwargs["headers"] = {}
    headers = kwargs["headers"]
    if any(name.lower() == "authorization" for name in (case.headers or {})) or any(
        name.lower() == "authorization" for name in headers
    ):
        return
    value = _TOKENS.header_value(case.method.upper(), case.formatted_path)
    if value is not None:
        headers["Authorization"] = value
