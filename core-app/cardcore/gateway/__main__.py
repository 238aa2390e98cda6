"""``python -m cardcore.gateway --config FILE.json``: serve the gateway with granian.

One process (granian embedded, no forked worker), HTTP/1.1 only, uvloop where available. The settings are checked here first so a bad
file fails with a message naming the key instead of a crashed worker.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from cardcore.gateway.settings import ENV_CONFIG, GatewayConfigError, load
from cardcore.platform.serve import serve

TARGET = "cardcore.gateway.app:create_app"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cardcore.gateway", description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config",
        default=os.environ.get(ENV_CONFIG),
        help=f"the gateway's JSON settings file (default: ${ENV_CONFIG})",
    )
    parser.add_argument("--check", action="store_true", help="only check the settings file, then exit")
    args = parser.parse_args(argv)
    if not args.config:
        print(f"gateway: no settings: pass --config FILE.json or set {ENV_CONFIG}", file=sys.stderr)
        return 2
    path = Path(args.config).resolve()
    try:
        settings = load(path)
    except GatewayConfigError as error:
        print(f"gateway: bad settings: {error}", file=sys.stderr)
        return 2
    if args.check:
        print(f"gateway: {path}: ok")
        return 0
    os.environ[ENV_CONFIG] = str(path)  # read again by create_app

    # one process, as the app server: the runtime's PID is the whole gateway, so SIGKILL of it
    # leaves no worker listening behind (granian's Granian() forks a worker that outlives its master)
    serve(TARGET, settings.host, settings.port, settings.serve_limits())
    return 0


if __name__ == "__main__":
    sys.exit(main())
