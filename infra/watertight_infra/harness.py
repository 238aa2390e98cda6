"""Run the program under Pulumi's mocks (no Pulumi CLI, no cluster) and collect what it declares:
every resource with its type, name, parent, provider and inputs. The tests and the snapshots
(``python -m watertight_infra.harness``) use it.

Owns: reading a stack file's ``watertight:`` config the way the Pulumi engine hands it to the
program, placeholder values for its secrets, and the plan as plain data. Never: contact a
cluster or decrypt a secret.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pulumi
import yaml
from pulumi.runtime import mocks as pulumi_mocks
from pulumi.runtime import settings as pulumi_settings

from watertight_infra.settings import INFRA_DIR, PROJECT

SNAPSHOT_DIR = INFRA_DIR / "snapshots"
SECRET_SIGNATURE = "4dabf18193072939515e22adb298388d"  # Pulumi's marker of a secret value on the wire
SECRET_SHOWN = "[secret]"
PROVIDER_TYPE = "pulumi:providers:kubernetes"
# stand-ins for `pulumi config set --secret`; each is distinctive so a leak is easy to find
MOCK_SECRETS = {
    "superuserPassword": "mock-superuser-password-7Qx",
    "replicationPassword": "mock-replication-password-9Kz",
    "panKeyHex": "0f" * 32,
    "apiTokens": '{"acquirer": "mock-acquirer-token-4Rw", "channel": "mock-channel-token-8Tn",'
    ' "operator": "mock-operator-token-2Gd"}',
}


def stack_file(stack: str) -> Path:
    return INFRA_DIR / f"Pulumi.{stack}.yaml"


def stack_names() -> list[str]:
    """Every stack that has a stack file in infra/."""
    return sorted(path.name[len("Pulumi.") : -len(".yaml")] for path in INFRA_DIR.glob("Pulumi.*.yaml"))


def stack_config(stack: str) -> dict[str, Any]:
    """The ``watertight:`` keys of a stack file (decoded YAML values, without the prefix)."""
    document = yaml.safe_load(stack_file(stack).read_text(encoding="utf-8")) or {}
    found: dict[str, Any] = {}
    for key, value in (document.get("config") or {}).items():
        namespace, _, name = str(key).partition(":")
        if namespace == PROJECT:
            found[name] = value
    return found


def engine_config(values: Mapping[str, Any], secrets: Mapping[str, str]) -> tuple[dict[str, str], list[str]]:
    """What the engine passes the program: ``project:key`` -> string (JSON for structured values)."""
    config: dict[str, str] = {}
    for name, value in values.items():
        if isinstance(value, Mapping) and "secure" in value:
            continue  # encrypted in the file; the mocks use MOCK_SECRETS instead
        config[f"{PROJECT}:{name}"] = value if isinstance(value, str) else json.dumps(value)
    for name, value in secrets.items():
        config[f"{PROJECT}:{name}"] = value
    return config, [f"{PROJECT}:{name}" for name in secrets]


@dataclass
class Declared:
    """One resource the program declared."""

    urn: str
    type: str
    name: str
    parent: str
    provider: str | None  # the URN of its provider (custom resources)
    custom: bool
    inputs: dict[str, Any]
    secret_paths: list[str] = field(default_factory=list)

    @property
    def is_kubernetes(self) -> bool:
        return self.custom and self.type.startswith("kubernetes:")

    @property
    def kind(self) -> str:
        return str(self.inputs.get("kind", ""))

    @property
    def metadata(self) -> dict[str, Any]:
        value = self.inputs.get("metadata") or {}
        return value if isinstance(value, dict) else {}

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.get("labels") or {})


@dataclass
class Run:
    stack: str
    resources: list[Declared]
    outputs: dict[str, Any]

    def kubernetes(self) -> list[Declared]:
        return [r for r in self.resources if r.is_kubernetes]

    def of_kind(self, kind: str) -> list[Declared]:
        return [r for r in self.kubernetes() if r.kind == kind]

    def providers(self) -> list[Declared]:
        return [r for r in self.resources if r.type == PROVIDER_TYPE]

    def by_urn(self) -> dict[str, Declared]:
        return {r.urn: r for r in self.resources}


def plain(value: Any, path: str, secret_paths: list[str]) -> Any:
    """Inputs as the API server would get them: secrets unwrapped (their paths noted), whole
    floats back to integers (the wire has only doubles)."""
    if isinstance(value, dict):
        if value.get(SECRET_SIGNATURE) is not None and "value" in value:
            secret_paths.append(path)
            return plain(value["value"], path, secret_paths)
        return {k: plain(v, f"{path}.{k}" if path else k, secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [plain(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class _Mocks(pulumi.runtime.Mocks):
    def new_resource(self, args: pulumi.runtime.MockResourceArgs) -> tuple[str | None, dict[Any, Any]]:
        return f"{args.name}-id", dict(args.inputs)

    def call(self, args: pulumi.runtime.MockCallArgs) -> tuple[dict[Any, Any], list[tuple[str, str]] | None]:
        return {}, None


class _Monitor(pulumi_mocks.MockMonitor):
    """The mock monitor, also noting each registration's parent and provider."""

    def __init__(self, mocks: pulumi.runtime.Mocks) -> None:
        super().__init__(mocks)
        self.declared: list[Declared] = []

    def RegisterResource(self, request: Any) -> Any:
        response = super().RegisterResource(request)
        if request.type != "pulumi:pulumi:Stack":
            secret_paths: list[str] = []
            inputs = plain(pulumi_mocks.rpc.deserialize_properties(request.object), "", secret_paths)
            provider = request.provider.rsplit("::", 1)[0] if request.provider else None
            self.declared.append(
                Declared(
                    urn=response.urn,
                    type=request.type,
                    name=request.name,
                    parent=request.parent,
                    provider=provider,
                    custom=bool(request.custom),
                    inputs=inputs,
                    secret_paths=secret_paths,
                )
            )
        return response


