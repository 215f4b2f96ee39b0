"""``edgepack serve``, ``call`` and ``batch`` as a user runs them: real processes, real HTTP on
loopback, the real digits model in onnxruntime, and bundles an attacker has tampered with."""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from manifests.errors import RuntimeFailure
from packager.commands.local_cmds import read_records, scoring_url, server_message
from packager.sdk.scoring import post_score
from tests.conftest import REPO, Publisher, free_port, make_publisher
from tests.engines import EngineFailed, start_on_free_ports
from tests.factory import FAILING_SCORE_PY, Defect, Forge, default_files

README = REPO / "README.md"

Samples = dict[str, list[object]]


def edgepack(
    *args: str | Path, home: Path, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "packager", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(home),
    )


def _env(home: Path) -> dict[str, str]:
    return {**os.environ, "EDGEPACK_HOME": str(home), "COLUMNS": "200"}



def readme_call(base: str, home: Path) -> subprocess.CompletedProcess[str]:
    """The README's ``edgepack call … --data '…'`` command, run by a shell as a reader would
    paste it, against ``base`` instead of the README's port."""
    found = re.search(r"^edgepack call http://127\.0\.0\.1:8890 --data '[^']*'$", README.read_text(), re.M)
    assert found is not None, "the README's 'edgepack call --data' example"
    command = found.group(0).replace("http://127.0.0.1:8890", base)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return subprocess.run(
        ["bash", "-c", command], capture_output=True, text=True, timeout=120, env={**_env(home), "PATH": path}
    )


def write_trust(path: Path, publisher: Publisher) -> Path:
    path.write_text(publisher.trust.model_dump_json())
    return path


@contextlib.contextmanager
def serving(bundle: Path, trust: Path, home: Path, *extra: str) -> Iterator[str]:
    """Run ``edgepack serve`` until the block ends; yield its base URL once it is ready."""
    home.mkdir(parents=True, exist_ok=True)

    def launch(ports: list[int]) -> tuple[subprocess.Popen[str], str]:
        log = home / f"serve-{ports[0]}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "packager", "serve", str(bundle), "--port", str(ports[0]),
                 "--trust", str(trust), *extra],
                stdout=out, stderr=subprocess.STDOUT, env=_env(home), text=True,
            )  # fmt: skip
        base = f"http://127.0.0.1:{ports[0]}"
        deadline = time.monotonic() + 90
        while proc.poll() is None:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/healthz", timeout=2).status_code == 200:
                    return proc, base
            if time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                pytest.fail(f"serve did not become ready:\n{log.read_text()}")
            time.sleep(0.1)
        raise EngineFailed(f"serve exited with {proc.returncode}:\n{log.read_text()}")

    proc, base = start_on_free_ports("edgepack serve", 1, launch)
    try:
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- serve and call ------------------------------------------------------------------------


def test_serve_and_call_score_the_digits_model_over_http(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher, digits_samples: Samples
) -> None:
    home = tmp_path / "home"
    trust = write_trust(tmp_path / "trust.json", publisher)
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"data": digits_samples["data"]}))

    with serving(digits_bundle, trust, home) as base:
        direct = httpx.post(base + "/score", content=request.read_bytes(), timeout=30)
        called = edgepack("call", base, "--file", request, home=home)
        failed = edgepack("call", base + "/score", "--data", '{"data": [[1, 2]]}', home=home)
        as_in_readme = readme_call(base, home)
        with pytest.raises(RuntimeFailure, match=r"run\(\) raised .*reshape"):  # what service.run() raises
            post_score(base, b'{"data": [[1, 2]]}')

    assert direct.status_code == 200
    assert direct.json()["predictions"] == digits_samples["expected"]
    assert called.returncode == 0, called.stderr
    assert json.loads(called.stdout)["predictions"] == digits_samples["expected"]
    # The README's example, typed as it stands (one 8x8 image of a zero), runs.
    assert as_in_readme.returncode == 0, as_in_readme.stderr
    assert json.loads(as_in_readme.stdout)["predictions"] == [0]
    # run() raised: one line with the status and the server's reason, and the exit code of a
    # module that failed (5), not of a transfer that failed (4)
    assert failed.returncode == 5, failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    assert "HTTP 500" in failed.stderr and "run() raised" in failed.stderr and "reshape" in failed.stderr
    # the module was unpacked into $EDGEPACK_HOME/cache, under its manifest digest
    modules = list((home / "cache" / "modules").iterdir())
    assert len(modules) == 1 and (modules[0] / "model" / "digits.onnx").is_file()


def test_call_says_what_to_check_when_nothing_listens(tmp_path: Path) -> None:
    result = edgepack(
        "call", f"127.0.0.1:{free_port()}", "--data", "{}", "--timeout", "5", home=tmp_path
    )
    assert result.returncode == 4
    assert len(result.stderr.strip().splitlines()) == 1
    assert "cannot connect" in result.stderr and "running" in result.stderr


