"""A device checks the agent bundle ``install.sh`` downloads before any of the bundle's code
runs (security.md §18): the script served by a real hub runs here (as root, into a temporary
prefix) and refuses a bundle signed by a key its credentials (or, with a token, the script)
do not trust, one changed after signing, and one that is not the digest the script pins.

Each bundle's pip wheel leaves a marker file when it runs (pip is the first of the bundle's
code ``install.sh`` starts): a refused bundle leaves none, and nothing is installed. The
attacker of these tests sits between the device and the hub (a plain HTTP hub), changing what
the hub sends and the digest the script pins, as anyone on that path can.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import threading
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.agent_bundle import AgentBundle, BundleWheel
from manifests.canonical import canonical_json
from manifests.signing import TrustStore, envelope_bytes, sign_payload
from tests.conftest import Publisher, make_publisher
from tests.device_rootfs import DEVICE_ENV

PIP = "pip-24.0-py3-none-any.whl"
EDGEPACK = "edgepack-0.1.0-py3-none-any.whl"
TOKEN = "ep_join_" + "t" * 43
#: What the device checks and runs does not depend on the hub's SQL engine.
pytestmark = pytest.mark.sql_independent


def marker_pip(marker: Path) -> bytes:
    """A pip wheel whose ``python pip.whl/pip`` leaves ``marker`` (and installs nothing),
    holding the ``EDGEPACK_JOIN_TOKEN`` it inherited, if any."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as wheel:
        wheel.writestr("pip/__init__.py", "")
        code = (f"import os, pathlib\npathlib.Path({str(marker)!r})"
                ".write_text('ran ' + os.environ.get('EDGEPACK_JOIN_TOKEN', ''))\n")  # fmt: skip
        wheel.writestr("pip/__main__.py", code)
    return out.getvalue()


def signed_bundle(key: Ed25519PrivateKey, wheels: dict[str, bytes]) -> bytes:
    listed = [BundleWheel(name=n, size=len(d), digest="sha256:" + hashlib.sha256(d).hexdigest())
              for n, d in wheels.items()]  # fmt: skip
    bundle = AgentBundle(version="0.1.0", created=datetime.now(UTC), python="3.11", wheels={"amd64": listed})
    return envelope_bytes(sign_payload(bundle.model_dump(mode="json", by_alias=True), [key]))


def write_bundle(folder: Path, key: Ed25519PrivateKey, wheels: dict[str, bytes]) -> None:
    (folder / "amd64").mkdir(parents=True)
    for name, data in wheels.items():
        (folder / "amd64" / name).write_bytes(data)
    (folder / "bundle.json").write_bytes(signed_bundle(key, wheels))


class OnThePath:
    """An HTTP server between the device and the hub: it passes every request on, except the
    paths it answers itself, and may rewrite ``install.sh``."""

    def __init__(self, hub_url: str) -> None:
        self.hub_url = hub_url
        self.answers: dict[str, bytes] = {}
        self.rewrite_script: Callable[[bytes], bytes] = lambda script: script
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = outer.answers.get(self.path)
                if body is None:
                    got = httpx.get(outer.hub_url + self.path, timeout=30)
                    body = outer.rewrite_script(got.content) if self.path == "/install.sh" else got.content
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def pin(self, bundle_json: bytes) -> None:
        """Make the script the device gets pin ``bundle_json`` (and download from here)."""
        digest = "sha256:" + hashlib.sha256(bundle_json).hexdigest()
        self.rewrite_script = lambda script: re.sub(
            rb"\nBUNDLE_DIGEST=\S+\n", f"\nBUNDLE_DIGEST={digest}\n".encode(), script
        ).replace(self.hub_url.encode(), self.url.encode())


@pytest.fixture
def on_the_path() -> Iterator[Callable[[str], OnThePath]]:
    made: list[OnThePath] = []

    def start(hub_url: str) -> OnThePath:
        made.append(OnThePath(hub_url))
        return made[-1]

    yield start
    for proxy in made:
        proxy.server.shutdown()
        proxy.server.server_close()