def run(
    stack: str,
    overrides: Mapping[str, Any] | None = None,
    secrets: Mapping[str, str] | None = None,
) -> Run:
    """Run the program for ``stack`` (its stack file, then ``overrides`` of top-level keys)."""
    from watertight_infra import program  # imported late: it reads nothing at import

    # pulumi's mocks run on the thread's current event loop: a test before may have left none
    # (asyncio.run closes its loop and unsets it)
    asyncio.set_event_loop(asyncio.new_event_loop())
    values = {**stack_config(stack), **(overrides or {})}
    config, secret_keys = engine_config(values, MOCK_SECRETS if secrets is None else secrets)
    pulumi.runtime.set_all_config(config, secret_keys)
    pulumi_settings.ROOT.set(None)
    monitor = _Monitor(_Mocks())
    pulumi.runtime.set_mocks(monitor.mocks, project=PROJECT, stack=stack, preview=False, monitor=monitor)
    outputs: dict[str, Any] = {}

    @pulumi.runtime.test
    def declare() -> None:
        outputs.update(program.main())

    declare()
    return Run(stack, monitor.declared, outputs)


def snapshot(result: Run) -> dict[str, Any]:
    """The plan of a stack for a reviewer: outputs, then every resource with its inputs, secrets
    shown as ``[secret]``."""
    resources = []
    for declared in result.resources:
        inputs = _hide(declared.inputs, "", set(declared.secret_paths))
        resources.append(
            {
                "type": declared.type,
                "name": declared.name,
                "parent": declared.parent.rsplit("::", 1)[-1] if declared.parent else None,
                "provider": declared.provider.rsplit("::", 1)[-1] if declared.provider else None,
                "inputs": inputs,
            }
        )
    # registration order depends on when each Output resolved: sort for a stable file
    resources.sort(key=lambda r: (str(r["type"]), str(r["name"])))
    kinds: dict[str, int] = {}
    for declared in result.kubernetes():
        kinds[declared.kind] = kinds.get(declared.kind, 0) + 1
    return {
        "stack": result.stack,
        "outputs": result.outputs,
        "kubernetes_objects_by_kind": dict(sorted(kinds.items())),
        "resources": resources,
    }


def _hide(value: Any, path: str, secret_paths: set[str]) -> Any:
    if path in secret_paths:
        return SECRET_SHOWN
    if isinstance(value, dict):
        return {k: _hide(v, f"{path}.{k}" if path else k, secret_paths) for k, v in value.items()}
    if isinstance(value, list):
        return [_hide(v, f"{path}[{i}]", secret_paths) for i, v in enumerate(value)]
    return value


def snapshot_text(result: Run) -> str:
    return json.dumps(snapshot(result), indent=1, sort_keys=True) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m watertight_infra.harness",
        description="Write infra/snapshots/<stack>.json: what the program declares for each stack (mocks, no cluster).",
    )
    parser.add_argument("stacks", nargs="*", help="stacks (default: every Pulumi.<stack>.yaml in infra/)")
    parser.add_argument("--check", action="store_true", help="only say whether the snapshots are up to date")
    args = parser.parse_args(argv)
    stale = []
    for stack in args.stacks or stack_names():
        text = snapshot_text(run(stack))
        path = SNAPSHOT_DIR / f"{stack}.json"
        if args.check:
            if not path.exists() or path.read_text(encoding="utf-8") != text:
                stale.append(stack)
            continue
        SNAPSHOT_DIR.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"{path}: {len(json.loads(text)['resources'])} resources")
    if stale:
        print(f"stale snapshots: {', '.join(stale)}; run python -m watertight_infra.harness", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
