"""Several real ``edgepack hub serve`` processes behind a real nginx (star-imported by conftest).

``replica_set``: a factory for a scaled-out layout on loopback — N hub processes on one
PostgreSQL database (the ``postgres`` fixture's server), one S3 store (``seaweedfs``; or with
``file_store`` one blob folder they share, ``--blob-store file:///…``) and one
Mosquitto (``mosquitto``, under a topic prefix of the test's own), sharing one hub key and one
admin token, with nginx (Debian's, config from ``cloud_hub.balancer.nginx``) in front.
Replicas can be killed (SIGKILL) and started again.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from cloud_hub.balancer.nginx import Upstream, prepare_run_dir, render_nginx_config
from manifests.signing import generate_private_key, private_key_pem, public_key_pem
from tests.conftest import Publisher
from tests.engines import EngineFailed, listens, start_on_free_ports

__all__ = ["NGINX", "HubReplica", "ReplicaSet", "ReplicaSetFactory", "replica_set"]

NGINX = Path("/usr/sbin/nginx")
ADMIN = "ep_admin_replica-test-token"


@dataclass
class HubReplica:
    """One ``edgepack hub serve`` process."""

    name: str
    port: int
    args: list[str]
    env: dict[str, str]
    log: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 60) -> None:
        """Start it and wait until it answers; :class:`EngineFailed` with what it logged if not."""
        offset = self.log.stat().st_size if self.log.exists() else 0  # this start's part of the log
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/api/v1/hub/key", timeout=1).status_code == 200:
                    return
            time.sleep(0.1)
        self.kill()
        with self.log.open("rb") as log:
            log.seek(offset)
            said = log.read().decode(errors="replace")
        raise EngineFailed(f"hub replica {self.name} did not start:\n{said}")

    def kill(self) -> None:
        """SIGKILL: no shutdown, no clean-up, as a crash or an OOM kill."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def client(self, token: str = ADMIN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)


@dataclass
class ReplicaSet:
    replicas: list[HubReplica]
    nginx_port: int
    nginx: subprocess.Popen[bytes]
    db: str
    prefix: str
    #: the blob folder the replicas share (``file_store``), else None (S3)
    blob_dir: Path | None = None
    admin_token: str = ADMIN
    _stopped: bool = field(default=False)

    @property
    def url(self) -> str:
        """The address clients and devices use: nginx."""
        return f"http://127.0.0.1:{self.nginx_port}"

    def client(self, token: str = ADMIN) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=60)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for replica in self.replicas:
            replica.stop()
        if self.nginx.poll() is None:
            self.nginx.terminate()
            self.nginx.wait(timeout=20)


ReplicaSetFactory = Callable[..., ReplicaSet]


def _start_nginx(
    run_dir: Path,
    port: int,
    replicas: list[HubReplica],
    s3_endpoint: str | None = None,
    blob_dir: Path | None = None,
) -> subprocess.Popen[bytes]:
    if not NGINX.is_file():
        pytest.fail("no nginx: install Debian's 'nginx' package (scripts/test.sh does)", pytrace=False)
    prepare_run_dir(run_dir)
    conf = render_nginx_config(
        listen=Upstream("127.0.0.1", port),
        replicas=[Upstream("127.0.0.1", r.port) for r in replicas],
        run_dir=run_dir,
        run_as="root" if os.geteuid() == 0 else None,
        daemon=False,
        s3_endpoint=s3_endpoint,
        blob_dir=blob_dir,
    )
    (run_dir / "nginx.conf").write_text(conf)
    process = subprocess.Popen(
        [str(NGINX), "-c", str(run_dir / "nginx.conf"), "-p", str(run_dir), "-e", str(run_dir / "error.log")],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
    )  # fmt: skip
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and process.poll() is None:
        # nginx's own listener: any HTTP answer would come from whoever took the port too.
        if listens(process.pid, port):
            return process
        time.sleep(0.05)
    if process.poll() is None:
        process.kill()
    process.wait(timeout=10)
    error_log = run_dir / "error.log"
    raise EngineFailed(f"nginx did not start:\n{error_log.read_text() if error_log.exists() else ''}")


