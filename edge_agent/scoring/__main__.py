"""``python -m edge_agent.scoring --module-dir DIR [--host H] [--port P] [--workers N]``.

Every option can also be set by an environment variable (``EDGEPACK_MODULE_DIR``,
``EDGEPACK_HOST``, ``EDGEPACK_PORT``, ``EDGEPACK_WORKERS``, ``EDGEPACK_LOG_LEVEL``); the
command line wins. Exit codes: 0 after SIGINT/SIGTERM, 5 when the module fails to start
(traceback logged first), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_agent.scoring.server import LOG_LEVELS, serve_module
from manifests.errors import EdgepackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.scoring",
        description="Serve an unpacked edgepack module over HTTP.",
    )
    # Each option also comes from an environment variable, so a container image can be
    # configured without changing its command.
    env = os.environ
    parser.add_argument(
        "--module-dir",
        type=Path,
        default=env.get("EDGEPACK_MODULE_DIR"),
        help="directory holding module.json, src/ and model/ [$EDGEPACK_MODULE_DIR]",
    )
    parser.add_argument("--host", default=env.get("EDGEPACK_HOST", "127.0.0.1"), help="[$EDGEPACK_HOST]")
    parser.add_argument("--port", type=int, default=env.get("EDGEPACK_PORT", "8890"), help="[$EDGEPACK_PORT]")
    parser.add_argument(
        "--workers",
        type=int,
        default=env.get("EDGEPACK_WORKERS", "1"),
        help="worker processes [$EDGEPACK_WORKERS]",
    )
    parser.add_argument(
        "--log-level",
        default=env.get("EDGEPACK_LOG_LEVEL", "warning"),
        choices=LOG_LEVELS,
        help="[$EDGEPACK_LOG_LEVEL]",
    )
    args = parser.parse_args(argv)
    if args.module_dir is None:
        parser.error("--module-dir (or $EDGEPACK_MODULE_DIR) is required")
    # Whatever the entry script prints should reach the supervisor's log as it happens.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        serve_module(
            args.module_dir,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
        )
    except EdgepackError as exc:
        print(f"edgepack scoring: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
