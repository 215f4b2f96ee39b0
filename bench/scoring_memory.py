"""The scoring server's memory under a flood of large request bodies (issue 16, finding 3).

Starts ``python -m edge_agent.scoring`` (one worker, the default limits unless ``--env`` says
otherwise) on a toy module and, one after the other, lets 16 clients send 60 MB bodies and 30
clients send 95 MB bodies, each once announced by ``Content-Length`` and once chunked. For each
flood it prints the resident memory of the server's processes (``VmRSS`` of the process and its
workers) before, at its peak and after, and what the clients were answered.

    python bench/scoring_memory.py [--workers N] [--env NAME=VALUE ...]

The last line on stdout is one JSON object with the figures (MB = 10^6 bytes).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.body_flood import Flood, RssSampler, settle_rss  # noqa: E402
from tests.test_scoring_server import make_module, start_server, stop_server, wait_ready  # noqa: E402

SCRIPT = """
def init():
    pass

def run(raw_data):
    return {"length": len(raw_data)}
"""
FLOODS = ((16, 60_000_000), (30, 95_000_000))


def _mb(n: int) -> float:
    return round(n / 1e6, 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--env", action="append", default=[], help="NAME=VALUE for the server")
    args = parser.parse_args()
    env = dict(item.split("=", 1) for item in args.env)
    results = []
    with tempfile.TemporaryDirectory(prefix="edgepack-flood-") as tmp:
        module = make_module(Path(tmp) / "mod", SCRIPT, {"m.bin": b"x"})
        server = start_server(module, workers=args.workers, env=env)
        try:
            wait_ready(server)
            host, port = server.url.removeprefix("http://").split(":")
            for clients, body_bytes in FLOODS:
                for chunked in (False, True):
                    before = settle_rss(server.proc.pid)
                    flood = Flood(host, int(port), clients, body_bytes, chunked=chunked)
                    with RssSampler(server.proc.pid) as sampler:
                        statuses = flood.run()
                    after = settle_rss(server.proc.pid)
                    figures = {
                        "clients": clients,
                        "body_mb": _mb(body_bytes),
                        "framing": "chunked" if chunked else "content-length",
                        "rss_before_mb": _mb(before),
                        "rss_peak_mb": _mb(sampler.peak),
                        "rss_after_mb": _mb(after),
                        "answers": dict(statuses),
                    }
                    print(f"[flood] {figures}", file=sys.stderr, flush=True)
                    results.append(figures)
        finally:
            stop_server(server)
    print(json.dumps({"workers": args.workers, "env": env, "floods": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
