"""``python -m edge_agent.scoring --module-dir DIR [--host H] [--port P] [--workers N]``.

Exit codes: 0 after SIGINT/SIGTERM, 5 when the module fails to start (traceback logged
first), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge_agent.scoring.server import LOG_LEVELS, serve_module
from manifests.errors import EdgepackError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m edge_agent.scoring",
        description="Serve an unpacked edgepack module over HTTP.",
    )
    parser.add_argument(
        "--module-dir", type=Path, required=True, help="directory holding module.json, src/ and model/"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8890)
    parser.add_argument("--workers", type=int, default=1, help="worker processes")
    parser.add_argument("--log-level", default="warning", choices=LOG_LEVELS)
    args = parser.parse_args(argv)
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
