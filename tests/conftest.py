"""Shared fixtures: each family lives in its own module and is registered here."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterator

import pytest

from tests import api_auth

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


def _register_runtime_urls() -> None:
    """Every LocalRuntime a test makes: its entry, gateways and app servers answer with the tokens
    of its run directory (tests.api_auth)."""
    from watertight import render
    from watertight.runtime.local import LocalRuntime

    original = LocalRuntime.__init__

    def patched(self: LocalRuntime, *args: object, **kwargs: object) -> None:
        original(self, *args, **kwargs)  # type: ignore[arg-type]
        endpoints = render.LocalEndpoints(self.topology)
        urls = [self.topology.entry_url]
        urls += [endpoints.gateway_url(site) for site in self.topology.sites]
        urls += [endpoints.app_url(site) for site in self.topology.sites]
        run_dir = self.run_dir
        for url in urls:
            api_auth.register(url, lambda run_dir=run_dir: api_auth.of_run(run_dir))

    LocalRuntime.__init__ = patched  # type: ignore[method-assign]


api_auth.install()
_register_runtime_urls()