def test_serve_with_two_workers(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher, digits_samples: Samples
) -> None:
    trust = write_trust(tmp_path / "trust.json", publisher)
    body = json.dumps({"data": digits_samples["data"][:5]})
    with serving(digits_bundle, trust, tmp_path / "home", "--workers", "2") as base:
        # /healthz answers from whichever worker the kernel picks: the other one may still be
        # in init() (answering 503 NotReady, as documented) until the metrics count both ready.
        deadline = time.monotonic() + 60
        while "edgepack_ready_workers 2" not in httpx.get(base + "/metrics", timeout=5).text:
            assert time.monotonic() < deadline, "the second worker never became ready"
            time.sleep(0.1)
        answers = [httpx.post(base + "/score", content=body, timeout=30).json() for _ in range(8)]
    assert all(a["predictions"] == digits_samples["expected"][:5] for a in answers)


def test_call_gives_up_after_its_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) but never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        result = edgepack("call", f"http://127.0.0.1:{port}", "--data", "{}", "--timeout", "0.5",
                          home=tmp_path)
    assert result.returncode == 4
    assert "no answer within 0.5 s" in result.stderr


def test_call_refuses_a_body_that_is_not_json(tmp_path: Path) -> None:
    result = edgepack("call", "http://127.0.0.1:9", "--data", "{oops", home=tmp_path)
    assert result.returncode == 2
    assert "--data: not valid JSON" in result.stderr


@pytest.mark.parametrize(
    "defect",
    [
        Defect.TAMPERED_BYTE,
        Defect.UNTRUSTED_KEY,
        Defect.ADDED_MEMBER,
        Defect.REMOVED_MEMBER,
        Defect.DOTDOT_PATH,
        Defect.ABSOLUTE_PATH,
        Defect.SYMLINK,
        Defect.HARDLINK,
        Defect.UNSAFE_MANIFEST_PATH,
    ],
)
def test_serve_refuses_what_verify_refuses(tmp_path: Path, defect: Defect) -> None:
    forge = Forge()
    bundle = tmp_path / "evil.edgepack"
    bundle.write_bytes(forge.bundle(defect))
    trust = tmp_path / "trust.json"
    trust.write_text(forge.trust.model_dump_json())
    cache = tmp_path / "cache"

    verified = edgepack("verify", bundle, "--trust", trust, home=tmp_path)
    served = edgepack(
        "serve", bundle, "--port", str(free_port()), "--trust", trust, "--cache", cache,
        home=tmp_path, timeout=60,
    )

    assert (verified.returncode, served.returncode) == (3, 3)
    lines = served.stderr.strip().splitlines()
    assert len(lines) == 1 and defect.reason in lines[0], served.stderr
    assert served.stderr == verified.stderr
    assert "scoring" not in served.stdout
    assert not (cache / "modules").exists() or not any((cache / "modules").iterdir())


def test_serve_refuses_the_real_bundle_with_one_changed_byte(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher
) -> None:
    data = bytearray(digits_bundle.read_bytes())
    with tarfile.open(digits_bundle) as tar:
        model = max(tar.getmembers(), key=lambda m: m.size)  # the ONNX model's blob
    data[model.offset_data + model.size // 2] ^= 0x40
    bundle = tmp_path / "digits-1.edgepack"
    bundle.write_bytes(bytes(data))
    trust = write_trust(tmp_path / "trust.json", publisher)

    served = edgepack("serve", bundle, "--port", str(free_port()), "--trust", trust,
                      "--cache", tmp_path / "cache", home=tmp_path, timeout=60)

    assert served.returncode == 3
    assert served.stderr.strip().count("\n") == 0
    assert f"content of blob sha256:{model.name.rsplit('/', 1)[1]}" in served.stderr
    blob = tmp_path / "cache" / "blobs" / "sha256" / model.name.rsplit("/", 1)[1]
    assert not blob.exists()


def test_serve_refuses_a_signer_it_does_not_trust(tmp_path: Path, digits_bundle: Path) -> None:
    stranger = write_trust(tmp_path / "other.json", make_publisher())
    served = edgepack("serve", digits_bundle, "--port", str(free_port()), "--trust", stranger,
                      "--cache", tmp_path / "cache", home=tmp_path, timeout=60)
    assert served.returncode == 3
    assert "untrusted key" in served.stderr
    assert not (tmp_path / "cache" / "modules").exists()


# --- batch ---------------------------------------------------------------------------------


def test_batch_reports_a_bad_record_and_scores_the_rest(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher, digits_samples: Samples
) -> None:
    trust = write_trust(tmp_path / "trust.json", publisher)
    rows = digits_samples["data"][:12]
    lines = [json.dumps({"data": [row]}) for row in rows]
    lines.insert(4, '{"data": [[1, 2, 3')  # cut off mid-record
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n")

    result = edgepack("batch", digits_bundle, "--input", tmp_path / "in.jsonl",
                      "--output", tmp_path / "out.jsonl", "--trust", trust,
                      "--cache", tmp_path / "cache", home=tmp_path)

    assert result.returncode == 1, result.stderr
    assert "1 of 13 record(s) failed" in result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["index"] for r in out] == list(range(13))
    assert "invalid JSON" in out[4]["error"] and "output" not in out[4]
    assert out[4]["source"].endswith("in.jsonl:5")
    good = [r for i, r in enumerate(out) if i != 4]
    assert [r["output"]["predictions"][0] for r in good] == digits_samples["expected"][:12]


