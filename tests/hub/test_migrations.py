"""Schema migrations (Alembic) on SQLite and PostgreSQL: exact, lossless, restartable.

The story: a hub made before migrations existed (its tables, no version table) holds devices,
deployments, modules, models and events. The new hub refuses to start on it and says what to
do; ``edgepack hub migrate`` brings it through every later revision; nothing is lost. A
migration killed half-way leaves the last finished revision, and the next run finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text

from cloud_hub.db.base import Base, import_tables
from cloud_hub.db.schema import BASELINE, _config, _migration_engine, head_revision, migrate
from cloud_hub.settings import HubSettings
from cloud_hub.wiring import open_hub
from manifests.errors import ConfigError
from manifests.signing import generate_private_key, key_id, public_key_pem
from tests.conftest import Publisher
from tests.factory import Forge
from tests.hub.conftest import HubFactory, _database
from tests.hub.fleet_support import deploy, enroll, push

EDGEPACK_MIGRATE = [sys.executable, "-m", "packager", "hub", "migrate"]


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of an empty database of each kind."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'hub.db'}"
        return
    server = request.getfixturevalue("postgres")
    name = f"mig_{uuid.uuid4().hex[:12]}"
    url = _database("create", name, server)
    try:
        yield url
    finally:
        _database("drop", name, server)


def revision_of(url: str) -> str | None:
    engine = create_engine(url)
    try:
        with engine.connect() as conn:
            return MigrationContext.configure(conn).get_current_revision()
    finally:
        engine.dispose()


def to_revision(url: str, revision: str) -> None:
    """Take the database down (or up) to ``revision`` with the hub's own migration setup."""
    engine = _migration_engine(url)
    try:
        with engine.connect() as conn:
            config = _config(conn)
            current = MigrationContext.configure(conn).get_current_revision()
            conn.commit()
            if current is not None and current > revision:
                command.downgrade(config, revision)
            else:
                command.upgrade(config, revision)
            conn.commit()
    finally:
        engine.dispose()


def forget_migrations(url: str) -> None:
    """What a database made by the pre-migration hub (``create_all``) looks like."""
    engine = create_engine(url)
    try:
        with engine.begin() as conn:
            conn.execute(text("DROP TABLE alembic_version"))
    finally:
        engine.dispose()


