"""core-app/Containerfile, read without a container engine (there is none here): everything it
copies exists and is let through .dockerignore, and the versions it pins satisfy what the
distributions it installs ask for, so a build cannot drift from what the test suite ran."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parent.parent
CONTAINERFILE = REPO / "core-app" / "Containerfile"


def stages() -> dict[str, str]:
    """The text of each stage, by name."""
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    found: dict[str, str] = {}
    name = ""
    for line in text.splitlines():
        match = re.match(r"FROM\s+\S+\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            name = match.group(1)
        found[name] = found.get(name, "") + line + "\n"
    return found


def let_through(path: str) -> bool:
    """Whether .dockerignore (an allow-list after ``*``) sends ``path`` into the build context."""
    allowed = False
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        negate = line.startswith("!")
        pattern = line.lstrip("!").rstrip("/")
        if fnmatch.fnmatch(path, pattern) or path.startswith(pattern + "/"):
            allowed = negate
    return allowed


def pins(stage: str) -> dict[str, str]:
    return {
        name.lower(): version
        for name, version in re.findall(r'"([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^"]+)"', stage)
    }


def test_every_copied_path_exists_and_is_in_the_build_context() -> None:
    copies = re.findall(r"^COPY\s+(\S+)\s+\S+", CONTAINERFILE.read_text(), re.MULTILINE)
    assert copies, "the Containerfile copies the sources in"
    for source in copies:
        assert (REPO / source).exists(), f"COPY {source}: no such path in the repository"
        assert let_through(source), f"COPY {source}: .dockerignore keeps it out of the build context"


def test_the_allow_list_keeps_the_rest_out() -> None:
    assert not let_through("run/cell1/pgdata")
    assert not let_through(".venv/bin/python")
    assert let_through("core-app/cardcore/app.py")


@pytest.mark.parametrize(
    ("stage", "pyproject", "names"),
    [
        ("core", "core-app/pyproject.toml", None),
        ("locust", "pyproject.toml", {"locust"}),
        ("patroni", "pyproject.toml", {"patroni", "psycopg"}),
    ],
)
def test_the_pinned_versions_satisfy_the_distribution(
    stage: str, pyproject: str, names: set[str] | None
) -> None:
    pinned = pins(stages()[stage])
    requirements = [
        Requirement(r) for r in tomllib.loads((REPO / pyproject).read_text())["project"]["dependencies"]
    ]
    checked = 0
    for requirement in requirements:
        name = requirement.name.lower()
        if names is not None and name not in names:
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"sys_platform": "linux"}):
            continue
        assert name in pinned, f"the {stage} image does not pin {name}, which {pyproject} requires"
        assert requirement.specifier.contains(pinned[name]), (
            f"the {stage} image pins {name}=={pinned[name]}, outside {requirement.specifier} of {pyproject}"
        )
        checked += 1
    assert checked == (len(names) if names is not None else len(requirements))
