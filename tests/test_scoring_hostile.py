"""Issue 8: the scoring server under hostile clients, with endpoint keys and TLS.

A module listens on the device's network. Each test plays an attacker (or an Azure user who
asked for keys or TLS) against a real server process and shows that normal requests are still
answered."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from cloud_hub.tls.ca import issue_server_cert, make_ca
from edge_agent.scoring.auth import key_hash
from tests.conftest import free_port
from tests.test_scoring_server import Server, make_module, serving, stop_server, wait_ready

SCRIPT = """
import json, os, time

def init():
    pass

def run(raw_data):
    request = json.loads(raw_data)
    with open(os.environ["CALLS_LOG"], "a") as fh:
        fh.write(raw_data + "\\n")
    if request.get("hang"):
        while True:
            time.sleep(1)
    return {"echo": request}
"""


@pytest.fixture
def module(tmp_path: Path) -> Path:
    return make_module(tmp_path / "mod", SCRIPT, {"m.bin": b"x"})


def _env(tmp_path: Path, **options: str) -> dict[str, str]:
    """The server's environment: where run() logs its calls, and EDGEPACK_<OPTION> values."""
    env = {f"EDGEPACK_{k.upper()}": v for k, v in options.items()}
    return {"CALLS_LOG": str(tmp_path / "calls.log"), **env}


def _calls(tmp_path: Path) -> list[dict[str, object]]:
    log = tmp_path / "calls.log"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def _connect(url: str) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=15)


def _answer(sock: socket.socket) -> bytes:
    data = b""
    try:
        while chunk := sock.recv(4096):
            data += chunk
    except (TimeoutError, ConnectionResetError):
        pass
    return data


def _score_ok(server: Server, n: int = 0, timeout: float = 10) -> None:
    r = httpx.post(server.url + "/score", json={"n": n}, timeout=timeout)
    assert r.status_code == 200, r.text
    assert r.json() == {"echo": {"n": n}}


def test_a_slow_drip_request_head_is_cut_off_and_others_are_served(module: Path, tmp_path: Path) -> None:
    with serving(module, env=_env(tmp_path, header_timeout_s="1")) as server:
        wait_ready(server)
        with _connect(server.url) as sock:
            started = time.monotonic()
            head = b"POST /score HTTP/1.1\r\nHost: s\r\nContent-Type: application/json\r\n"
            answer = b""
            for byte in head:  # one byte every 100 ms: the head would take 6 s
                try:
                    sock.sendall(bytes([byte]))
                except (BrokenPipeError, ConnectionResetError):
                    break
                _score_ok(server, byte)  # meanwhile everyone else is served
                time.sleep(0.1)
            answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 408"), answer
            assert time.monotonic() - started < 5


def test_a_slow_drip_body_is_cut_off_and_never_reaches_run(module: Path, tmp_path: Path) -> None:
    with serving(module, env=_env(tmp_path, body_timeout_s="1")) as server:
        wait_ready(server)
        with _connect(server.url) as sock:
            sock.sendall(b"POST /score HTTP/1.1\r\nHost: s\r\nContent-Length: 200\r\n\r\n{")
            for _ in range(15):
                try:
                    sock.sendall(b" ")
                except (BrokenPipeError, ConnectionResetError):
                    break
                _score_ok(server)
                time.sleep(0.2)
            assert _answer(sock).startswith(b"HTTP/1.1 408")
    assert all("n" in c for c in _calls(tmp_path)), "run() saw the dripped body"


def test_many_idle_connections_do_not_lock_out_normal_clients(module: Path, tmp_path: Path) -> None:
    # A long header timeout: what keeps the server answering is the bound, which evicts the
    # oldest idle connection, not the timeout.
    with serving(module, env=_env(tmp_path, max_connections="20", header_timeout_s="60")) as server:
        wait_ready(server)
        idle = [_connect(server.url) for _ in range(100)]
        try:
            started = time.monotonic()
            for n in range(20):
                _score_ok(server, n, timeout=5)
            assert time.monotonic() - started < 10
            # Most idle connections were closed by the server to make room.
            closed = 0
            for sock in idle:
                sock.settimeout(0.2)
                try:
                    closed += sock.recv(1) == b""
                except (TimeoutError, ConnectionResetError):
                    closed += 0
            assert closed >= 80
        finally:
            for sock in idle:
                sock.close()


def test_a_run_that_never_returns_gets_504_and_its_worker_is_replaced(module: Path, tmp_path: Path) -> None:
    with serving(module, env=_env(tmp_path, run_timeout_s="1")) as server:
        wait_ready(server)
        _score_ok(server, 1)
        started = time.monotonic()
        r = httpx.post(server.url + "/score", json={"hang": True}, timeout=20)
        assert r.status_code == 504, r.text
        assert r.json()["type"] == "Timeout"
        assert time.monotonic() - started < 5
        # A fresh worker serves the next requests (init() runs again in it).
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.post(server.url + "/score", json={"n": 2}, timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.1)
        for n in range(10):
            _score_ok(server, n)
        assert server.proc.poll() is None
        assert "stuck in run()" in server.log()


