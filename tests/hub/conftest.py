"""Hub test fixtures: a real hub (uvicorn on an ephemeral port) and a real Mosquitto.

``hub`` is a factory: ``hub()`` starts a fresh hub on a tmp data dir with the test
``publisher`` trusted; ``hub(mqtt_host=..., mqtt_port=..., broker_dir=...)`` passes settings
overrides; ``running.restart()`` (or ``hub(data_dir=old.data_dir)``) starts a new hub process
state on the same data dir, which is how restart tests prove nothing is lost.

By default each hub keeps its state in SQLite in its data dir. With
``EDGEPACK_TEST_POSTGRES=postgresql+psycopg://USER@HOST:PORT/postgres`` every new hub gets a
fresh PostgreSQL database instead (dropped afterwards), so the same tests check portability;
``EDGEPACK_TEST_POSTGRES=auto`` does the same on each worker's own ``postgres`` server (what CI
runs, as a second pass over the hub suite).
``hub(postgres=SERVER_URL)`` does the same for one hub, e.g. on the ``postgres`` fixture's server.
"""

from __future__ import annotations

import os
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

from cloud_hub.app import create_app
from cloud_hub.core import HubCore
from cloud_hub.serve import server_config
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import HubProcess, open_hub
from manifests.signing import public_key_pem
from tests.conftest import Publisher
from tests.factory import Forge
from tests.hub.broker_fixtures import *  # noqa: F403  (Mosquitto fixtures)
from tests.hub.browser_fixtures import *  # noqa: F403  (headless Chromium: browser, page)
from tests.hub.postgres_fixtures import *  # noqa: F403  (PostgreSQL server fixture)
from tests.hub.rabbitmq_fixtures import *  # noqa: F403  (a RabbitMQ cluster with MQTT)
from tests.hub.replica_fixtures import *  # noqa: F403  (hub processes behind nginx)
from tests.hub.seaweedfs_fixtures import *  # noqa: F403  (SeaweedFS S3 store fixture)

ADMIN_TOKEN = "ep_admin_test-token"


@dataclass
class RunningHub:
    """A hub serving real HTTP on loopback; ``process`` is the very hub the app serves."""

    url: str
    admin_token: str
    process: HubProcess
    data_dir: Path
    overrides: dict[str, Any]
    _server: uvicorn.Server
    _thread: threading.Thread
    _start: Callable[..., RunningHub]
    _stopped: bool = field(default=False)
    #: the CA that signed the hub's HTTPS certificate, when it serves HTTPS
    ca: Path | None = None

    @property
    def core(self) -> HubCore:
        return self.process.core

    @property
    def admin_headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.admin_token}"}

    def client(self, *, token: str | None = None, timeout: float = 30.0) -> httpx.Client:
        """An httpx client on this hub, authenticated as admin unless another token is given."""
        headers = {"Authorization": f"Bearer {token or self.admin_token}"}
        verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(self.ca)) if self.ca else True
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout, verify=verify)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._server.should_exit = True
        self._thread.join(timeout=30)
        self.process.close()

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def restart(self, **overrides: Any) -> RunningHub:
        """Stop this hub and start another on the same data dir, settings and port (devices
        enrolled with its URL find it again)."""
        self.stop()
        return self._start(
            data_dir=self.data_dir, bind_port=self.port, ca=self.ca, **{**self.overrides, **overrides}
        )


HubFactory = Callable[..., RunningHub]

POSTGRES_ENV = "EDGEPACK_TEST_POSTGRES"

#: Test modules marked with this run every test once per blob store: files and S3 (SeaweedFS).
BOTH_BLOB_STORES = "both_blob_stores"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{BOTH_BLOB_STORES}: run on the file store and on S3 (SeaweedFS)")


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if metafunc.definition.get_closest_marker(BOTH_BLOB_STORES) and "hub" in metafunc.fixturenames:
        metafunc.parametrize("blob_backend", ["file", "s3"], indirect=True)


