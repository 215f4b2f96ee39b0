"""Bad input to the SDK: a specific error before any request, hub errors as the CLI's classes,
a wait that gives up with every device's state, an interrupted upload that leaves nothing.

"No request was sent" is checked on the SDK's own HTTP client: every request it sends is
recorded as it leaves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from manifests.errors import ConfigError, EdgepackError
from packager.sdk import (
    BadArgument,
    DeploymentConfig,
    Device,
    Devices,
    Environment,
    Hub,
    HubConflict,
    HubNotFound,
    HubRejected,
    HubTrustRefusal,
    HubUnauthorized,
    InferenceConfig,
    LocalService,
    LocalWebservice,
    Model,
    Module,
    ProgressEvent,
    Selector,
    Service,
)
from tests.engines import nowhere_image
from tests.factory import Defect, Forge
from tests.hub.conftest import HubFactory, RunningHub
from tests.sdk.conftest import sdk_hub

EDGEPACK = str(Path(sys.executable).parent / "edgepack")


class Sent(list[str]):
    def watch(self, hub: Hub) -> Hub:
        hub.transport.http.event_hooks["request"].append(lambda r: self.append(f"{r.method} {r.url.path}"))
        return hub


def refused(call: Callable[[], Any], cls: type[EdgepackError], match: str, sent: Sent) -> None:
    """``call`` raises ``cls`` naming ``match``, and sends nothing to the hub."""
    sent.clear()
    with pytest.raises(cls, match=match):
        call()
    assert sent == [], f"sent {sent} before refusing"


def test_bad_arguments_are_refused_before_any_request(
    hub: HubFactory, sdk_home: Path, tmp_path: Path, forge: Forge
) -> None:
    running = hub()
    sent = Sent()
    h = sent.watch(sdk_hub(running))
    weights = tmp_path / "digits.onnx"
    weights.write_bytes(b"onnx")
    (tmp_path / "score.py").write_text("def init():\n    pass\n\ndef run(raw):\n    return raw\n")
    model = Model.register(h, model_path=weights, model_name="digits")
    Device.enroll(h, "edge-1", tags={"site": "berlin"})
    bundle = tmp_path / "demo-1.edgepack"
    bundle.write_bytes(forge.bundle(name="demo"))
    Module.push(h, bundle)
    service = h.deploy("demo", "demo:1", DeploymentConfig(port=18890), Devices(["edge-1"]))
    ic = InferenceConfig(entry_script=str(tmp_path / "score.py"))

    # Configurations: unknown keywords and misspelt file fields with a did-you-mean, bad values.
    refused(lambda: InferenceConfig(entry_scipt="score.py"), BadArgument, "did you mean 'entry_script'", sent)
    refused(lambda: InferenceConfig(), BadArgument, "entry_script is required", sent)
    refused(lambda: InferenceConfig(entry_script="s.py", environment="env"), BadArgument, "Environment", sent)
    typo = tmp_path / "inferenceconfig.json"
    typo.write_text(json.dumps({"entryScipt": "score.py"}))
    refused(lambda: InferenceConfig.from_file(typo), BadArgument, "did you mean 'entryScript'", sent)
    refused(lambda: DeploymentConfig(prot=8890), BadArgument, "did you mean 'port'", sent)
    refused(lambda: DeploymentConfig(port=70000), BadArgument, "port: Input should be less than", sent)
    refused(lambda: DeploymentConfig(runtime="vm"), BadArgument, "runtime", sent)
    refused(lambda: LocalWebservice.deploy_configuration(prot=1), BadArgument, "did you mean 'port'", sent)
    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "prot": 1}))
    refused(lambda: DeploymentConfig.from_file(dc), BadArgument, "did you mean 'port'", sent)
    refused(lambda: DeploymentConfig.from_file(tmp_path / "none.json"), BadArgument, "not found", sent)
    refused(lambda: Environment.get(h, "AzureML-Nope"), BadArgument, "not a curated one", sent)
    refused(lambda: Selector("site="), BadArgument, "selector", sent)
    refused(lambda: Selector(), BadArgument, "selector is empty", sent)
    refused(lambda: Devices([]), BadArgument, "at least one", sent)
    refused(lambda: Devices(["no spaces"]), BadArgument, "device id", sent)

    # Registry calls.
    refused(
        lambda: Model.register(h, model_path=tmp_path / "no.onnx", model_name="x"),
        BadArgument,
        "no such",
        sent,
    )
    refused(
        lambda: Model.register(h, model_path=weights, model_name="Bad Name"), BadArgument, "is invalid", sent
    )
    refused(
        lambda: Model.register(h, model_path=weights, model_name="x", tags={"a": ["b"]}),  # type: ignore[dict-item]
        BadArgument,
        "tags",
        sent,
    )
    refused(lambda: Model.register(h, weights, "x", tagz={}), BadArgument, "did you mean 'tags'", sent)
    refused(lambda: Model(h, "digits", version=0), BadArgument, "version", sent)
    refused(lambda: Model.list(h, tags="onnx"), BadArgument, "tags", sent)
    refused(lambda: model.update(tags={"a": "b"}, add_tags={"c": "d"}), BadArgument, "not both", sent)
    refused(lambda: Module.push(h, tmp_path / "none.edgepack"), BadArgument, "no such bundle", sent)

    # Deployments.
    refused(
        lambda: Model.deploy(h, "svc", "digits:1", ic, target=Devices(["edge-1"])),  # type: ignore[arg-type]
        BadArgument,
        "must be a list of Model objects",
        sent,
    )
    refused(
        lambda: Model.deploy(h, "svc", [model], None, target=Devices(["edge-1"])),
        BadArgument,
        "required",
        sent,
    )
    refused(lambda: Model.deploy(h, "svc", [model], ic), BadArgument, "say where to deploy", sent)
    refused(
        lambda: Model.deploy(h, "Bad Svc", [model], ic, target=Devices(["edge-1"])), BadArgument, "name", sent
    )
    gone = InferenceConfig(entry_script=str(tmp_path / "gone.py"))
    refused(
        lambda: Model.deploy(h, "svc", [model], gone, target=Devices(["e"])), ConfigError, "not found", sent
    )
    keyless = sent.watch(Hub(running.url, running.admin_token, key=tmp_path / "none.key", progress=False))
    refused(
        lambda: Model.deploy(keyless, "svc", [model], ic, target=Devices(["e"])), ConfigError, "keygen", sent
    )
    custom = Environment("custom")  # an image the devices could not run unpinned: refused
    custom.docker.base_image = nowhere_image()
    unpinnable = InferenceConfig(entry_script=str(tmp_path / "score.py"), environment=custom)
    refused(
        lambda: Model.deploy(h, "svc", [model], unpinnable, target=Devices(["edge-1"])),
        ConfigError,
        "baseImage .* cannot be pinned to a digest",
        sent,
    )
    refused(lambda: h.deploy("svc", "demo", target=Devices(["edge-1"])), BadArgument, "NAME:VERSION", sent)
    refused(lambda: h.deploy("svc", "demo:1"), BadArgument, "say where to deploy", sent)

    # A service, a device, a local service.
    refused(lambda: service.run("{not json"), BadArgument, "not valid JSON", sent)
    refused(lambda: service.run({"x": object()}), BadArgument, "cannot be sent as JSON", sent)
    refused(lambda: service.run({}, device="no spaces"), BadArgument, "device id", sent)
    refused(lambda: service.get_logs(tail=0), BadArgument, "tail", sent)
    refused(lambda: service.get_logs(failed="yes"), BadArgument, "failed must be True or False", sent)  # type: ignore[arg-type]
    refused(lambda: service.wait_for_deployment(timeout=0), BadArgument, "timeout", sent)
    refused(lambda: service.update(models=[model]), BadArgument, "models need the inference_config", sent)
    refused(lambda: Service(h, "Bad Name"), BadArgument, "service name", sent)
    refused(lambda: Device.enroll(h, "no spaces"), BadArgument, "device id", sent)
    refused(lambda: Device.list(h, selector="site"), BadArgument, "selector", sent)
    refused(lambda: LocalService("x.edgepack", port=70000), BadArgument, "port", sent)
    refused(lambda: Hub(""), BadArgument, "URL", sent)


def cli(running: RunningHub, home: Path, *args: str, token: str | None = None) -> int:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update(
        {
            "EDGEPACK_HOME": str(home),
            "EDGEPACK_HUB_URL": running.url,
            "EDGEPACK_TOKEN": token or running.admin_token,
        }
    )
    return subprocess.run([EDGEPACK, *args], env=env, capture_output=True, text=True, timeout=120).returncode


def test_a_hub_error_is_the_class_whose_exit_code_the_cli_uses(
    hub: HubFactory, sdk_home: Path, tmp_path: Path, forge: Forge, digits_bundle: Path
) -> None:
    running = hub()
    h = sdk_hub(running)
    Module.push(h, digits_bundle)
    Device.enroll(h, "edge-1", tags={"site": "berlin"})
    h.deploy("digits", "digits:1", DeploymentConfig(port=18891), Devices(["edge-1"]))
    tampered = tmp_path / "tampered.edgepack"
    tampered.write_bytes(forge.bundle(Defect.TAMPERED_BYTE))
    wrong = Hub(running.url, "wrong-token", progress=False)

    cases: list[tuple[Callable[[], Any], type[EdgepackError], str, tuple[str, ...], str | None]] = [
        (lambda: Model(h, "digits", 9), HubNotFound, "NotFound", ("model", "show", "digits:9"), None),
        (lambda: Module.push(h, tampered), HubTrustRefusal, "TrustError", ("push", str(tampered)), None),
        (lambda: Model.list(wrong), HubUnauthorized, "Unauthorized", ("model", "list"), "wrong-token"),
        (
            lambda: Module(h, "digits", "1").delete(),
            HubConflict,
            "Conflict",
            ("module", "delete", "digits:1"),
            None,
        ),
        (
            lambda: Device(h, "edge-1").tag({"site": "not a value"}),
            HubRejected,
            "ConfigError",
            ("device", "tag", "edge-1", "site=not a value"),
            None,
        ),
    ]
    for call, cls, kind, command, token in cases:
        with pytest.raises(cls) as caught:
            call()
        assert caught.value.kind == kind  # type: ignore[attr-defined]
        assert caught.value.exit_code == cli(running, tmp_path / "home", *command, token=token), command


def test_an_interrupted_upload_leaves_nothing_registered(
    hub: HubFactory, sdk_home: Path, tmp_path: Path
) -> None:
    running = hub()
    h = sdk_hub(running)
    big = tmp_path / "big.onnx"
    big.write_bytes(os.urandom(3 << 20))

    def interrupt_uploads(event: ProgressEvent) -> None:
        if event.task == "uploading" and event.done >= 1 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Model.register(h, model_path=big, model_name="big", progress=interrupt_uploads)
    assert Model.list(h, name="big") == []
    with running.client() as http:
        assert http.get("/api/v1/models").json() == []
        blobs = [b.digest for b in running.core.blobs.iter_blobs()]
    assert blobs == []  # not even the part that was sent

    # A deploy interrupted while it uploads its source files: no module, no service.
    small = tmp_path / "small.onnx"
    small.write_bytes(b"small model")
    model = Model.register(h, model_path=small, model_name="small")
    folder = tmp_path / "src"
    folder.mkdir()
    (folder / "score.py").write_text("def init():\n    pass\n\ndef run(raw):\n    return raw\n")
    for name in ("lookup-a.bin", "lookup-b.bin"):
        (folder / name).write_bytes(os.urandom(2 << 20))
    ic = InferenceConfig(entry_script=str(folder / "score.py"), source_directory=str(folder))
    Device.enroll(h, "edge-1")

    def interrupt_late(event: ProgressEvent) -> None:
        # Past 3 MiB one 2 MiB file at least is on the hub, whatever the order of the uploads.
        if event.task == "uploading" and event.done >= 3 << 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Model.deploy(h, "svc", [model], ic, target=Devices(["edge-1"]), progress=interrupt_late)
    assert Module.list(h) == []
    with pytest.raises(HubNotFound):
        Service(h, "svc")
    # What it uploaded is unused, and `edgepack hub gc` frees it (the model's file stays).
    stored = {b.digest for b in running.core.blobs.iter_blobs()}
    assert len(stored) >= 2 and model.files[0].digest in stored
    assert cli(running, tmp_path / "home", "hub", "gc", "--grace", "0") == 0
    assert {b.digest for b in running.core.blobs.iter_blobs()} == {model.files[0].digest}
