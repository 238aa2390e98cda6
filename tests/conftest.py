"""Shared fixtures: each family lives in its own module and is registered here."""

pytest_plugins = ["tests.fixtures_pg", "tests.fixtures_core"]