@pytest.fixture
def blob_backend(request: pytest.FixtureRequest) -> str | None:
    """The blob store every hub of this test uses by default: None (files) or an S3 URL maker."""
    kind = getattr(request, "param", "file")
    return None if kind == "file" else "s3"


def _database(action: str, name: str, server: str) -> str:
    """Create or drop a PostgreSQL database on ``server`` (the URL of its admin database)."""
    admin_url = make_url(server)
    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            if action == "create":
                conn.execute(text(f'CREATE DATABASE "{name}"'))
            else:
                conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        engine.dispose()
    return admin_url.set(database=name).render_as_string(hide_password=False)


def _serve(settings: HubSettings, sock: socket.socket) -> tuple[HubProcess, uvicorn.Server, threading.Thread]:
    process = open_hub(settings)
    process.start()
    app = create_app(hub=process)
    # The same uvicorn configuration as 'edgepack hub serve' (socket bounds, TLS).
    config = server_config(app, settings, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            process.close()
            raise RuntimeError("the test hub did not start")
        time.sleep(0.01)
    return process, server, thread


@pytest.fixture
def hub(
    tmp_path_factory: pytest.TempPathFactory,
    publisher: Publisher,
    blob_backend: str | None,
    request: pytest.FixtureRequest,
) -> Iterator[HubFactory]:
    started: list[RunningHub] = []
    databases: list[tuple[str, str]] = []
    keys_dir = tmp_path_factory.mktemp("hub-keys")
    trusted = keys_dir / "publisher.pub"
    trusted.write_bytes(public_key_pem(publisher.key.public_key()))

    def start(
        *,
        data_dir: Path | None = None,
        postgres: str | None = None,
        bind_port: int = 0,
        ca: Path | None = None,
        **overrides: Any,
    ) -> RunningHub:
        """``ca``: the CA of the certificate given as ``tls_cert`` (the hub then serves HTTPS)."""
        data = data_dir or tmp_path_factory.mktemp("hub-data")
        if blob_backend == "s3" and "blob_store" not in overrides:
            # A restarted hub finds its blobs again: the bucket goes with the data dir.
            bucket_file = data / "test-bucket"
            if not bucket_file.exists():
                store = request.getfixturevalue("seaweedfs")
                bucket_file.write_text(store.url())
            overrides["blob_store"] = bucket_file.read_text()
        pg_server = postgres or os.environ.get(POSTGRES_ENV)
        if pg_server == "auto":  # CI: this worker's own throwaway server
            pg_server = request.getfixturevalue("postgres")
        if pg_server and "db" not in overrides:
            name = f"hub_{uuid.uuid4().hex[:12]}"
            overrides["db"] = _database("create", name, pg_server)
            databases.append((pg_server, name))
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", bind_port))
        port = sock.getsockname()[1]
        url = f"{'https' if overrides.get('tls_cert') else 'http'}://127.0.0.1:{port}"
        values: dict[str, Any] = {
            "data_dir": data,
            "host": "127.0.0.1",
            "port": port,
            "public_url": url,
            "admin_token": ADMIN_TOKEN,
            "trusted_keys": [trusted],
        }
        values.update(overrides)
        settings = HubSettings(**values)
        process, server, thread = _serve(settings, sock)
        running = RunningHub(
            url=url,
            admin_token=ADMIN_TOKEN,
            process=process,
            data_dir=data,
            overrides=overrides,
            _server=server,
            _thread=thread,
            _start=start,
            ca=ca,
        )
        started.append(running)
        return running

    yield start
    for running in reversed(started):
        running.stop()
    for pg_server, name in databases:
        _database("drop", name, pg_server)


@pytest.fixture
def forge(publisher: Publisher) -> Forge:
    """A module forge whose publisher key is the one every test hub trusts."""
    return Forge(publisher=publisher.key)
