"""Schemathesis auth for the suite's run against a real stack (tests/test_openapi_fuzzing.py):
every request it generates carries the bearer token its route needs, from the tokens file the
run names in $WATERTIGHT_API_TOKENS. As an auth provider (not a hook), so schemathesis knows the
credentials are its own and its checks can take them away or spoil them (401 expected)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import schemathesis
from cardcore.platform.auth import ClientTokens


@schemathesis.auth()
class RouteToken:
    def get(self, case: Any, ctx: Any) -> ClientTokens:
        return ClientTokens.from_secrets(json.loads(Path(os.environ["WATERTIGHT_API_TOKENS"]).read_text()))

    def set(self, case: Any, data: ClientTokens, ctx: Any) -> None:
        value = data.header_value(case.method.upper(), case.formatted_path)
        if value is not None:
            case.headers = {**(case.headers or {}), "Authorization": value}