def run_migrate(url: str, data_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*EDGEPACK_MIGRATE, "--db", url, "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip


def test_the_migrations_make_exactly_the_schema_of_the_models(database: str) -> None:
    assert migrate(database).after == head_revision()
    import_tables()
    engine = create_engine(database)
    try:
        with engine.connect() as conn:
            diffs = compare_metadata(MigrationContext.configure(conn), Base.metadata)
            assert diffs == []
            assert conn.execute(text("SELECT id FROM fleet_lock")).scalars().all() == [1]
            assert conn.execute(text("SELECT id FROM registry_lock")).scalars().all() == [1]
    finally:
        engine.dispose()
    assert migrate(database).before == head_revision()  # again: nothing to do


def snapshot(base_url: str, admin: dict[str, str]) -> dict[str, Any]:
    """Everything an operator sees of the hub, through its API."""
    import httpx

    with httpx.Client(base_url=base_url, headers=admin, timeout=30) as http:
        devices = http.get("/api/v1/devices").json()["devices"]
        for d in devices:
            d.pop("online"), d.pop("last_seen")
        return {
            "devices": devices,
            "deployments": [
                {k: v for k, v in d.items() if k != "devices"}
                for d in http.get("/api/v1/deployments").json()["deployments"]
            ],
            "modules": http.get("/api/v1/modules").json(),
            "models": http.get("/api/v1/models").json(),
            "events": [
                (e["kind"], e["message"]) for e in http.get("/api/v1/dashboard/events").json()["events"]
            ],
        }


def test_a_pre_migration_database_with_data_is_migrated_with_nothing_lost(
    database: str, hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    h = hub(db=database)
    pushed = push(h, publisher, "digits", "1")
    with h.client() as http:
        device = enroll(http, "edge-1", site="berlin")
        enroll(http, "edge-2")
        assert deploy(http, "digits", pushed, selector="site=berlin").status_code == 201
        blob = next(iter(pushed.blob_digests))
        registered = http.post(
            "/api/v1/models/digits/versions",
            json={"files": [{"path": "m.bin", "digest": blob, "size": len(pushed.parts.blobs[blob])}]},
        )
        assert registered.status_code == 201, registered.text
        desired = http.get("/api/v1/device/desired", headers={"Authorization": f"Bearer {device.token}"})
    before = snapshot(h.url, h.admin_headers)
    data_dir = h.data_dir
    h.stop()

    # The database as the hub before migrations left it.
    to_revision(database, BASELINE)
    forget_migrations(database)
    with pytest.raises(ConfigError, match="edgepack hub migrate"):
        open_hub(HubSettings(data_dir=data_dir, db=database))

    done = run_migrate(database, data_dir)
    assert done.returncode == 0, done.stderr
    assert f"{BASELINE} → {head_revision()}" in done.stdout
    again = hub(data_dir=data_dir, db=database)
    assert snapshot(again.url, again.admin_headers) == before
    with again.client(token=device.token) as dev:
        assert dev.get("/api/v1/device/desired").content == desired.content  # the signed bytes


def test_an_existing_registry_gives_each_module_name_to_the_key_of_its_first_version(
    database: str, hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    second = Forge(publisher=generate_private_key())
    keys = []
    for name, key in (("first", publisher.key), ("second", second.publisher)):
        keys.append(tmp_path / f"{name}.pub")
        keys[-1].write_bytes(public_key_pem(key.public_key()))
    first_id, second_id = key_id(publisher.key.public_key()), key_id(second.publisher.public_key())
    h = hub(db=database, trusted_keys=keys)
    push(h, publisher, "digits", "1")
    with h.client() as http:
        assert http.put(f"/api/v1/modules/digits/signers/{second_id}").status_code == 200
        for name, version in (("digits", "2"), ("faces", "1")):
            pushed = http.post("/api/v1/modules", content=second.bundle(name=name, version=version))
            assert pushed.status_code == 201, pushed.text
    data_dir = h.data_dir
    h.stop()

    to_revision(database, "0005")  # the registry as a hub before module ownership kept it
    done = run_migrate(database, data_dir)
    assert done.returncode == 0 and f"0005 → {head_revision()}" in done.stdout, done.stderr
    again = hub(data_dir=data_dir, db=database, trusted_keys=keys)
    with again.client() as http:
        owners = {n: http.get(f"/api/v1/modules/{n}/signers").json() for n in ("digits", "faces")}
        assert (owners["digits"]["owners"], owners["digits"]["granted"]) == ([first_id], [])
        assert owners["faces"]["owners"] == [second_id]
        late = http.post("/api/v1/modules", content=second.bundle(name="digits", version="3"))
        assert late.status_code == 403 and first_id in late.json()["error"]["message"]


def test_the_hub_refuses_an_older_schema_in_one_line(database: str, tmp_path: Path) -> None:
    to_revision(database, "0002")
    with pytest.raises(ConfigError) as refused:
        open_hub(HubSettings(data_dir=tmp_path / "data", db=database))
    message = str(refused.value)
    assert "\n" not in message and "revision 0002" in message and "edgepack hub migrate" in message
    served = subprocess.run(
        [sys.executable, "-m", "packager", "hub", "serve", "--db", database,
         "--data-dir", str(tmp_path / "d"), "--port", "0"],
        capture_output=True, text=True, timeout=120, check=False, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip
    assert served.returncode == 2, served.stderr
    assert served.stderr.count("\n") == 1 and "edgepack hub migrate" in served.stderr


def _wait_for(predicate: Any, what: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def test_a_migration_killed_half_way_is_finished_by_the_next_run(postgres: str, tmp_path: Path) -> None:
    name = f"mig_{uuid.uuid4().hex[:12]}"
    url = _database("create", name, postgres)
    try:
        to_revision(url, BASELINE)
        blocker = create_engine(url)
        conn = blocker.connect()
        try:
            # Revision 0003 alters 'devices': holding that table makes the run stop inside it,
            # after 0002 has been committed.
            conn.execute(text("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE"))
            run = subprocess.Popen(
                [*EDGEPACK_MIGRATE, "--db", url, "--data-dir", str(tmp_path)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            )  # fmt: skip
            watcher = create_engine(url)
            try:

                def stuck_in_0003() -> bool:
                    with watcher.connect() as w:
                        waiting = w.execute(
                            text(
                                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                                "AND query ILIKE 'ALTER TABLE devices%'"
                            )
                        ).scalar_one()
                    return bool(waiting)

                _wait_for(stuck_in_0003, "the migration never reached revision 0003")
            finally:
                watcher.dispose()
            run.send_signal(signal.SIGKILL)
            run.wait(timeout=30)
        finally:
            conn.rollback()
            conn.close()
            blocker.dispose()
        _wait_for(lambda: revision_of(url) == "0002", "the finished revision 0002 was not kept", 30)
        columns = {c["name"] for c in inspect(create_engine(url)).get_columns("devices")}
        assert "rabbitmq_password_hash" not in columns  # 0003 rolled back whole
        with pytest.raises(ConfigError, match="revision 0002"):
            open_hub(HubSettings(data_dir=tmp_path / "data", db=url))
        done = run_migrate(url, tmp_path)
        assert done.returncode == 0 and f"0002 → {head_revision()}" in done.stdout, done.stdout + done.stderr
    finally:
        _database("drop", name, postgres)


def test_a_sqlite_migration_killed_while_it_waits_leaves_the_schema_whole(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'hub.db'}"
    to_revision(url, BASELINE)
    import sqlite3

    holder = sqlite3.connect(tmp_path / "hub.db", isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer holds the database
    run = subprocess.Popen(
        [*EDGEPACK_MIGRATE, "--db", url, "--data-dir", str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    time.sleep(3)
    assert run.poll() is None, "the migration should be waiting for the database"
    run.send_signal(signal.SIGKILL)
    run.wait(timeout=30)
    holder.execute("ROLLBACK")
    holder.close()
    assert revision_of(url) == BASELINE
    done = run_migrate(url, tmp_path)
    assert done.returncode == 0 and f"{BASELINE} → {head_revision()}" in done.stdout, done.stderr
