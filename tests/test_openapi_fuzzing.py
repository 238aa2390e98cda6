"""The OpenAPI description is exact: schemathesis, every check and its stateful phase, against a
running gateway and app server on a real PostgreSQL. No 5xx, no answer the description does not
allow (status, content type, headers such as Allow on 405 and WWW-Authenticate on 401), no bad
input accepted, no good input refused, no request without a token let through."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.fixtures_core import CoreStack

ST = Path(sys.executable).parent / "st"
CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES_PER_OPERATION = 5
SEED = 1616


@pytest.mark.timeout(1600)
def test_schemathesis_finds_nothing_with_every_check_and_its_stateful_phase(
    core_factory: Callable[[], CoreStack], tmp_path: Path
) -> None:
    stack = core_factory()
    app = stack.start_app([1, 2])
    stack.start_gateway({1: [app.url], 2: [app.url]})
    env = {
        **os.environ,
        "WATERTIGHT_API_TOKENS": str(stack.secrets_file),
        "SCHEMATHESIS_HOOKS": "tests.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    log = Path(os.environ.get("WATERTIGHT_ST_LOG", tmp_path / "schemathesis.log"))
    result = subprocess.run(
        [str(ST), "--config-file", str(CONFIG), "run", f"{stack.url}/openapi.json", "--checks", "all",
         "--phases", "examples,coverage,fuzzing,stateful", "--max-examples", str(EXAMPLES_PER_OPERATION),
         "--seed", str(SEED), "--workers", "1", "--request-timeout", "20", "--no-color",
         "--report", "junit", "--report-dir", str(tmp_path)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, timeout=1500, env=env, check=False, cwd=tmp_path,
    )  # fmt: skip
    output = log.read_text()
    print(output[-6000:])
    assert result.returncode == 0, output[-12000:]
