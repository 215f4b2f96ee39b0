"""``python -m edge_agent --config agent.toml [--stop-modules]``: the agent daemon.

``edgepack agent run`` execs this, so that the daemon does not carry the CLI's libraries
(typer, click, rich) in its memory for months. Exit codes: 0 after SIGTERM/SIGINT, 2 for a
bad configuration (credentials other users may read included, unless
``--allow-open-credentials``).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from manifests.errors import EdgepackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m edge_agent", description="The edgepack device agent.")
    parser.add_argument("--config", type=Path, required=True, help="agent.toml")
    parser.add_argument(
        "--stop-modules", action="store_true", help="stop the modules when the agent stops"
    )
    parser.add_argument(
        "--allow-open-credentials",
        action="store_true",
        help="use credentials other users may read (with a warning) instead of refusing them",
    )
    args = parser.parse_args(argv)
    # pydantic looks for plugins by reading the metadata of every installed distribution; the
    # agent uses none, and on a full system Python that scan stays in the daemon's memory.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    from edge_agent.daemon import run_agent

    try:
        run_agent(
            args.config, stop_modules=args.stop_modules, allow_open_credentials=args.allow_open_credentials
        )
    except EdgepackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