def test_batch_over_a_folder_of_json_files(
    tmp_path: Path, digits_bundle: Path, publisher: Publisher, digits_samples: Samples
) -> None:
    trust = write_trust(tmp_path / "trust.json", publisher)
    folder = tmp_path / "requests"
    folder.mkdir()
    for i, row in enumerate(digits_samples["data"][:3]):
        (folder / f"req-{i:02d}.json").write_text(json.dumps({"data": [row]}))
    (folder / "notes.txt").write_text("not a request")

    result = edgepack("batch", digits_bundle, "--input", folder, "--output",
                      tmp_path / "out.jsonl", "--trust", trust, "--cache", tmp_path / "cache",
                      home=tmp_path)

    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [Path(r["source"]).name for r in out] == ["req-00.json", "req-01.json", "req-02.json"]
    assert [r["output"]["predictions"] for r in out] == [[e] for e in digits_samples["expected"][:3]]


def test_batch_stops_before_writing_when_init_fails(tmp_path: Path) -> None:
    forge = Forge()
    files = {**default_files(), "src/score.py": FAILING_SCORE_PY}
    bundle = tmp_path / "broken.edgepack"
    bundle.write_bytes(forge.bundle(files=files))
    trust = tmp_path / "trust.json"
    trust.write_text(forge.trust.model_dump_json())
    (tmp_path / "in.json").write_text('[{"data": [1]}, {"data": [2]}]')

    result = edgepack("batch", bundle, "--input", tmp_path / "in.json", "--output",
                      tmp_path / "out.jsonl", "--trust", trust, "--cache", tmp_path / "cache",
                      home=tmp_path)

    assert result.returncode == 5
    assert "init() failed: RuntimeError: model could not be loaded" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_batch_scores_a_json_array_with_the_forge_module(tmp_path: Path) -> None:
    forge = Forge()
    bundle = tmp_path / "demo.edgepack"
    bundle.write_bytes(forge.bundle())
    trust = tmp_path / "trust.json"
    trust.write_text(forge.trust.model_dump_json())
    (tmp_path / "in.json").write_text('[{"data": [1, 2]}, {"data": 5}, {"data": [5]}]')

    result = edgepack("batch", bundle, "--input", tmp_path / "in.json", "--output",
                      tmp_path / "out.jsonl", "--trust", trust, "--cache", tmp_path / "cache",
                      "--allow-failures", home=tmp_path)

    assert result.returncode == 0, result.stderr
    out = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert out[0]["output"] == {"result": [2, 4]}
    assert out[1]["error"].startswith("TypeError")  # run() iterates over 5
    assert out[2]["output"] == {"result": [10]}
    assert "2 ok, 1 failed" in result.stdout


# --- pure parts ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("127.0.0.1:8890", "http://127.0.0.1:8890/score"),
        ("http://127.0.0.1:8890/", "http://127.0.0.1:8890/score"),
        ("http://host:1/v1/predict", "http://host:1/v1/predict"),
        ("https://host/score?x=1", "https://host/score?x=1"),
    ],
)
def test_scoring_url(given: str, expected: str) -> None:
    assert scoring_url(given) == expected


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"error": "cannot reshape\\n  array", "type": "ValueError"}',
         "ValueError: cannot reshape array"),
        (b'{"error": "BadInput: no body", "type": "BadInput"}', "BadInput: no body"),
        (b'{"error": {"message": "nope", "type": "x"}}', "nope"),
        (b'{"detail": "Not Found"}', "Not Found"),
        (b"<html>\n<h1>Bad Gateway</h1></html>", "<html> <h1>Bad Gateway</h1></html>"),
        (b"", "(empty response)"),
    ],
)
def test_server_message_is_one_line(body: bytes, expected: str) -> None:
    assert server_message(body) == expected


def test_read_records_counts_what_it_yields(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_text('{"a": 1}\n\n  \n{"a": 2}\r\n{bad\n')
    total, records = read_records(path)
    got = list(records)
    assert total == len(got) == 3
    assert [r.source.rsplit(":", 1)[1] for r in got] == ["1", "4", "5"]
    assert got[1].body == '{"a": 2}' and got[2].problem is not None