def install(
    script: bytes, device: Path, how: list[str], env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``curl -fsS HUB/install.sh | sh -s -- HOW`` on this machine, into ``device``."""
    where = ["--prefix", str(device / "opt"), "--config-dir", str(device / "etc"),
             "--state-dir", str(device / "var"), "--no-start"]  # fmt: skip
    return subprocess.run(["sh", "-s", "--", *where, *how], input=script.decode(),
                          env={**DEVICE_ENV, **(env or {})}, capture_output=True, text=True, timeout=300,
                          check=False)  # fmt: skip


def how_to_install(
    running: Any, tmp_path: Path, enrolment: str, publishers: TrustStore | None = None
) -> list[str]:
    """``--credentials FILE`` (the admin enrolled the device; ``publishers``: the keys its
    file trusts, when not the hub's) or ``--token-file FILE``."""
    if enrolment == "token":
        (tmp_path / "token").write_text(TOKEN + "\n")
        return ["--token-file", str(tmp_path / "token")]
    with running.client() as http:
        answer = http.post("/api/v1/devices", json={"id": "edge-1", "tags": {}})
    assert answer.status_code == 201, answer.text
    credentials = answer.json()["device_credentials"]
    if publishers is not None:
        credentials["publishers"] = publishers.model_dump(mode="json")
    (tmp_path / "edge-1.json").write_text(json.dumps(credentials))
    return ["--credentials", str(tmp_path / "edge-1.json")]


@pytest.mark.parametrize(
    "enrolment", ["credentials", "token", "token in the environment", "token as argument"]
)
def test_a_bundle_a_trusted_publisher_signed_is_run_once_checked(
    hub: Any, publisher: Publisher, tmp_path: Path, enrolment: str
) -> None:
    # The control: the same marker is left when the bundle is the trusted one (its fake pip
    # then installs nothing, so the script stops there).
    marker = tmp_path / "bundle-code-ran"
    write_bundle(tmp_path / "bundle", publisher.key, {PIP: marker_pip(marker), EDGEPACK: b"agent"})
    running = hub(agent_bundle=tmp_path / "bundle")
    script = httpx.get(f"{running.url}/install.sh").content
    env, how = {}, []
    if enrolment == "token in the environment":
        env = {"EDGEPACK_JOIN_TOKEN": TOKEN}
    elif enrolment == "token as argument":
        how = ["--token", TOKEN]
    else:
        how = how_to_install(running, tmp_path, enrolment)
    done = install(script, tmp_path / "device", how, env)
    assert marker.exists(), done.stderr
    assert "nothing was installed" not in done.stderr
    # What the script starts does not inherit the token.
    assert marker.read_text() == "ran "
    warned = "warning: --token shows the token to every local user (ps); use --token-file FILE" in done.stderr
    assert warned == (enrolment == "token as argument")


ATTACKS = ["signed by another publisher", "changed after signing", "not the digest the script pins"]


@pytest.mark.parametrize("enrolment", ["credentials", "token"])
@pytest.mark.parametrize("attack", ATTACKS)
def test_a_bundle_the_device_does_not_trust_is_refused_before_its_code_runs(
    hub: Any,
    publisher: Publisher,
    on_the_path: Callable[[str], OnThePath],
    tmp_path: Path,
    attack: str,
    enrolment: str,
) -> None:
    write_bundle(tmp_path / "bundle", publisher.key, {PIP: b"the hub's pip", EDGEPACK: b"agent"})
    running = hub(agent_bundle=tmp_path / "bundle")
    marker = tmp_path / "bundle-code-ran"
    evil_pip = marker_pip(marker)
    path = on_the_path(running.url)
    if attack == "signed by another publisher":
        evil = signed_bundle(make_publisher().key, {PIP: evil_pip, EDGEPACK: b"agent"})
    else:  # the hub's signed bundle.json, its pip replaced, its signature kept
        envelope = json.loads(httpx.get(f"{running.url}/agent-bundle/bundle.json").content)
        for wheel in envelope["signed"]["wheels"]["amd64"]:
            if wheel["name"] == PIP:
                wheel.update(size=len(evil_pip), digest="sha256:" + hashlib.sha256(evil_pip).hexdigest())
        evil = canonical_json(envelope)
    path.answers = {"/agent-bundle/bundle.json": evil, f"/agent-bundle/amd64/{PIP}": evil_pip}
    if attack == "not the digest the script pins":
        path.rewrite_script = lambda script: script.replace(running.url.encode(), path.url.encode())
    else:
        path.pin(evil)
    script = httpx.get(f"{path.url}/install.sh").content

    done = install(script, tmp_path / "device", how_to_install(running, tmp_path, enrolment))
    assert not marker.exists(), f"the bundle's code ran before its check\n{done.stderr}"
    assert done.returncode == 3, done.stderr
    said = {
        "signed by another publisher": "bundle.json is signed by untrusted key(s) ",
        "changed after signing": "does not match its content (modified after signing)",
        "not the digest the script pins": "bundle.json is not the one this script names (digest differs)",
    }[attack]
    last = done.stderr.rstrip().splitlines()[-1]
    assert last.startswith("edgepack install: error: ") and said in last, done.stderr
    assert last.endswith(": nothing was installed")
    assert not (tmp_path / "device").exists()


@pytest.mark.parametrize(
    ("trusted", "said"),
    [
        ("another publisher", "bundle.json is signed by untrusted key(s) "),
        ("no publisher", "no trusted publisher keys to check bundle.json's signature with"),
        ("the hub's and another, both required", "bundle.json has 1 trusted signature(s), 2 required"),
    ],
)
def test_credentials_that_do_not_trust_the_hubs_bundle_refuse_it(
    hub: Any, publisher: Publisher, tmp_path: Path, trusted: str, said: str
) -> None:
    # The admin's credentials are the device's trust: a bundle they do not trust enough is
    # refused, whatever the hub that serves it trusts.
    marker = tmp_path / "bundle-code-ran"
    write_bundle(tmp_path / "bundle", publisher.key, {PIP: marker_pip(marker), EDGEPACK: b"agent"})
    running = hub(agent_bundle=tmp_path / "bundle")
    script = httpx.get(f"{running.url}/install.sh").content
    store = {
        "another publisher": make_publisher().trust,
        "no publisher": TrustStore(),
        "the hub's and another, both required": TrustStore(
            keys=[*publisher.trust.keys, *make_publisher().trust.keys], threshold=2
        ),
    }[trusted]
    done = install(script, tmp_path / "device", how_to_install(running, tmp_path, "credentials", store))
    assert not marker.exists(), f"the bundle's code ran before its check\n{done.stderr}"
    assert done.returncode == 3, done.stderr
    assert said in done.stderr.splitlines()[-1], done.stderr
    assert not (tmp_path / "device").exists()
