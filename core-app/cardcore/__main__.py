"""``python -m cardcore --config FILE``: one app server process (cardcore.platform.serve, no worker)."""

from __future__ import annotations

import argparse
import os

from cardcore.app import CONFIG_ENV
from cardcore.platform import settings as settings_module
from cardcore.platform.serve import serve


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m cardcore", description="Run one card core app server.")
    parser.add_argument("--config", required=True, help="app server settings (JSON)")
    args = parser.parse_args()
    settings = settings_module.load(args.config)  # fail here, clearly, before the server starts
    os.environ[CONFIG_ENV] = os.path.abspath(args.config)
    serve("cardcore.app:create_app", settings.host, settings.port, settings.serve_limits(), settings.tls)


if __name__ == "__main__":
    main()
