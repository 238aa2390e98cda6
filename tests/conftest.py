"""Shared fixtures: each family lives in its own module and is registered here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

pytest_plugins = ["tests.fixtures_pg", "tests.fixtures_core"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.fixture(autouse=True)
def _process_umask_kept(request: pytest.FixtureRequest) -> Iterator[None]:
    """Something a test calls once left the process umask at 077, and every later topology made
    directories PostgreSQL's user could not enter: put it back, and say which test changed it."""
    before = _umask()
    yield
    after = _umask()
    if after != before:
        os.umask(before)
        warnings.warn(f"{request.node.nodeid} changed the umask from {before:o} to {after:o}", stacklevel=1)
