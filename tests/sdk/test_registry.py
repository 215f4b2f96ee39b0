"""The model and module registry through the SDK, as a Python user drives it, on a real hub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from manifests.digests import sha256_digest
from manifests.errors import ConfigError, TrustError
from packager.sdk import (
    Device,
    Devices,
    HubConflict,
    HubNotFound,
    HubTrustRefusal,
    HubUnauthorized,
    InferenceConfig,
    Model,
    Module,
    ProgressEvent,
    Service,
)
from packager.sdk import Hub as SdkHub
from tests.factory import Defect, Forge
from tests.hub.conftest import HubFactory
from tests.sdk.conftest import sdk_hub


def test_register_list_download_update_delete(hub_sdk: SdkHub, tmp_path: Path) -> None:
    weights = tmp_path / "digits.onnx"
    weights.write_bytes(b"onnx" * 300_000)  # more than one upload chunk
    folder = tmp_path / "resnet"
    (folder / "sub").mkdir(parents=True)
    (folder / "weights.bin").write_bytes(b"w" * 3000)
    (folder / "sub" / "labels.txt").write_bytes(b"cat\n")
    events: list[ProgressEvent] = []

    one = Model.register(
        hub_sdk, model_path=weights, model_name="digits", tags={"onnx": "demo"}, progress=events.append
    )
    assert (one.name, one.version, one.id, one.uploaded) == ("digits", 1, "digits:1", 1)
    assert [(f.path, f.digest, f.size) for f in one.files] == [
        ("digits.onnx", sha256_digest(weights.read_bytes()), 1_200_000)
    ]
    uploads = [e for e in events if e.task == "uploading"]
    assert uploads[-1].done == uploads[-1].total == 1_200_000 and len(uploads) > 2
    # The same bytes again: a new version, nothing uploaded.
    two = Model.register(
        hub_sdk,
        model_path=str(weights),
        model_name="digits",
        tags={"stage": "prod"},
        properties={"accuracy": 0.97},
        description="same weights",
    )
    assert (two.version, two.uploaded, two.properties) == (2, 0, {"accuracy": "0.97"})
    resnet = Model.register(hub_sdk, model_path=folder, model_name="resnet")
    assert sorted(f.path for f in resnet.files) == ["resnet/sub/labels.txt", "resnet/weights.bin"]

    assert Model(hub_sdk, "digits").version == 2  # latest
    assert Model(hub_sdk, "digits", version=1).tags == {"onnx": "demo"}
    assert [m.id for m in Model.list(hub_sdk, tags={"stage": "prod"})] == ["digits:2"]
    assert [m.id for m in Model.list(hub_sdk, tags=["onnx"])] == ["digits:1"]
    assert [m.id for m in Model.list(hub_sdk, tags=[["stage", "prod"]])] == ["digits:2"]
    assert [m.id for m in Model.list(hub_sdk, properties={"accuracy": "0.97"})] == ["digits:2"]
    assert [m.id for m in Model.list(hub_sdk, name="digits", latest=True)] == ["digits:2"]
    assert {m.id for m in Model.list(hub_sdk, latest=True)} == {"digits:2", "resnet:1"}

    where = resnet.download(tmp_path / "out")
    assert where == str(tmp_path / "out" / "resnet")
    assert (tmp_path / "out" / "resnet" / "sub" / "labels.txt").read_bytes() == b"cat\n"
    with pytest.raises(ConfigError, match="exist_ok=True"):
        resnet.download(tmp_path / "out")
    assert resnet.download(tmp_path / "out", exist_ok=True) == where
    assert Model(hub_sdk, "digits", 1).download(tmp_path / "one") == str(tmp_path / "one" / "digits.onnx")

    first = Model(hub_sdk, "digits", 1)
    first.update(tags={"stage": "old"})  # replaces every tag, as Azure ML's update does
    assert first.tags == {"stage": "old"}
    first.add_tags({"team": "vision"})
    first.remove_tags(["stage"])
    first.update(description="first try", add_properties={"source": "sklearn"})
    again = Model(hub_sdk, "digits", 1)
    assert (again.tags, again.description, again.properties) == (
        {"team": "vision"},
        "first try",
        {"source": "sklearn"},
    )

    with pytest.raises(HubNotFound, match="known versions: 1, 2") as missing:
        Model(hub_sdk, "digits", 9)
    assert missing.value.exit_code == 2 and missing.value.kind == "NotFound"
    assert first.delete().deleted == "digits:1"
    assert [m.version for m in Model.list(hub_sdk, name="digits")] == [2]


def test_build_push_list_download_and_refusals(
    hub_sdk: SdkHub, digits_source: Path, tmp_path: Path, forge: Forge
) -> None:
    config = InferenceConfig.from_file(digits_source / "inferenceconfig.json")
    built = Module.build(digits_source / "digits.onnx", "digits", "1", config, out_dir=tmp_path / "dist")
    assert built.path == tmp_path / "dist" / "digits-1.edgepack"
    assert built.manifest.runtime.python.requirements == ["onnxruntime", "numpy"]

    pushed = Module.push(hub_sdk, built.path)
    assert (pushed.ref, pushed.created, pushed.manifest_digest) == ("digits:1", True, built.manifest_digest)
    assert Module.push(hub_sdk, built.path).created is False
    [listed] = Module.list(hub_sdk)
    assert listed.id == "digits:1" and listed.manifest.entry_script == "src/score.py"
    shown = Module(hub_sdk, "digits", "1")
    assert shown.manifest_digest == built.manifest_digest
    assert shown.download(tmp_path).read_bytes() == built.path.read_bytes()

    tampered = tmp_path / "tampered.edgepack"
    tampered.write_bytes(forge.bundle(Defect.TAMPERED_BYTE))
    with pytest.raises(HubTrustRefusal, match=Defect.TAMPERED_BYTE.reason) as refused:
        Module.push(hub_sdk, tampered)
    assert isinstance(refused.value, TrustError) and refused.value.exit_code == 3
    assert [m.id for m in Module.list(hub_sdk)] == ["digits:1"]
    assert shown.delete().deleted == "digits:1"
    assert Module.list(hub_sdk) == []


def test_hub_from_config_and_a_wrong_token(
    hub: HubFactory, sdk_home: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    running = hub()
    (sdk_home / "config.json").write_text(json.dumps({"hub_url": running.url, "token": running.admin_token}))
    with SdkHub.from_config(progress=False) as saved:
        assert saved.url == running.url and Model.list(saved) == []
    monkeypatch.setenv("EDGEPACK_TOKEN", "wrong")  # the environment overrides the file
    with SdkHub.from_config() as wrong, pytest.raises(HubUnauthorized, match="edgepack login") as exc:
        Model.list(wrong)
    assert exc.value.exit_code == 2
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"hub_url": "http://elsewhere.invalid"}))
    monkeypatch.delenv("EDGEPACK_TOKEN")
    assert SdkHub.from_config(other).url == "http://elsewhere.invalid"
    with sdk_hub(running) as direct:
        assert direct.url == running.url
    # A file named that is not there is just that, whatever the environment or login say.
    missing = tmp_path / "nowhere" / "config.json"
    with pytest.raises(ConfigError, match=f"^{re.escape(str(missing))}: file not found"):
        SdkHub.from_config(missing)
    with pytest.raises(ConfigError, match="is a folder, not a file"):
        SdkHub.from_config(path=tmp_path)


def test_a_model_is_in_use_only_by_the_services_deployed_from_it(hub_sdk: SdkHub, tmp_path: Path) -> None:
    """The quickstart's last line on a hub that runs other services: ``model.delete()``."""
    Device.enroll(hub_sdk, "edge-1")
    weights = tmp_path / "digits.onnx"
    weights.write_bytes(b"onnx" * 1000)
    source = tmp_path / "src"
    source.mkdir()
    (source / "score.py").write_text("def init():\n    pass\n\ndef run(data):\n    return data\n")
    config = InferenceConfig(entry_script=str(source / "score.py"), source_directory=str(source))
    deployed = Model.register(hub_sdk, model_path=weights, model_name="digits")
    twin = Model.register(hub_sdk, model_path=weights, model_name="digits-copy")  # same bytes
    Model.deploy(hub_sdk, "other-service", [deployed], config, target=Devices("edge-1"))

    assert twin.delete().deleted == "digits-copy:1"
    with pytest.raises(HubConflict, match="'other-service'") as refused:
        deployed.delete()
    assert "digits-copy" not in str(refused.value)
    assert [m.id for m in Model.list(hub_sdk)] == ["digits:1"]
    Service(hub_sdk, "other-service").delete()
    assert deployed.delete().deleted == "digits:1"