def _write_keys(path: Path, *keys: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"sha256": [key_hash(k) for k in keys]}))
    os.replace(tmp, path)


def test_an_endpoint_with_keys_answers_only_to_either_key(module: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys.json"
    _write_keys(keys, "primary-key-1", "secondary-key-1")
    with serving(module, env=_env(tmp_path, auth_keys_file=str(keys))) as server:
        wait_ready(server)  # /healthz stays open (the agent probes it)
        url = server.url
        assert httpx.get(url + "/").status_code == 200  # liveness stays open, as on Azure
        for path in ("/score", "/swagger.json", "/metrics"):
            r = httpx.request("POST" if path == "/score" else "GET", url + path, json={"n": 1})
            assert r.status_code == 401, (path, r.text)
            assert r.headers["www-authenticate"] == "Bearer"
        bad = httpx.post(url + "/score", json={"n": 1}, headers={"Authorization": "Bearer nope"})
        assert bad.status_code == 401
        for key in ("primary-key-1", "secondary-key-1"):
            ok = httpx.post(url + "/score", json={"n": 1}, headers={"Authorization": f"Bearer {key}"})
            assert ok.status_code == 200, ok.text
            assert httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200
        # Rotating the primary key: the server picks the new file up without a restart.
        _write_keys(keys, "primary-key-2", "secondary-key-1")
        deadline = time.monotonic() + 10
        old = {"Authorization": "Bearer primary-key-1"}
        while httpx.post(url + "/score", json={}, headers=old).status_code != 401:
            assert time.monotonic() < deadline, "the old primary key still works"
            time.sleep(0.2)
        ok = httpx.post(url + "/score", json={"n": 2}, headers={"Authorization": "Bearer primary-key-2"})
        assert ok.status_code == 200
        pid = server.proc.pid
    assert pid == server.proc.pid
    assert "primary-key" not in server.log() and "secondary-key" not in server.log()


def _trusting(ca_pem: Path) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca_pem))


@contextmanager
def _tls_server(module: Path, tmp_path: Path, ca_pem: Path) -> Iterator[str]:
    ca = make_ca()
    ca_pem.write_bytes(ca.cert_pem)
    issued = issue_server_cert(ca, "scoring", ["127.0.0.1", "localhost"])
    cert, key = tmp_path / "srv.crt", tmp_path / "srv.key"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(module), "--port", str(port)],
        env={**os.environ, **_env(tmp_path, tls_cert=str(cert), tls_key=str(key))},
        stdout=subprocess.DEVNULL,
        stderr=(tmp_path / "tls.stderr").open("wb"),
    )
    url = f"https://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (tmp_path / "tls.stderr").read_text()
            try:
                if httpx.get(url + "/healthz", verify=_trusting(ca_pem), timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline
            time.sleep(0.1)
        yield url
    finally:
        stop_server(Server(url, proc, tmp_path / "tls.stderr"))


def test_an_endpoint_with_tls_serves_https_and_a_client_with_another_ca_is_refused(
    module: Path, tmp_path: Path
) -> None:
    ca_pem = tmp_path / "ca.pem"
    with _tls_server(module, tmp_path, ca_pem) as url:
        r = httpx.post(url + "/score", json={"n": 1}, verify=_trusting(ca_pem))
        assert r.status_code == 200 and r.json() == {"echo": {"n": 1}}
        other = tmp_path / "other-ca.pem"
        other.write_bytes(make_ca("someone else").cert_pem)
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(url + "/", verify=_trusting(other))
        with pytest.raises(httpx.TransportError):
            httpx.get(url.replace("https://", "http://") + "/", timeout=5)
        host, port = url.removeprefix("https://").split(":")
        raw = socket.create_connection((host, int(port)))
        with _trusting(ca_pem).wrap_socket(raw, server_hostname=host) as tls:
            assert tls.version() in ("TLSv1.2", "TLSv1.3")


def test_a_slow_drip_head_does_not_stop_a_tls_endpoint(module: Path, tmp_path: Path) -> None:
    ca_pem = tmp_path / "ca.pem"
    with _tls_server(module, tmp_path, ca_pem) as url:
        host, port = url.removeprefix("https://").split(":")
        drips = [socket.create_connection((host, int(port))) for _ in range(20)]  # never handshake
        try:
            for n in range(5):
                r = httpx.post(url + "/score", json={"n": n}, verify=_trusting(ca_pem), timeout=10)
                assert r.status_code == 200
        finally:
            for sock in drips:
                sock.close()
