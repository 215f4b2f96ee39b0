"""``python -m edge_agent.scoring --module-dir DIR [--host H] [--port P] [--workers N]``.

Every option can also be set by an environment variable (``EDGEPACK_MODULE_DIR``,
``EDGEPACK_HOST``, ``EDGEPACK_PORT``, ``EDGEPACK_WORKERS``, ``EDGEPACK_LOG_LEVEL``,
``EDGEPACK_PRELOAD``, ``EDGEPACK_REUSE_PORT``, ``EDGEPACK_PROBE_PORT``,
``EDGEPACK_STATE_FILE``, ``EDGEPACK_DRAIN_S``, ``EDGEPACK_AUTH_KEYS_FILE``, ``EDGEPACK_TLS_CERT``,
``EDGEPACK_TLS_KEY``, ``EDGEPACK_MAX_CONNECTIONS``, ``EDGEPACK_HEADER_TIMEOUT_S``,
``EDGEPACK_BODY_TIMEOUT_S``, ``EDGEPACK_RUN_TIMEOUT_S``, ``EDGEPACK_MAX_BODY_BYTES``,
``EDGEPACK_MAX_BODY_BYTES_IN_FLIGHT``, ``EDGEPACK_MAX_HEAD_BYTES``); the command line wins. Preload to
drain are how the agent runs an instance (see :class:`edge_agent.scoring.server.InstanceOptions`);
the rest is what the endpoint enforces (:mod:`edge_agent.scoring.endpoint`).

Exit codes: 0 after SIGINT/SIGTERM, 5 when the module fails to start (traceback logged
first), 6 when the port is held by another program, 2 for bad arguments (a worker ended by
the run() watchdog exits 7 and is replaced by its supervisor).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from edge_agent.scoring.endpoint import EndpointOptions
from edge_agent.scoring.exit_codes import EXIT_PORT_IN_USE
from edge_agent.scoring.limits import ServingLimits
from edge_agent.scoring.server import LOG_LEVELS, InstanceOptions, PortInUse, WorkerCrashed, serve_module
from manifests.errors import EdgepackError, ModuleStartFailure


def _flag(value: str | None) -> bool:
    return (value or "").strip().lower() in ("1", "true", "yes", "on")


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
    parser.add_argument(
        "--preload",
        action="store_true",
        default=_flag(env.get("EDGEPACK_PRELOAD")),
        help="run init() before the port listens [$EDGEPACK_PRELOAD]",
    )
    parser.add_argument(
        "--reuse-port",
        action="store_true",
        default=_flag(env.get("EDGEPACK_REUSE_PORT")),
        help="bind with SO_REUSEPORT, sharing the port with another version [$EDGEPACK_REUSE_PORT]",
    )
    parser.add_argument(
        "--probe-port",
        type=int,
        default=env.get("EDGEPACK_PROBE_PORT"),
        help="also serve on this private loopback port (0: any free one) [$EDGEPACK_PROBE_PORT]",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        default=env.get("EDGEPACK_STATE_FILE"),
        help="write pid and ports here once listening [$EDGEPACK_STATE_FILE]",
    )
    parser.add_argument(
        "--drain-s",
        type=float,
        default=env.get("EDGEPACK_DRAIN_S", "0"),
        help="on SIGTERM, let open connections finish for up to this long [$EDGEPACK_DRAIN_S]",
    )
    parser.add_argument(
        "--auth-keys-file",
        type=Path,
        default=env.get("EDGEPACK_AUTH_KEYS_FILE"),
        help='JSON {"sha256": [...]} of accepted endpoint keys; re-read on change [$EDGEPACK_AUTH_KEYS_FILE]',
    )
    for name in ("cert", "key"):
        variable = f"EDGEPACK_TLS_{name.upper()}"
        parser.add_argument(f"--tls-{name}", type=Path, default=env.get(variable), help=f"PEM [${variable}]")
    defaults = ServingLimits()
    parser.add_argument(
        "--max-connections",
        type=int,
        default=env.get("EDGEPACK_MAX_CONNECTIONS", str(defaults.max_connections)),
        help="open connections per worker [$EDGEPACK_MAX_CONNECTIONS]",
    )
    parser.add_argument(
        "--header-timeout-s",
        type=float,
        default=env.get("EDGEPACK_HEADER_TIMEOUT_S", str(defaults.header_timeout_s)),
        help="[$EDGEPACK_HEADER_TIMEOUT_S]",
    )
    parser.add_argument(
        "--body-timeout-s",
        type=float,
        default=env.get("EDGEPACK_BODY_TIMEOUT_S", str(defaults.body_timeout_s)),
        help="[$EDGEPACK_BODY_TIMEOUT_S]",
    )
    parser.add_argument(
        "--run-timeout-s",
        type=float,
        default=env.get("EDGEPACK_RUN_TIMEOUT_S") or None,
        help="answer 504 and replace the worker when run() takes longer [$EDGEPACK_RUN_TIMEOUT_S]",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=env.get("EDGEPACK_MAX_BODY_BYTES", str(defaults.max_body_bytes)),
        help="largest request body; larger ones get 413 [$EDGEPACK_MAX_BODY_BYTES]",
    )
    parser.add_argument(
        "--max-body-bytes-in-flight",
        type=int,
        default=env.get("EDGEPACK_MAX_BODY_BYTES_IN_FLIGHT") or None,
        help="request bodies one worker holds at once; beyond, 503 (default: 4 x --max-body-bytes) "
        "[$EDGEPACK_MAX_BODY_BYTES_IN_FLIGHT]",
    )
    parser.add_argument(
        "--max-head-bytes",
        type=int,
        default=env.get("EDGEPACK_MAX_HEAD_BYTES", str(defaults.max_head_bytes)),
        help="largest request line and headers; larger ones get 431 [$EDGEPACK_MAX_HEAD_BYTES]",
    )
    parser.add_argument(
        "--exit-on-crash",
        action="store_true",
        default=_flag(env.get("EDGEPACK_EXIT_ON_CRASH")),
        help="a worker that dies ends the instance with its code, not replaced [$EDGEPACK_EXIT_ON_CRASH]",
    )
    args = parser.parse_args(argv)
    if args.module_dir is None:
        parser.error("--module-dir (or $EDGEPACK_MODULE_DIR) is required")
    options = InstanceOptions(
        preload=args.preload,
        reuse_port=args.reuse_port,
        probe_port=args.probe_port,
        state_file=args.state_file,
        drain_s=args.drain_s,
        exit_on_crash=args.exit_on_crash,
    )
    try:
        endpoint = EndpointOptions(
            keys_file=args.auth_keys_file,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
            limits=ServingLimits(
                max_connections=args.max_connections,
                header_timeout_s=args.header_timeout_s,
                body_timeout_s=args.body_timeout_s,
                run_timeout_s=args.run_timeout_s,
                max_body_bytes=args.max_body_bytes,
                max_body_bytes_in_flight=args.max_body_bytes_in_flight,
                max_head_bytes=args.max_head_bytes,
            ),
        )
    except EdgepackError as exc:
        parser.error(str(exc))
    # Whatever the entry script prints should reach the supervisor's log as it happens.
    sys.stdout.reconfigure(line_buffering=True)  # type: ignore[union-attr]
    try:
        serve_module(
            args.module_dir,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_level=args.log_level,
            options=options,
            endpoint=endpoint,
        )
    except PortInUse as exc:
        print(f"edgepack scoring: {exc}", file=sys.stderr)
        return EXIT_PORT_IN_USE
    except WorkerCrashed as exc:
        print(f"edgepack scoring: {exc}", file=sys.stderr)
        return exc.code
    except ModuleStartFailure as exc:
        print(
            f"edgepack scoring: the module failed to start: {exc} (its traceback is above); "
            "fix the entry script or its model",
            file=sys.stderr,
        )
        return exc.exit_code
    except EdgepackError as exc:
        print(f"edgepack scoring: {exc}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
