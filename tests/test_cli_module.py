"""The developer's CLI for modules: keygen, trust, init, build, verify, inspect.

Commands that succeed run in-process through Typer's CliRunner. Failures run as a real
``python -m packager`` subprocess, because turning an error into one line and an exit code
happens in ``packager.app.main()``, which is what a user's shell sees.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from manifests.errors import TrustError
from manifests.signing import TrustStore, key_id, load_public_key, public_key_pem
from packager.cli import app
from packager.inspect import open_verified
from packager.keys import read_trust
from tests.conftest import EXAMPLE, REPO
from tests.factory import FAILING_SCORE_PY, Defect, Forge, default_files


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private EDGEPACK_HOME with a fresh signing key in it."""
    path = tmp_path / "home"
    monkeypatch.setenv("EDGEPACK_HOME", str(path))
    monkeypatch.setenv("COLUMNS", "200")
    result = CliRunner().invoke(app, ["keygen"])
    assert result.exit_code == 0, result.output
    return path


@pytest.fixture
def project(tmp_path: Path, digits_model: Path) -> Path:
    """A copy of the digits example with its trained model in model/."""
    path = tmp_path / "digits"
    for name in ("score.py", "inferenceconfig.json", "deploymentconfig.json"):
        (path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(EXAMPLE / name, path / name)
    shutil.copytree(digits_model, path / "model")
    return path


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m packager ARGS`` the way a shell would."""
    full_env = {**os.environ, "COLUMNS": "200", **(env or {})}
    full_env["PYTHONPATH"] = str(REPO) + os.pathsep + full_env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "packager", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def build_args(project: Path, home: Path, *extra: str) -> list[str]:
    return [
        "build",
        "--ic", str(project / "inferenceconfig.json"),
        "--dc", str(project / "deploymentconfig.json"),
        "-m", str(project / "model" / "digits.onnx"),
        "-n", "digits",
        "-v", "1",
        "-k", str(home / "keys" / "publisher.key"),
        "-o", str(project / "dist"),
        *extra,
    ]  # fmt: skip


def one_error_line(proc: subprocess.CompletedProcess[str]) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ")
    return lines[0]


# --- keys and trust -------------------------------------------------------------------------


def test_keygen_writes_a_private_key_0600_a_pub_and_trusts_it(home: Path) -> None:
    private = home / "keys" / "publisher.key"
    public = home / "keys" / "publisher.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    pub = load_public_key(public.read_bytes())
    store = TrustStore.model_validate_json((home / "trust.json").read_text())
    assert [k.keyid for k in store.keys] == [key_id(pub)]


def test_keygen_refuses_to_overwrite_without_force(home: Path) -> None:
    before = (home / "keys" / "publisher.key").read_bytes()
    proc = cli("keygen", cwd=home, env={"EDGEPACK_HOME": str(home)})
    assert proc.returncode == 2
    assert "already exists; pass --force" in one_error_line(proc)
    assert (home / "keys" / "publisher.key").read_bytes() == before
    result = CliRunner().invoke(app, ["keygen", "--force"])
    assert result.exit_code == 0
    assert (home / "keys" / "publisher.key").read_bytes() != before
    # Both the old and the new public key are now trusted.
    assert len(read_trust([home / "trust.json"]).keys) == 2


def test_keygen_to_a_path_and_trust_add_and_list(home: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    other = tmp_path / "team" / "ci.key"
    result = runner.invoke(app, ["keygen", str(other), "--no-trust"])
    assert result.exit_code == 0, result.output
    assert other.with_suffix(".pub").exists()
    kid = key_id(load_public_key(other.with_suffix(".pub").read_bytes()))
    assert kid not in {k.keyid for k in read_trust([home / "trust.json"]).keys}
    assert kid in result.output
    result = runner.invoke(app, ["trust", "add", str(other.with_suffix(".pub"))])
    assert result.exit_code == 0, result.output
    listed = runner.invoke(app, ["trust", "list"])
    assert kid in listed.output
    assert "ci" in listed.output


# --- init and build -------------------------------------------------------------------------


def test_init_scaffolds_files_that_then_build(home: Path, tmp_path: Path, digits_model: Path) -> None:
    target = tmp_path / "new-model"
    result = CliRunner().invoke(app, ["init", str(target)])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in target.iterdir()) == [
        "deploymentconfig.json",
        "inferenceconfig.json",
        "score.py",
    ]
    shutil.copy(digits_model / "digits.onnx", target / "model.onnx")
    proc = cli(
        "build", "--ic", "inferenceconfig.json", "--dc", "deploymentconfig.json",
        "-m", "model.onnx", "-n", "mine", "-v", "0.1.0",
        cwd=target, env={"EDGEPACK_HOME": str(home)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    verified = open_verified(target / "dist" / "mine-0.1.0.edgepack", read_trust([home / "trust.json"]))
    paths = [f.path for f in verified.manifest.files]
    assert "model/model.onnx" in paths
    assert "src/score.py" in paths
    assert verified.manifest.resources.memory_mb == 512


def test_init_refuses_a_folder_that_is_not_empty(tmp_path: Path) -> None:
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep.txt").write_text("mine")
    proc = cli("init", str(tmp_path / "x"), cwd=tmp_path)
    assert proc.returncode == 2
    assert "not empty" in one_error_line(proc)


def test_build_writes_a_verifiable_bundle_with_the_model_at_model_digits_onnx(
    home: Path, project: Path
) -> None:
    result = CliRunner().invoke(app, build_args(project, home))
    assert result.exit_code == 0, result.output
    bundle = project / "dist" / "digits-1.edgepack"
    assert "digits-1.edgepack" in result.output
    verified = open_verified(bundle, read_trust([home / "trust.json"]))
    paths = [f.path for f in verified.manifest.files]
    assert "model/digits.onnx" in paths
    assert verified.manifest.entry_script == "src/score.py"
    assert verified.manifest.runtime.python.requirements == ["onnxruntime", "numpy"]
    assert verified.manifest.resources.cpu == 0.5


def test_build_twice_gives_the_same_bytes(home: Path, project: Path) -> None:
    runner = CliRunner()
    assert runner.invoke(app, build_args(project, home)).exit_code == 0
    first = (project / "dist" / "digits-1.edgepack").read_bytes()
    assert runner.invoke(app, build_args(project, home, "-o", str(project / "d2"))).exit_code == 0
    assert (project / "d2" / "digits-1.edgepack").read_bytes() == first


def test_misspelt_inferenceconfig_is_exit_2_one_line_naming_file_and_field(
    home: Path, project: Path
) -> None:
    ic = project / "inferenceconfig.json"
    ic.write_text(ic.read_text().replace('"entryScript"', '"entryScipt"'))
    proc = cli(*build_args(project, home), cwd=project)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert str(ic) in line
    assert "'entryScipt'" in line and "did you mean 'entryScript'" in line
    assert not (project / "dist").exists()


def test_misspelt_deploymentconfig_names_the_nested_field(home: Path, project: Path) -> None:
    dc = project / "deploymentconfig.json"
    dc.write_text(dc.read_text().replace('"memoryInGB"', '"memoryInGb"'))
    proc = cli(*build_args(project, home), cwd=project)
    assert proc.returncode == 2
    line = one_error_line(proc)
    assert f"{dc}: unknown field 'containerResourceRequirements.memoryInGb'" in line
    assert "did you mean 'memoryInGB'" in line


def test_malformed_json_names_file_line_and_column(home: Path, project: Path) -> None:
    dc = project / "deploymentconfig.json"
    dc.write_text('{\n    "computeType": "local",\n    "port": 8890\n    "x": 1\n}\n')
    proc = cli(*build_args(project, home), cwd=project)
    assert proc.returncode == 2
    assert f"{dc}:4:5: invalid JSON" in one_error_line(proc)


@pytest.mark.parametrize("missing", ["score.py", "model/digits.onnx"])
def test_missing_entry_script_or_model_writes_nothing(
    home: Path, project: Path, missing: str
) -> None:
    (project / "dist").mkdir()
    (project / missing).unlink()
    proc = cli(*build_args(project, home), cwd=project)
    assert proc.returncode == 2
    assert "not found" in one_error_line(proc)
    # Not the bundle, and no temp file beside where it would have been.
    assert list((project / "dist").iterdir()) == []


def test_missing_signing_key_says_how_to_make_one(home: Path, project: Path) -> None:
    proc = cli(*build_args(project, home, "-k", str(home / "nope.key")), cwd=project)
    assert proc.returncode == 2
    assert "edgepack keygen" in one_error_line(proc)


def test_bad_tag_is_refused(home: Path, project: Path) -> None:
    proc = cli(*build_args(project, home, "--tag", "novalue"), cwd=project)
    assert proc.returncode == 2
    assert "key=value" in one_error_line(proc)


# --- verify and inspect ---------------------------------------------------------------------


@pytest.fixture
def built(home: Path, project: Path) -> Path:
    result = CliRunner().invoke(app, build_args(project, home))
    assert result.exit_code == 0, result.output
    return project / "dist" / "digits-1.edgepack"


def test_verify_ok_with_the_default_trust_store_and_with_a_pub(built: Path, home: Path) -> None:
    runner = CliRunner()
    result = runner.invoke(app, ["verify", str(built)])
    assert result.exit_code == 0, result.output
    assert "verified digits:1" in result.output
    pub = home / "keys" / "publisher.pub"
    result = runner.invoke(app, ["verify", str(built), "--trust", str(pub)])
    assert result.exit_code == 0, result.output


def test_verify_tampered_bundle_is_exit_3_naming_the_blob(built: Path, home: Path) -> None:
    manifest = open_verified(built, read_trust([home / "trust.json"])).manifest
    model = next(f for f in manifest.files if f.path == "model/digits.onnx")
    with tarfile.open(built, mode="r:") as tar:
        at = tar.getmember("blobs/sha256/" + model.digest.split(":")[1]).offset_data
    data = bytearray(built.read_bytes())
    data[at + model.size // 2] ^= 0x01
    built.write_bytes(data)
    proc = cli("verify", str(built), cwd=built.parent, env={"EDGEPACK_HOME": str(home)})
    assert proc.returncode == 3
    line = one_error_line(proc)
    assert str(built) in line
    assert f"{model.digest} does not match its digest" in line


def test_verify_with_someone_elses_key_is_exit_3(built: Path, home: Path, tmp_path: Path) -> None:
    assert CliRunner().invoke(app, ["keygen", str(tmp_path / "x.key"), "--no-trust"]).exit_code == 0
    proc = cli("verify", str(built), "--trust", str(tmp_path / "x.pub"), cwd=tmp_path)
    assert proc.returncode == 3
    assert "untrusted key" in one_error_line(proc)


def test_verify_without_any_trust_says_what_to_do(built: Path, tmp_path: Path) -> None:
    proc = cli("verify", str(built), cwd=tmp_path, env={"EDGEPACK_HOME": str(tmp_path / "empty")})
    assert proc.returncode == 2
    assert "--trust" in one_error_line(proc)


def test_verify_missing_file_is_exit_2(tmp_path: Path, home: Path) -> None:
    proc = cli("verify", str(tmp_path / "nope.edgepack"), cwd=tmp_path, env={"EDGEPACK_HOME": str(home)})
    assert proc.returncode == 2
    assert "bundle not found" in one_error_line(proc)


def test_inspect_shows_name_version_signer_entry_and_files(built: Path, home: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(built)])
    assert result.exit_code == 0, result.output
    out = result.output
    manifest = open_verified(built, read_trust([home / "trust.json"])).manifest
    signer = key_id(load_public_key((home / "keys" / "publisher.pub").read_bytes()))
    assert "digits:1" in out
    assert signer in out
    assert "entry script src/score.py" in out
    assert "edgepack/runtime:py311" in out
    # Narrow terminals fold long cells over several lines; join each column's pieces back.
    rows = [line.split("│")[1:-1] for line in out.splitlines() if line.startswith("│")]
    paths, sizes, digests = ("".join(r[i].strip() for r in rows) for i in range(3))
    for f in manifest.files:
        assert f.path in paths
        assert f"{f.size:,}" in sizes
        assert f.digest in digests
    assert "…" not in out


def test_inspect_never_truncates_a_digest_on_a_narrow_terminal(built: Path) -> None:
    proc = cli("inspect", str(built), cwd=built.parent, env={"COLUMNS": "60"})
    assert proc.returncode == 0, proc.stderr
    assert "…" not in proc.stdout


def test_inspect_json_prints_the_signed_manifest(built: Path) -> None:
    result = CliRunner().invoke(app, ["inspect", str(built), "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert doc["signed"]["name"] == "digits"
    assert len(doc["signatures"]) == 1


def test_inspect_of_something_that_is_not_a_bundle_is_exit_3(tmp_path: Path) -> None:
    junk = tmp_path / "junk.edgepack"
    junk.write_bytes(b"not a tar" * 200)
    proc = cli("inspect", str(junk), cwd=tmp_path)
    assert proc.returncode == 3
    assert "not a module bundle" in one_error_line(proc)


@pytest.mark.parametrize("defect", list(Defect), ids=str)
def test_verify_refuses_every_defective_bundle_naming_the_reason(
    tmp_path: Path, defect: Defect
) -> None:
    forge = Forge()
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(forge.publisher.public_key()))
    bundle = tmp_path / "demo-1.edgepack"
    bundle.write_bytes(forge.bundle(defect))
    result = CliRunner().invoke(app, ["verify", str(bundle), "--trust", str(pub)])
    assert isinstance(result.exception, TrustError), result.output
    assert defect.reason in str(result.exception)
    assert "verified" not in result.output


def test_forge_modules_really_run_and_the_failing_one_fails_in_init(tmp_path: Path) -> None:
    """Agent and hub tests rely on the forge's default module being runnable."""
    forge = Forge()
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(forge.publisher.public_key()))
    (tmp_path / "in.jsonl").write_text('{"data": [1, 2, 3]}\n')
    good = tmp_path / "demo-1.edgepack"
    good.write_bytes(forge.bundle())
    bad = tmp_path / "bad-1.edgepack"
    bad.write_bytes(forge.bundle(files={**default_files(), "src/score.py": FAILING_SCORE_PY}))
    env = {"EDGEPACK_HOME": str(tmp_path / "home")}
    args = ["-i", str(tmp_path / "in.jsonl"), "--trust", str(pub)]
    proc = cli("batch", str(good), "-o", str(tmp_path / "good.jsonl"), *args, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "good.jsonl").read_text())["output"] == {"result": [2, 4, 6]}
    proc = cli("batch", str(bad), "-o", str(tmp_path / "bad.jsonl"), *args, cwd=tmp_path, env=env)
    assert proc.returncode == 5
    assert "model could not be loaded" in one_error_line(proc)
