"""Building signed modules: reproducible bytes, deduplicated content, layout, clean failures."""

from __future__ import annotations

import io
import os
import shutil
import tarfile
from datetime import UTC, datetime
from pathlib import Path

import pytest

from manifests.azureml import InferenceConfig, parse_config
from manifests.errors import ConfigError, TrustError
from manifests.signing import generate_private_key
from packager.build import BuildSpec, build_module, spec_from_configs
from packager.inspect import open_verified
from tests.conftest import Publisher

CREATED = datetime(2026, 3, 1, tzinfo=UTC)


def members(bundle: Path) -> list[str]:
    with tarfile.open(bundle, mode="r:") as tar:
        return tar.getnames()


def spec_for(
    src: Path, model: Path, *, source_dir: Path | None = None, created: datetime | None = None
) -> BuildSpec:
    return BuildSpec(
        name="digits",
        version="1",
        entry_script=src / "score.py",
        model=model,
        source_dir=source_dir,
        created=created,
    )


def test_same_inputs_give_the_same_bytes_in_two_output_folders(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    spec = spec_for(digits_source, digits_source / "digits.onnx", source_dir=digits_source)
    one = build_module(spec, publisher.key, tmp_path / "a")
    two = build_module(spec, publisher.key, tmp_path / "b")
    assert one.path != two.path
    assert one.path.read_bytes() == two.path.read_bytes()
    assert one.manifest_digest == two.manifest_digest


def test_created_comes_from_source_date_epoch_else_the_newest_input(
    digits_source: Path, publisher: Publisher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = tmp_path / "src"
    shutil.copytree(digits_source, src)
    for p in src.iterdir():
        os.utime(p, (1_700_000_000, 1_700_000_000))
    os.utime(src / "digits.onnx", (1_750_000_000, 1_750_000_000))
    spec = spec_for(src, src / "digits.onnx")
    monkeypatch.delenv("SOURCE_DATE_EPOCH", raising=False)
    assert build_module(spec, publisher.key, tmp_path / "a").manifest.created == datetime.fromtimestamp(
        1_750_000_000, UTC
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "1600000000")
    assert build_module(spec, publisher.key, tmp_path / "b").manifest.created == datetime.fromtimestamp(
        1_600_000_000, UTC
    )
    monkeypatch.setenv("SOURCE_DATE_EPOCH", "yesterday")
    with pytest.raises(ConfigError, match="SOURCE_DATE_EPOCH"):
        build_module(spec, publisher.key, tmp_path / "c")


def test_duplicate_content_is_stored_once(publisher: Publisher, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text("def init():\n    pass\n\n\ndef run(raw):\n    return raw\n")
    (src / "labels.txt").write_bytes(b"same bytes\n")
    (src / "labels-copy.txt").write_bytes(b"same bytes\n")
    model = tmp_path / "weights"
    model.mkdir()
    (model / "a.bin").write_bytes(b"W" * 10_000)
    (model / "b.bin").write_bytes(b"W" * 10_000)
    result = build_module(
        spec_for(src, model, source_dir=src, created=CREATED), publisher.key, tmp_path / "dist"
    )
    assert len(result.manifest.files) == 5
    assert len({f.digest for f in result.manifest.files}) == 3
    names = members(result.path)
    assert names[0] == "module.json"
    assert len(names) == 1 + 3
    # The archive holds the 10 kB model once, not twice.
    assert result.total_bytes < 2 * 10_000
    open_verified(result.path, publisher.trust)


def test_model_file_lands_under_model_by_its_base_name(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    result = build_module(
        spec_for(digits_source, digits_source / "digits.onnx", created=CREATED),
        publisher.key,
        tmp_path,
    )
    assert [f.path for f in result.manifest.files] == ["model/digits.onnx", "src/score.py"]
    assert result.manifest.entry_script == "src/score.py"


def test_model_folder_keeps_its_name_and_tree(publisher: Publisher, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text("def init():\n    pass\n")
    model = tmp_path / "resnet"
    (model / "weights").mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (model / "weights" / "part-0.bin").write_bytes(b"0" * 100)
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "junk.pyc").write_bytes(b"junk")
    result = build_module(spec_for(src, model, created=CREATED), publisher.key, tmp_path / "dist")
    assert [f.path for f in result.manifest.files] == [
        "model/resnet/config.json",
        "model/resnet/weights/part-0.bin",
        "src/score.py",
    ]


def test_source_directory_is_packed_whole_without_build_junk(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    src = tmp_path / "project"
    shutil.copytree(digits_source, src)
    (src / "dist").mkdir()
    (src / "dist" / "old-1.edgepack").write_bytes(b"old")
    (src / "publisher.key").write_bytes(b"secret")
    (src / "helpers").mkdir()
    (src / "helpers" / "prep.py").write_text("X = 1\n")
    result = build_module(
        spec_for(src, src / "digits.onnx", source_dir=src, created=CREATED),
        publisher.key,
        tmp_path / "dist",
    )
    assert [f.path for f in result.manifest.files] == [
        "model/digits.onnx",
        "src/deploymentconfig.json",
        "src/digits.onnx",  # where the script may load it from (stored once, as one blob)
        "src/helpers/prep.py",
        "src/inferenceconfig.json",
        "src/score.py",
    ]


def test_inferenceconfig_paths_resolve_relative_to_its_folder(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    project = tmp_path / "project"
    (project / "code").mkdir(parents=True)
    shutil.copy(digits_source / "score.py", project / "code" / "score.py")
    (project / "code" / "extra.py").write_text("")
    ic_path = project / "inferenceconfig.json"
    config = parse_config(
        InferenceConfig,
        {"entryScript": "score.py", "sourceDirectory": "code", "description": "from ic"},
        source=str(ic_path),
    )
    spec = spec_from_configs(
        name="digits",
        version="2",
        model=digits_source / "digits.onnx",
        inference_config=config,
        ic_path=ic_path,
        entry_script=None,
        source_dir=None,
        deployment_config=None,
    )
    spec.created = CREATED
    result = build_module(spec, publisher.key, tmp_path / "dist")
    assert result.manifest.description == "from ic"
    assert [f.path for f in result.manifest.files] == [
        "model/digits.onnx",
        "src/extra.py",
        "src/score.py",
    ]


def test_progress_reaches_its_total(digits_source: Path, publisher: Publisher, tmp_path: Path) -> None:
    calls: list[tuple[int, int]] = []
    build_module(
        spec_for(digits_source, digits_source / "digits.onnx", created=CREATED),
        publisher.key,
        tmp_path,
        progress=lambda done, total: calls.append((done, total)),
    )
    done, total = calls[-1]
    assert done == total > 0


@pytest.mark.parametrize("missing", ["entry", "model", "source"])
def test_missing_input_is_refused_and_nothing_is_written(
    digits_source: Path, publisher: Publisher, tmp_path: Path, missing: str
) -> None:
    out = tmp_path / "dist"
    out.mkdir()
    spec = spec_for(digits_source, digits_source / "digits.onnx", created=CREATED)
    if missing == "entry":
        spec.entry_script = digits_source / "scor.py"
        reason = "entry script not found"
    elif missing == "model":
        spec.model = digits_source / "digits.onx"
        reason = "model file or folder not found"
    else:
        spec.source_dir = tmp_path / "nowhere"
        reason = "source directory not found"
    with pytest.raises(ConfigError, match=reason):
        build_module(spec, publisher.key, out)
    assert list(out.iterdir()) == []


def test_entry_script_outside_the_source_directory_is_refused(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    other = tmp_path / "other"
    other.mkdir()
    spec = spec_for(digits_source, digits_source / "digits.onnx", source_dir=other)
    with pytest.raises(ConfigError, match="must lie inside the source directory"):
        build_module(spec, publisher.key, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_a_symlink_in_the_source_is_refused(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    shutil.copytree(digits_source, src)
    (src / "passwd").symlink_to("/etc/passwd")
    out = tmp_path / "dist"
    with pytest.raises(ConfigError, match="symbolic links are not packed"):
        build_module(spec_for(src, src / "digits.onnx", source_dir=src), publisher.key, out)
    assert not out.exists() or list(out.iterdir()) == []


def test_invalid_name_is_a_config_error_and_nothing_is_written(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    spec = spec_for(digits_source, digits_source / "digits.onnx")
    spec.name = "Digits Model"
    with pytest.raises(ConfigError, match="module name"):
        build_module(spec, publisher.key, tmp_path / "dist")
    assert not (tmp_path / "dist").exists()


def test_a_failure_while_writing_leaves_no_partial_file(
    digits_source: Path, tmp_path: Path
) -> None:
    """Writing fails half-way (a blob changes size under the builder): no temp file remains."""
    src = tmp_path / "src"
    shutil.copytree(digits_source, src)
    out = tmp_path / "dist"
    spec = spec_for(src, src / "digits.onnx", created=CREATED)
    grow = src / "digits.onnx"

    def progress(done: int, total: int) -> None:
        # Once every input is hashed, before writing starts, the model grows on disk.
        if done * 2 >= total and grow.stat().st_size < 10_000_000:
            with grow.open("ab") as fh:
                fh.write(b"\0" * 10_000_000)

    with pytest.raises(TrustError, match="changed size"):
        build_module(spec, generate_private_key(), out, progress=progress)
    assert list(out.iterdir()) == []


def test_built_bundle_has_fixed_tar_metadata(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    result = build_module(
        spec_for(digits_source, digits_source / "digits.onnx"), publisher.key, tmp_path
    )
    with tarfile.open(fileobj=io.BytesIO(result.path.read_bytes()), mode="r:") as tar:
        for m in tar.getmembers():
            assert (m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) == (0, 0, 0, "", "", 0o644)
            assert m.isreg()


def test_a_model_inside_the_source_folder_stays_there_and_is_stored_once(
    digits_source: Path, publisher: Publisher, tmp_path: Path
) -> None:
    """A script that loads the model from its own folder finds it; the bundle holds it once."""
    result = build_module(
        spec_for(digits_source, digits_source / "digits.onnx", source_dir=digits_source, created=CREATED),
        publisher.key,
        tmp_path,
    )
    by_path = {f.path: f.digest for f in result.manifest.files}
    assert by_path["src/digits.onnx"] == by_path["model/digits.onnx"]
    assert len(members(result.path)) == 1 + len(set(by_path.values()))  # module.json + each blob once