@pytest.fixture
def replica_set(
    tmp_path_factory: pytest.TempPathFactory,
    publisher: Publisher,
    postgres: str,
    request: pytest.FixtureRequest,
) -> Iterator[ReplicaSetFactory]:
    from tests.hub.conftest import _database  # the hub conftest imports this module

    started: list[ReplicaSet] = []
    databases: list[str] = []

    def start(
        count: int = 2,
        *,
        upkeep_s: float = 1.0,
        extra_env: dict[str, str] | None = None,
        s3_offload: bool = False,
        file_store: bool = False,
        file_offload: bool = False,
    ) -> ReplicaSet:
        """``s3_offload``: nginx sends device blob downloads from S3 (X-Accel-Redirect).
        ``file_store``: the replicas share a blob folder instead of S3 (no SeaweedFS);
        ``file_offload``: that, and nginx sends device blob downloads from it."""
        file_store = file_store or file_offload
        seaweedfs = None if file_store else request.getfixturevalue("seaweedfs")
        broker = request.getfixturevalue("mosquitto")
        root = tmp_path_factory.mktemp("replicas")
        shared = root / "shared"
        shared.mkdir()
        (shared / "hub.key").write_bytes(private_key_pem(generate_private_key()))
        (shared / "publisher.pub").write_bytes(public_key_pem(publisher.key.public_key()))
        name = f"rep_{uuid.uuid4().hex[:12]}"
        db = _database("create", name, postgres)
        databases.append(name)
        prefix = f"r{uuid.uuid4().hex[:10]}"
        env = {
            **os.environ,
            **(seaweedfs.env if seaweedfs is not None else {}),
            "NO_COLOR": "1",
            "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN,
            "EDGEPACK_HUB_HUB_KEY": str(shared / "hub.key"),
            "EDGEPACK_HUB_UPKEEP_INTERVAL_S": str(upkeep_s),
            **({"EDGEPACK_HUB_DOWNLOAD_OFFLOAD": "nginx"} if s3_offload or file_offload else {}),
            **(extra_env or {}),
        }
        blobs = root / "blobs"
        blob_store = blobs.as_uri() if seaweedfs is None else seaweedfs.url(prefix=prefix)

        def launch(ports: list[int]) -> ReplicaSet:
            # nginx's port first: every replica is told it as its public URL.
            nginx_port, replica_ports = ports[0], ports[1:]
            replicas = []
            for i, port in enumerate(replica_ports):
                args = [
                    sys.executable, "-m", "packager", "hub", "serve",
                    "--db", db, "--data-dir", str(root / f"hub-{i}"), "--host", "127.0.0.1",
                    "--port", str(port), "--trust", str(shared / "publisher.pub"), "--blob-store", blob_store,
                    "--mqtt-host", broker.host, "--mqtt-port", str(broker.port), "--topic-prefix", prefix,
                    "--public-url", f"http://127.0.0.1:{nginx_port}",
                ]  # fmt: skip
                replicas.append(HubReplica(f"hub-{i}", port, args, env, root / f"hub-{i}.log"))
            try:
                for replica in replicas:
                    replica.start()
                nginx = _start_nginx(
                    root / "nginx",
                    nginx_port,
                    replicas,
                    s3_endpoint=seaweedfs.endpoint if s3_offload and seaweedfs is not None else None,
                    blob_dir=blobs if file_offload else None,
                )
            except BaseException:
                for replica in replicas:
                    replica.stop()
                raise
            return ReplicaSet(replicas, nginx_port, nginx, db, prefix, blob_dir=blobs if file_store else None)

        rs = start_on_free_ports("hub replicas behind nginx", count + 1, launch)
        started.append(rs)
        return rs

    yield start
    for rs in started:
        rs.stop()
    for name in databases:
        _database("drop", name, postgres)
