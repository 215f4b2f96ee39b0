"""The scaled-out layout for the benchmarks: real engines started on loopback, as the tests do.

PostgreSQL, SeaweedFS, Mosquitto, ``edgepack hub serve`` processes and nginx, each from the
same helpers the test suite uses (``tests/hub/*_fixtures.py``), so a benchmark measures the
layout the tests check. Everything is stopped by :meth:`Layout.close`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import create_engine, text

from manifests.signing import generate_private_key, private_key_pem, public_key_pem
from tests.conftest import free_port, free_ports, make_publisher
from tests.hub.broker_fixtures import Broker, plain_config, start_mosquitto
from tests.hub.postgres_fixtures import PostgresServer, find_postgres_bin, start_postgres
from tests.hub.replica_fixtures import ADMIN, HubReplica, _start_nginx
from tests.hub.seaweedfs_fixtures import SeaweedFS, find_weed

DEVICE_ROW = (
    "INSERT INTO devices (id, tags, mqtt_password_hash, token_hash, revoked, created_at, online)"
    " VALUES (:id, :tags, :pw, :tok, false, now(), false)"
)


@dataclass
class Layout:
    root: Path
    postgres: PostgresServer
    broker: Broker
    seaweedfs: SeaweedFS | None = None
    replicas: list[HubReplica] = field(default_factory=list)
    nginx: subprocess.Popen[bytes] | None = None
    nginx_port: int = 0
    publisher_key: object = None
    _dbs: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, *, s3: bool = False) -> Layout:
        root = Path(tempfile.mkdtemp(prefix="edgepack-bench-layout-"))
        postgres = start_postgres(find_postgres_bin())
        broker = start_mosquitto(root / "mosquitto", plain_config)
        layout = cls(root, postgres, broker)
        if s3:
            names = ["master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc",
                     "iceberg", "lance"]  # fmt: skip
            ports = dict(zip(names, free_ports(len(names)), strict=True))
            layout.seaweedfs = SeaweedFS(find_weed(), root / "weed", ports)
            (root / "weed").mkdir()
            layout.seaweedfs.start()
        return layout

    def database(self) -> str:
        name = f"bench_{uuid.uuid4().hex[:10]}"
        engine = create_engine(self.postgres.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
        engine.dispose()
        self._dbs.append(name)
        return self.postgres.url.rsplit("/", 1)[0] + f"/{name}"

    def hubs(self, count: int, db: str, prefix: str, *, blob_store: str | None = None, nginx: bool = False,
             upkeep_s: float = 5.0, env: dict[str, str] | None = None,
             nginx_blob_dir: Path | None = None) -> list[HubReplica]:  # fmt: skip
        """Start ``count`` hub processes on ``db`` (and nginx in front when asked, serving
        ``nginx_blob_dir`` itself when given: file-store downloads offloaded)."""
        shared = self.root / f"shared-{prefix}"
        shared.mkdir()
        (shared / "hub.key").write_bytes(private_key_pem(generate_private_key()))
        publisher = make_publisher()
        self.publisher_key = publisher.key
        (shared / "publisher.pub").write_bytes(public_key_pem(publisher.key.public_key()))
        env = {**os.environ, "NO_COLOR": "1", "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN,
               "EDGEPACK_HUB_HUB_KEY": str(shared / "hub.key"),
               "EDGEPACK_HUB_UPKEEP_INTERVAL_S": str(upkeep_s), **(env or {})}  # fmt: skip
        if self.seaweedfs is not None:
            env.update(self.seaweedfs.env)
        self.nginx_port = free_port()
        started = []
        for i in range(count):
            port = free_port()
            args = [sys.executable, "-m", "packager", "hub", "serve", "--db", db,
                    "--data-dir", str(shared / f"hub-{i}"), "--port", str(port),
                    "--trust", str(shared / "publisher.pub"), "--public-url", f"http://127.0.0.1:{self.nginx_port}",
                    "--mqtt-host", self.broker.host, "--mqtt-port", str(self.broker.port),
                    "--topic-prefix", prefix]  # fmt: skip
            if blob_store:
                args += ["--blob-store", blob_store]
            replica = HubReplica(f"hub-{i}", port, args, env, shared / f"hub-{i}.log")
            replica.start()
            started.append(replica)
        self.replicas += started
        if nginx:
            self.nginx = _start_nginx(shared / "nginx", self.nginx_port, started, blob_dir=nginx_blob_dir)
        return started

    def stop_hubs(self) -> None:
        for replica in self.replicas:
            replica.stop()
        self.replicas = []
        if self.nginx is not None:
            self.nginx.terminate()
            self.nginx.wait(10)
            self.nginx = None

    def close(self) -> None:
        self.stop_hubs()
        with contextlib.suppress(Exception):
            self.broker.stop()
        if self.seaweedfs is not None:
            self.seaweedfs.stop()
        self.postgres.stop()
        shutil.rmtree(self.root, ignore_errors=True)
