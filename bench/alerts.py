"""How soon an error-rate alert fires after a module starts failing, end to end on real parts.

One run starts Mosquitto, a hub (``edgepack hub serve``, default alert settings: a round every
5 s over the last 30 s of telemetry) and one agent (process runtime, the agent's default
telemetry interval of 10 s) as separate processes (``bench/agent.py``'s stack), deploys a
module whose ``run()`` fails every 20th request (5 %) while a marker file exists, adds the rule
``error_rate > 1%`` for it, and keeps clients calling it without pause. Then, per round:

- ``fire_s``: the marker file created (the module starts failing) until ``GET /api/v1/alerts``
  lists the alert (target: within 30 s);
- ``resolve_s``: the marker removed until the alert is gone (no target: it takes the
  telemetry window for the failures to leave it).

Usage: ``python bench/alerts.py [--quick]``; progress on stderr, the last line of stdout is one
JSON object with ``targets`` and ``targets_met``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.agent import Stack, free_port, say, wait  # noqa: E402
from manifests.signing import generate_private_key, public_key_pem  # noqa: E402
from packager.build import BuildSpec, build_module  # noqa: E402

TARGETS = {"fire_s_max": 30.0}

SCRIPT = """\
import json
import os

calls = 0


def init():
    pass


def run(raw_data):
    global calls
    calls += 1
    if calls % 20 == 0 and os.path.exists(os.environ["FAIL_FILE"]):
        raise RuntimeError("failing on purpose (bench)")
    return {"result": json.loads(raw_data)["data"]}
"""


def build(root: Path) -> Path:
    key = generate_private_key()
    (root / "publisher.pub").write_bytes(public_key_pem(key.public_key()))
    src, model = root / "src", root / "model"
    src.mkdir()
    model.mkdir()
    (src / "score.py").write_text(SCRIPT)
    (model / "model.json").write_text("{}")
    spec = BuildSpec(name="flaky", version="1", entry_script=src / "score.py", model=model, source_dir=src)
    return build_module(spec, key, root / "dist").path


class Traffic:
    def __init__(self, port: int) -> None:
        self.port = port
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{self.port}", timeout=10) as http:
            while not self.stop.wait(0.005):
                try:
                    http.post("/score", json={"data": [1]})
                except httpx.HTTPError:
                    time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round instead of three")
    args = parser.parse_args()
    rounds = 1 if args.quick else 3
    root = Path(tempfile.mkdtemp(prefix="edgepack-bench-alerts-"))
    stack = Stack(root)
    fail_file = root / "fail-now"
    result: dict[str, object] = {}
    try:
        bundle = build(root)
        stack.start(root / "publisher.pub")
        stack.device("edge-1", ["process"]).start()
        stack.push(bundle)
        port = free_port()
        stack.deploy("flaky", "flaky", "1", port, "edge-1", "process",
                     environmentVariables={"FAIL_FILE": str(fail_file)})  # fmt: skip
        wait(lambda: stack.state_is("flaky", "Healthy"), 120, "flaky Healthy")
        with stack.http() as http:
            body = {"name": "flaky-errors", "condition": "error_rate > 1%", "service": "flaky"}
            http.post("/api/v1/alerts/rules", json=body).raise_for_status()

            def firing() -> bool:
                return bool(http.get("/api/v1/alerts").json()["alerts"])

            traffic = Traffic(port)
            traffic.thread.start()
            fire_s, resolve_s = [], []
            for n in range(rounds):
                say(f"round {n + 1}: failing 5 % of requests")
                started = time.monotonic()
                fail_file.touch()
                wait(firing, 120, "the alert firing")
                fire_s.append(round(time.monotonic() - started, 2))
                started = time.monotonic()
                fail_file.unlink()
                wait(lambda: not firing(), 180, "the alert resolving")
                resolve_s.append(round(time.monotonic() - started, 2))
            traffic.stop.set()
            traffic.thread.join(timeout=30)
        result = {
            "fire_s": fire_s,
            "fire_s_max": max(fire_s),
            "resolve_s": resolve_s,
            "settings": {"alert_interval_s": 5, "alert_window_s": 30, "telemetry_interval_s": 10},
            "targets": TARGETS,
            "targets_met": max(fire_s) <= TARGETS["fire_s_max"],
        }
    finally:
        stack.close()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
