"""Publishing at the speed of signing: one deploy to N devices, signed, stored and acknowledged.

On fresh engines (Mosquitto with the hub's generated password file and ACL, the hub in this
process on SQLite, or PostgreSQL with ``--db URL``), N devices are enrolled in one fleet change;
then one deployment targets them all. ``issue_s`` is the decision (plan, sign, store, commit),
``publish_s`` the executor (per-device rows locked, published retained QoS 1, acknowledged,
marked published); ``--profile`` prints where the time goes (cProfile, cumulative).

Usage: ``python bench/publish.py [--devices 5000] [--profile]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import logging
import os
import pstats
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

from pydantic import SecretStr
from sqlalchemy.orm import Session

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from cloud_hub.broker.mosquitto import prepare_broker_dir, render_config
from cloud_hub.fleet.deployments import ModuleRef, upsert_deployment
from cloud_hub.fleet.devices import Enrolment, enroll_devices
from cloud_hub.fleet.targeting import Target
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import open_hub
from manifests.desired import DeploymentSettings
from tests.hub.broker_fixtures import start_mosquitto

PASSWORD = "publish-bench-password"
TARGET_S = 1.5
#: What the profile lists: our code, paho, and SQLAlchemy's session and statement entry points.
OURS = "cloud_hub|manifests|paho|sqlalchemy/(orm/session|engine/base)"


class Timings(logging.Handler):
    """The hub's own account of a fleet change (``cloud_hub.fleet.changes`` logs it)."""

    def __init__(self) -> None:
        super().__init__()
        self.found: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        m = re.search(r"issued in ([\d.]+)s, applied in ([\d.]+)s", record.getMessage())
        if m:
            self.found = {"issue_s": float(m[1]), "publish_s": float(m[2])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=5000)
    parser.add_argument("--db", default=None, help="SQLAlchemy URL (default: SQLite in a temp dir)")
    parser.add_argument("--profile", action="store_true", help="print the top of a cProfile of the deploy")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="edgepack-publish-"))
    prefix = f"pub{os.getpid()}"
    try:
        broker_dir = root / "broker"
        prepare_broker_dir(HubSettings(data_dir=root / "prep", broker_dir=broker_dir, topic_prefix=prefix,
                                       mqtt_password=SecretStr(PASSWORD)))  # fmt: skip
        run_as = "root" if os.geteuid() == 0 else None
        broker = start_mosquitto(
            root / "mosquitto", lambda p: render_config(broker_dir, port=p, run_as=run_as)
        )
        settings = HubSettings(
            data_dir=root / "hub", db=args.db, mqtt_host=broker.host, mqtt_port=broker.port,
            mqtt_password=SecretStr(PASSWORD), topic_prefix=prefix, broker_dir=broker_dir,
            broker_pid_file=broker.pid_file, admin_token=SecretStr("ep_admin_publish-bench"),
        )  # fmt: skip
        hub = open_hub(settings)
        hub.start()
        try:
            result = run(hub, args.devices, args.profile)
        finally:
            hub.close()
            broker.stop()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


def run(hub: object, n: int, profile: bool) -> dict[str, object]:
    fleet = hub.fleet  # type: ignore[attr-defined]
    ids = [f"pub-{i:05d}" for i in range(n)]

    def enroll(session: Session) -> None:
        enroll_devices(session, [Enrolment(dev, {"fleet": "pub"}) for dev in ids])

    fleet.change(enroll)
    module = ModuleRef("pubmod", "1", "sha256:" + "ab" * 32)

    def deploy(session: Session) -> None:
        upsert_deployment(session, "svc", module, DeploymentSettings(port=9000),
                          Target.model_validate({"selector": {"fleet": "pub"}}))  # fmt: skip

    timings = Timings()
    changes_log = logging.getLogger("cloud_hub.fleet.changes")
    changes_log.addHandler(timings)
    changes_log.setLevel(logging.INFO)
    profiler = cProfile.Profile() if profile else None
    start, cpu0 = time.perf_counter(), time.process_time()
    if profiler:
        profiler.enable()
    outcome = fleet.change(deploy)
    if profiler:
        profiler.disable()
    total, cpu = time.perf_counter() - start, time.process_time() - cpu0
    if profiler:
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats(os.environ.get("SORT", "cumulative")).print_stats(OURS, 60)
    assert len(outcome.effects.issued) == n, len(outcome.effects.issued)
    assert outcome.applied.published, outcome.applied.publish_errors[:3]
    return {
        "bench": "publish",
        "devices": n,
        "deploy_s": round(total, 3), "hub_cpu_s": round(cpu, 3),
        **timings.found,
        "target_s": TARGET_S,
    }


if __name__ == "__main__":
    main()
