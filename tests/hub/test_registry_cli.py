"""The registry commands of the ``edgepack`` CLI, run as a user runs them, against a real hub."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from manifests.digests import sha256_digest
from manifests.signing import public_key_pem
from tests.conftest import Publisher
from tests.engines import EngineFailed, start_on_free_ports
from tests.factory import Defect, Forge
from tests.hub.conftest import HubFactory, RunningHub

pytestmark = pytest.mark.both_blob_stores

EDGEPACK = str(Path(sys.executable).parent / "edgepack")


def cli_env(home: Path, hub: RunningHub | None = None) -> dict[str, str]:
    """The environment of a user's shell with ``home`` as ``EDGEPACK_HOME``, logged in to ``hub``
    through its variables (none of this machine's own ``EDGEPACK_*``), wide and without colour."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update({"EDGEPACK_HOME": str(home), "COLUMNS": "200", "NO_COLOR": "1"})
    if hub is not None:
        env.update({"EDGEPACK_HUB_URL": hub.url, "EDGEPACK_TOKEN": hub.admin_token})
    return env


def run(
    home: Path, *args: str, hub: RunningHub | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    env = cli_env(home, hub)
    return subprocess.run([EDGEPACK, *args], env=env, capture_output=True, text=True, timeout=timeout)


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_login_register_list_show_download_delete(hub: HubFactory, tmp_path: Path) -> None:
    running = hub()
    home = tmp_path / "home"
    bad = run(home, "login", "--hub", running.url, "--token", "wrong")
    assert bad.returncode == 2 and "admin token is not valid" in bad.stderr
    login = run(home, "login", "--hub", running.url, "--token", running.admin_token)
    assert login.returncode == 0, login.stderr
    assert json.loads((home / "config.json").read_text())["hub_url"] == running.url

    model_file = tmp_path / "digits.onnx"
    model_file.write_bytes(b"onnx" * 10_000)
    folder = tmp_path / "resnet"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 3000)
    (folder / "sub" / "labels.txt").write_bytes(b"cat\n")

    one = ok_json(
        run(home, "model", "register", "-n", "digits", "-p", str(model_file), "--tag", "stage=dev", "--json")
    )
    two = ok_json(
        run(
            home,
            "model",
            "register",
            "-n",
            "digits",
            "-p",
            str(model_file),
            "--tag",
            "stage=prod",
            "--property",
            "accuracy=0.97",
            "--description",
            "same weights",
            "--json",
        )
    )
    assert (one["version"], two["version"]) == (1, 2)
    assert two["files"] == [
        {"path": "digits.onnx", "digest": sha256_digest(model_file.read_bytes()), "size": 40_000}
    ]
    text = run(home, "model", "register", "-n", "resnet", "-p", str(folder))
    assert text.returncode == 0 and "registered resnet:1" in text.stdout

    prod = ok_json(run(home, "model", "list", "--tag", "stage=prod", "--json"))
    assert [(m["name"], m["version"]) for m in prod] == [("digits", 2)]
    table = run(home, "model", "list")
    assert "resnet" in table.stdout and "stage=prod" in table.stdout
    shown = ok_json(run(home, "model", "show", "digits", "--json"))
    assert shown["version"] == 2 and shown["properties"] == {"accuracy": "0.97"}

    updated = ok_json(
        run(home, "model", "update", "digits:1", "--tag", "stage=old", "--remove-tag", "x", "--json")
    )
    assert updated["tags"] == {"stage": "old"}

    out = tmp_path / "downloaded"
    assert run(home, "model", "download", "resnet:1", "-o", str(out)).returncode == 0
    assert (out / "resnet" / "weights.bin").read_bytes() == b"w" * 3000
    assert (out / "resnet" / "sub" / "labels.txt").read_bytes() == b"cat\n"

    bad_name = run(home, "model", "register", "-n", "Bad Name", "-p", str(model_file))
    assert bad_name.returncode == 2 and "model name 'Bad Name' is invalid" in bad_name.stderr

    missing = run(home, "model", "show", "digits:9")
    assert missing.returncode == 2 and "known versions: 1, 2" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    assert run(home, "model", "delete", "digits:1").returncode == 0
    assert [m["version"] for m in ok_json(run(home, "model", "list", "-n", "digits", "--json"))] == [2]
    gc = run(home, "hub", "gc", "--grace", "0")
    assert gc.returncode == 0 and "freed 0 unused blobs" in gc.stdout  # every blob is still in use


def test_push_and_module_commands(hub: HubFactory, tmp_path: Path, digits_bundle: Path, forge: Forge) -> None:
    running = hub()
    home = tmp_path / "home"
    pushed = ok_json(run(home, "push", str(digits_bundle), "--json", hub=running))
    assert (pushed["name"], pushed["version"], pushed["created"]) == ("digits", "1", True)
    again = run(home, "push", str(digits_bundle), hub=running)
    assert again.returncode == 0 and "already on the hub" in again.stdout

    listed = ok_json(run(home, "module", "list", "--json", hub=running))
    assert [(m["name"], m["version"]) for m in listed] == [("digits", "1")]
    shown = run(home, "module", "show", "digits:1", hub=running)
    assert shown.returncode == 0 and "src/score.py" in shown.stdout
    downloaded = run(home, "module", "download", "digits:1", "-o", str(tmp_path), hub=running)
    assert downloaded.returncode == 0, downloaded.stderr
    assert (tmp_path / "digits-1.edgepack").read_bytes() == digits_bundle.read_bytes()

    tampered = tmp_path / "tampered.edgepack"
    tampered.write_bytes(forge.bundle(Defect.TAMPERED_BYTE))
    refused = run(home, "push", str(tampered), hub=running)
    assert refused.returncode == 3
    assert Defect.TAMPERED_BYTE.reason in refused.stderr
    untrusted = tmp_path / "untrusted.edgepack"
    untrusted.write_bytes(forge.bundle(Defect.UNTRUSTED_KEY))
    refused = run(home, "push", str(untrusted), hub=running)
    assert refused.returncode == 3 and Defect.UNTRUSTED_KEY.reason in refused.stderr
    assert "edgepack hub serve --trust" in refused.stderr  # what to do is the hub's to say
    assert [m["name"] for m in ok_json(run(home, "module", "list", "--json", hub=running))] == ["digits"]


def test_no_hub_configured_is_a_one_line_error(tmp_path: Path) -> None:
    result = run(tmp_path / "home", "model", "list")
    assert result.returncode == 2
    assert "edgepack login" in result.stderr and len(result.stderr.strip().splitlines()) == 1



def test_hub_serve_runs_a_hub_the_cli_can_push_to(
    tmp_path: Path, publisher: Publisher, digits_bundle: Path
) -> None:
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(publisher.key.public_key()))
    data = tmp_path / "hub"
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update({"EDGEPACK_HOME": str(tmp_path / "home"), "COLUMNS": "200", "NO_COLOR": "1"})

    def launch(ports: list[int]) -> tuple[subprocess.Popen[str], str]:
        args = ["hub", "serve", "--data-dir", str(data), "--port", str(ports[0]), "--trust", str(pub)]
        proc = subprocess.Popen(
            [EDGEPACK, *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        url = f"http://127.0.0.1:{ports[0]}"
        deadline = time.monotonic() + 60
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/openapi.json", timeout=1).status_code == 200:
                    return proc, url
            time.sleep(0.1)
        proc.kill()
        output, _ = proc.communicate(timeout=30)
        raise EngineFailed(output)

    proc, url = start_on_free_ports("hub serve", 1, launch)
    try:
        token = (data / "admin_token").read_text().strip()
        home = tmp_path / "home"
        assert run(home, "login", "--hub", url, "--token", token).returncode == 0
        pushed = ok_json(run(home, "push", str(digits_bundle), "--json"))
        assert pushed["created"] is True
    finally:
        proc.terminate()
        output, _ = proc.communicate(timeout=30)
    assert f"dashboard    {url}/" in output
    assert str(data / "admin_token") in output
