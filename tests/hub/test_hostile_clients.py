"""Issue 8: values a client (or a careless script) sends the hub that must be answered with a
4xx naming the problem, never a 500; and what a crash or a full disk leaves behind. Each test
failed before the fix that came with it."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.bundle import BLOB_PREFIX, MANIFEST_NAME
from manifests.digests import digest_hex, sha256_digest
from manifests.signing import envelope_bytes, public_key_pem, sign_payload
from tests.conftest import Publisher
from tests.engines import EngineFailed, start_on_free_ports
from tests.factory import Forge, Member, default_files, tar_bytes
from tests.hub.conftest import ADMIN_TOKEN, HubFactory
from tests.hub.fleet_support import enroll, push


def _deploy(http: httpx.Client, settings: dict[str, object]) -> httpx.Response:
    # json.dumps writes float('inf') as the bare token Infinity, as a careless script would.
    body = {"module": "m", "version": "1", "settings": settings, "target": {"devices": ["dev-1"]}}
    return http.put(
        "/api/v1/deployments/svc", content=json.dumps(body), headers={"content-type": "application/json"}
    )


@pytest.mark.parametrize(
    ("settings", "field"),
    [
        ({"port": 8000, "cpu": float("inf")}, "cpu"),
        ({"port": 8000, "cpu": float("nan")}, "cpu"),
        ({"port": 8000, "cpu": 1e300}, "cpu"),
        ({"port": True}, "port"),
        ({"port": "8000"}, "port"),
        ({"port": 8000, "memory_mb": "7"}, "memory_mb"),
        ({"port": 8000, "env": {"": "x"}}, "env"),
        ({"port": 8000, "env": {"A=B": "x"}}, "env"),
        ({"port": 8000, "env": {"A\u0000B": "x"}}, "env"),
        ({"port": 8000, "env": {"A": "x\u0000y"}}, "env"),
        ({"port": 8000, "health": {"period_s": float("inf")}}, "health"),
    ],
)
def test_what_the_hub_would_sign_for_devices_is_bounded(
    hub: HubFactory, publisher: Publisher, settings: dict[str, object], field: str
) -> None:
    h = hub()
    push(h, publisher, "m", "1")
    with h.client() as http:
        enroll(http, "dev-1")
        r = _deploy(http, settings)
        assert r.status_code == 400, r.text
        assert field in r.json()["error"]["message"]
        assert http.get("/api/v1/deployments/svc").status_code == 404
        # The same settings, made sound, deploy.
        assert _deploy(http, {"port": 8000, "cpu": 0.5, "env": {"MODE": "fast"}}).status_code == 201


def test_deploymentconfig_numbers_are_bounded(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    push(h, publisher, "m", "1")
    with h.client() as http:
        enroll(http, "dev-1")
        body = {
            "module": "m",
            "version": "1",
            "deployment_config": {
                "computeType": "local",
                "containerResourceRequirements": {"cpu": float("inf")},
            },
            "target": {"devices": ["dev-1"]},
        }
        r = http.put(
            "/api/v1/deployments/svc", content=json.dumps(body), headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, r.text
        assert "containerResourceRequirements.cpu" in r.json()["error"]["message"]


@pytest.mark.parametrize("version", ["\u00b2", "\u0661", str(2**64), "0", "-1"])
def test_model_versions_that_are_not_plain_numbers_are_refused(hub: HubFactory, version: str) -> None:
    # Superscript two and Arabic-Indic one passed str.isdigit, then int() failed (500); 2**64
    # overflowed the database.
    h = hub()
    with h.client() as http:
        r = http.get(f"/api/v1/models/digits/versions/{version}")
        assert r.status_code == 400, r.text
        assert "not a number" in r.json()["error"]["message"]


def test_cursors_and_durations_beyond_their_range_are_refused(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        r = http.get("/api/v1/dashboard/events", params={"after": 2**64})
        assert r.status_code == 422, r.text
        r = http.post("/api/v1/registry/gc", params={"grace_s": 10**30})
        assert r.status_code == 422, r.text
        assert http.post("/api/v1/registry/gc").status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"description": "x" * 100_000},
        {"description": "nul\u0000in it"},
        {"tags": {"k": "v" * 100_000}},
        {"tags": {"k": "a\u0000b"}},
        {"tags": {f"k{n}": "v" for n in range(65)}},
    ],
)
def test_model_tags_and_descriptions_are_bounded(hub: HubFactory, body: dict[str, object]) -> None:
    h = hub()
    data = b"weights"
    digest = sha256_digest(data)
    with h.client() as http:
        assert http.put(f"/api/v1/blobs/{digest}", content=data).status_code == 201
        files = [{"path": "w.bin", "digest": digest, "size": len(data)}]
        r = http.post("/api/v1/models/m/versions", json={"files": files, **body})
        assert r.status_code == 422, r.text
        sound = {"files": files, "description": "ok", "tags": {"k": "v"}}
        r = http.post("/api/v1/models/m/versions", json=sound)
        assert r.status_code == 201, r.text
        r = http.patch("/api/v1/models/m/versions/1", json={"set_tags": body.get("tags", {"k": "\u0000"})})
        assert r.status_code == 422, r.text


def test_a_module_whose_signed_description_is_huge_is_refused(hub: HubFactory, publisher: Publisher) -> None:
    h = hub()
    files = default_files()
    payload = Forge(publisher=publisher.key).manifest(name="big", version="1", files=files).payload()
    payload["description"] = "d" * 100_000  # signed by a trusted key, but no valid manifest
    members = [Member(MANIFEST_NAME, envelope_bytes(sign_payload(payload, [publisher.key])))]
    members += [Member(BLOB_PREFIX + digest_hex(sha256_digest(d)), d) for d in sorted(set(files.values()))]
    bundle = tar_bytes(members)
    with h.client() as http:
        r = http.post("/api/v1/modules", content=bundle)
        assert r.status_code == 422, r.text
        assert "description" in r.json()["error"]["message"]


# --- files the hub leaves on disk ---------------------------------------------------------------


def test_the_hubs_data_dir_and_database_are_private(hub: HubFactory, tmp_path: Path) -> None:
    # hub.db (token and password hashes) came out 0644 in a 0755 folder.
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    # SQLite's own file is the point here, also in the pass that puts every other hub on PostgreSQL.
    h = hub(data_dir=data, db=f"sqlite:///{data / 'hub.db'}")
    with h.client() as http:
        enroll(http, "dev-1")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    for path in data.iterdir():
        if path.is_file():
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path.name
    assert (data / "hub.db").exists()


def serve_hub_process(data: Path, trusted: Path, **settings: Any) -> tuple[subprocess.Popen[bytes], str]:
    """'edgepack hub serve' as a process of its own (stopped with SIGTERM, as systemd does);
    ``settings`` as its EDGEPACK_HUB_* environment. Its log is appended to across restarts."""
    env = {**os.environ, "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN_TOKEN,
           **{f"EDGEPACK_HUB_{k.upper()}": str(v) for k, v in settings.items()}}  # fmt: skip
    log = data.parent / f"{data.name}-hub.log"

    def launch(ports: list[int]) -> tuple[subprocess.Popen[bytes], str]:
        with log.open("ab") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "packager", "hub", "serve", "--data-dir", str(data),
                 "--port", str(ports[0]), "--trust", str(trusted)],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            )  # fmt: skip
        url = f"http://127.0.0.1:{ports[0]}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/api/v1/hub/key", timeout=1).status_code == 200:
                    return proc, url
            time.sleep(0.1)
        proc.kill()
        proc.wait(timeout=10)
        raise EngineFailed(log.read_text(errors="replace"))

    return start_on_free_ports("the hub", 1, launch)


def _stalled_push(url: str, bundle: bytes, sent: threading.Event) -> None:
    """Send most of ``bundle`` as a push, then stall (the hub gets killed meanwhile)."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        head = (
            f"POST /api/v1/modules HTTP/1.1\r\nHost: hub\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n"
            f"Content-Type: application/octet-stream\r\nContent-Length: {len(bundle)}\r\n\r\n"
        )
        sock.sendall(head.encode() + bundle[: len(bundle) * 3 // 4])
        sent.set()
        with contextlib.suppress(OSError):
            sock.recv(1)


def test_uploads_staged_by_a_killed_hub_are_removed_when_it_starts_again(
    hub: HubFactory, publisher: Publisher, tmp_path: Path
) -> None:
    # Staged '.part' files of pushes cut off by a crash stayed for ever (1.5 GB after five
    # crashes), and 'hub gc' with its default grace freed none of them.
    data = tmp_path / "data"
    trusted = tmp_path / "publisher.pub"
    trusted.write_bytes(public_key_pem(publisher.key.public_key()))
    files = {**default_files(), "model/weights.bin": os.urandom(8 << 20)}
    bundle = Forge(publisher=publisher.key).bundle(files=files, name="big", version="1")
    proc, url = serve_hub_process(data, trusted)
    sent = threading.Event()
    pusher = threading.Thread(target=_stalled_push, args=(url, bundle, sent), daemon=True)
    try:
        pusher.start()
        assert sent.wait(30)
        tmp = data / "blobs" / "tmp"
        deadline = time.monotonic() + 30
        while not any(tmp.rglob("*.part")):
            assert time.monotonic() < deadline, "the push never staged a blob"
            time.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    pusher.join(timeout=30)
    assert any(tmp.rglob("*")), "the crash left nothing to clean up"

    h = hub(data_dir=data)
    assert not any(tmp.iterdir()), sorted(p.name for p in tmp.rglob("*"))
    push(h, publisher, "after-crash", "1")  # and the hub works as before


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs, to fill up for real (needs root, as CI and the dev machines run)."""
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True)
    if done.returncode != 0:
        # Never a skip: CI runs as root, and a full disk must be tested on a real one.
        pytest.fail(f"cannot mount a tmpfs (run the suite as root): {done.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_disk_answers_the_json_error_body(hub: HubFactory, tiny_disk: Path) -> None:
    h = hub(data_dir=tiny_disk / "hub")
    data = os.urandom(6 << 20)
    with h.client() as http:
        r = http.put(f"/api/v1/blobs/{sha256_digest(data)}", content=data)
        assert r.status_code == 507, r.text
        assert r.json()["error"]["type"] == "InsufficientStorage"
        assert "disk is full" in r.json()["error"]["message"]


def _wait_until_staging_settles(tmp: Path, deadline: float) -> None:
    """Until the staged files' names and sizes stay the same for a second."""

    def snapshot() -> set[tuple[str, int]]:
        return {(str(p), p.stat().st_size) for p in tmp.rglob("*") if p.is_file()}

    last, since = snapshot(), time.monotonic()
    while time.monotonic() - since < 1.0:
        assert time.monotonic() < deadline, "the hub kept writing the stalled upload"
        time.sleep(0.1)
        now = snapshot()
        if now != last:
            last, since = now, time.monotonic()


def test_gc_with_its_default_grace_frees_a_stalled_upload(hub: HubFactory, publisher: Publisher) -> None:
    # 'hub gc' applied its one-hour grace to staged uploads too, so leftovers stayed for hours.
    h = hub()
    files = {**default_files(), "model/weights.bin": os.urandom(4 << 20)}
    bundle = Forge(publisher=publisher.key).bundle(files=files, name="stalled", version="1")
    sent = threading.Event()
    pusher = threading.Thread(target=_stalled_push, args=(h.url, bundle, sent), daemon=True)
    pusher.start()
    assert sent.wait(30)
    tmp = h.data_dir / "blobs" / "tmp"
    deadline = time.monotonic() + 30
    while not any(tmp.rglob("*.part")):
        assert time.monotonic() < deadline, "the push never staged a blob"
        time.sleep(0.05)
    # Backdate only once the hub has written all it was sent: a write after the backdating
    # (a loaded machine) would make the file young again and gc rightly keep it.
    _wait_until_staging_settles(tmp, deadline)
    eleven_minutes_ago = time.time() - 11 * 60
    for path in tmp.rglob("*"):
        os.utime(path, (eleven_minutes_ago, eleven_minutes_ago))
    for path in tmp.iterdir():
        os.utime(path, (eleven_minutes_ago, eleven_minutes_ago))
    with h.client() as http:
        assert http.post("/api/v1/registry/gc").status_code == 200
    assert not any(tmp.rglob("*.part"))
