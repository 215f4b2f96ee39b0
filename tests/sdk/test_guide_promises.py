"""Promises of ``docs/azure-ml-sdk.md`` that no other test checked, on one real hub (no broker,
no agent: a device enrolled and never started is one that has not reported yet).

The hub trusts two publisher keys, so that the guide's module ownership rows (grant, revoke,
signers) run on the same hub as its service and progress rows."""

from __future__ import annotations

import inspect
import io
import os
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.settings import HubSettings
from cloud_hub.store.blobs import FileBlobStore
from cloud_hub.store.s3 import S3BlobStore
from cloud_hub.tls.material import make_tls_material
from manifests.errors import ConfigError, FetchError, TrustError
from manifests.signing import generate_private_key, key_id, private_key_pem, public_key_pem
from manifests.states import ServiceState, StateOnDevice
from packager.sdk import (
    DeploymentConfig,
    DeploymentFailed,
    DeploymentTimeout,
    Device,
    Devices,
    Environment,
    Hub,
    HubConflict,
    HubForbidden,
    HubNotFound,
    HubTrustRefusal,
    HubUnavailable,
    InferenceConfig,
    Model,
    Module,
    ProgressEvent,
    Selector,
    Service,
    Webservice,
)
from packager.sdk.live import LiveServiceView, StateLines, show_output_view
from packager.sdk.progress import RichBars, reporting
from tests.conftest import Publisher
from tests.engines import free_port
from tests.factory import SCORE_PY, Forge, default_files
from tests.hub.conftest import HubFactory


class Sent(list[str]):
    """Every request a Hub's client sends, as ``METHOD /path``."""

    def watch(self, hub: Hub) -> Hub:
        hub.transport.http.event_hooks["request"].append(lambda r: self.append(f"{r.method} {r.url.path}"))
        return hub


def bundle(forge: Forge, folder: Path, name: str, version: str, factor: int | None = None) -> Path:
    folder.mkdir(exist_ok=True)
    path = folder / f"{name}-{version}.edgepack"
    files = default_files(factor if factor is not None else int(version) + 1)
    path.write_bytes(forge.bundle(name=name, version=version, files=files))
    return path


def test_the_guides_promises_on_a_hub_whose_device_has_not_reported(
    hub: HubFactory, sdk_home: Path, publisher: Publisher, tmp_path: Path
) -> None:
    second_key: Ed25519PrivateKey = generate_private_key()
    trusted = []
    for name, key in (("first", publisher.key), ("second", second_key)):
        trusted.append(tmp_path / f"{name}.pub")
        trusted[-1].write_bytes(public_key_pem(key.public_key()))
    running = hub(trusted_keys=trusted)
    events: list[ProgressEvent] = []
    sent = Sent()
    # Progress: Hub(progress=…) is the default of every call made through the hub.
    h = sent.watch(Hub(running.url, running.admin_token, progress=events.append))
    first, second = Forge(publisher=publisher.key), Forge(publisher=second_key)

    weights = tmp_path / "digits.onnx"
    weights.write_bytes(b"onnx" * 1000)
    model = Model.register(h, model_path=weights, model_name="digits", tags={"stage": "dev", "old": "x"})
    model.download(tmp_path / "out")
    assert {(e.task, e.unit, e.total) for e in events} == {
        ("hashing", "bytes", 4000),
        ("uploading", "bytes", 4000),
        ("downloading", "bytes", 4000),
    }
    assert all(e.service is None for e in events)
    source = tmp_path / "src"
    source.mkdir()
    (source / "score.py").write_bytes(SCORE_PY)
    script = InferenceConfig(entry_script=str(source / "score.py"), source_directory=str(source))
    events.clear()
    Module.build(weights, "built", "1", script, out_dir=tmp_path / "dist", progress=events.append)
    assert events and {e.unit for e in events} == {"bytes"}

    # model.update: add_tags=, remove_tags=, add_properties= (and the description), one request.
    sent.clear()
    model.update(
        description="v1", add_tags={"stage": "prod"}, remove_tags=["old"], add_properties={"acc": "0.9"}
    )
    assert sent == ["PATCH /api/v1/models/digits/versions/1"]
    again = Model(h, "digits", 1)
    assert (again.tags, again.properties, again.description) == ({"stage": "prod"}, {"acc": "0.9"}, "v1")

    # Module names belong to the key that pushed them first; another needs the admin's grant.
    for version in ("1", "2"):
        Module.push(h, bundle(first, tmp_path, "demo", version))
    foreign = bundle(second, tmp_path, "demo", "3")
    with pytest.raises(HubForbidden, match="edgepack module grant demo") as not_owner:
        Module.push(h, foreign)
    assert not_owner.value.exit_code == 2
    signers = Module.signers(h, "demo")
    assert (signers.owners, signers.granted) == ([key_id(publisher.key.public_key())], [])
    second_id = key_id(second_key.public_key())
    assert Module.grant(h, "demo", second_id).granted == [second_id]
    assert Module.push(h, foreign).created
    assert Module.revoke(h, "demo", second_id).granted == []
    with pytest.raises(HubForbidden):
        Module.push(h, bundle(second, tmp_path, "demo", "4"))

    # A device that has not reported the service: Pending on it, Transitioning rolled up.
    creds = Device.enroll(h, "edge-1", tags={"site": "berlin"})
    # The credentials document is shown once: the device's record holds no token, and
    # enrolling the id again does not hand out another.
    assert creds.token and creds.token not in Device(h, "edge-1").record.model_dump_json()
    with pytest.raises(HubConflict):
        Device.enroll(h, "edge-1")
    config = DeploymentConfig(port=18893, runtime="process")
    service = h.deploy("demo", "demo:2", config, Selector(site="berlin"))
    assert service.deployed is not None and service.deployed.created
    assert service.state == ServiceState.TRANSITIONING
    assert [(d.device_id, d.state) for d in service.devices] == [("edge-1", StateOnDevice.PENDING)]
    assert (service.scoring_uri, service.swagger_uri) == (None, None)  # no Healthy device yet
    events.clear()
    with pytest.raises(DeploymentTimeout):
        service.wait_for_deployment(timeout=0.5, interval=0.1, wait_offline=True)
    assert events and {(e.unit, e.done, e.total) for e in events} == {("devices", 0, 1)}
    assert all(e.service is not None and e.service.name == "demo" for e in events)

    # Webservice(hub, name) is the same service; hub.deploy updates an existing one;
    # refresh() (or update_deployment_state()) reads what changed since.
    azure = Webservice(h, "demo")
    assert isinstance(azure, Service) and azure.module == "demo:2"
    updated = h.deploy("demo", "demo:3", config, Selector(site="berlin"))
    assert updated.deployed is not None and not updated.deployed.created
    assert azure.module == "demo:2"
    assert azure.refresh().module == "demo:3"
    assert service.update_deployment_state().module == "demo:3"

    # rollback: the newest version pushed before the current one, same settings and target;
    # none left is a conflict.
    rolled = service.rollback()
    assert rolled.version == "2" and rolled.deployment.target == {"selector": {"site": "berlin"}}
    assert service.refresh().module == "demo:2" and service.settings.port == 18893
    assert service.rollback().version == "1"
    with pytest.raises(HubConflict) as none_left:
        service.rollback()
    assert none_left.value.exit_code == 2

    # A port another service already uses on one of the target's devices: a conflict.
    with pytest.raises(HubConflict, match="port 18893"):
        h.deploy("other", "demo:1", config, Devices("edge-1"))

    # Model.deploy: deployment_target= as Azure names it; every file of the folder checked
    # before the first request; a manifest signed by a key the hub does not trust is refused
    # as a pushed bundle is, and leaves no module or service.
    edge = Devices("edge-1")
    built = Model.deploy(
        h, "from-model", [model], script, DeploymentConfig(port=18894), deployment_target=edge
    )
    assert built.record.target == {"devices": ["edge-1"]}
    # An environment naming an image: the docker runtime, the image pinned in the manifest.
    digest = "sha256:" + "cd" * 32
    in_image = Environment("custom")
    in_image.docker.base_image = f"registry.example:5000/team/py:1@{digest}"
    imaged = InferenceConfig(entry_script=str(source / "score.py"), environment=in_image)
    docker = Model.deploy(h, "in-docker", [model], imaged, DeploymentConfig(port=18897), target=edge)
    assert docker.settings.runtime == "docker"
    pinned = Module(h, "in-docker", "1").manifest.runtime
    assert (pinned.image, pinned.image_digest) == (in_image.docker.base_image.split("@")[0], digest)
    os.mkfifo(source / "pipe")
    sent.clear()
    with pytest.raises(ConfigError, match="pipe: not a regular file"):
        Model.deploy(h, "svc-2", [model], script, DeploymentConfig(port=18895), target=Devices("edge-1"))
    assert sent == []
    (source / "pipe").unlink()
    stranger = tmp_path / "stranger.key"
    stranger.write_bytes(private_key_pem(generate_private_key()))
    untrusted = Hub(running.url, running.admin_token, key=stranger, progress=False)
    with pytest.raises(HubTrustRefusal):
        Model.deploy(
            untrusted, "svc-2", [model], script, DeploymentConfig(port=18895), target=Devices("edge-1")
        )
    assert "svc-2" not in [m.name for m in Module.list(h)]
    with pytest.raises(HubNotFound):
        Service(h, "svc-2")

    # Already exists: the same module version with other content.
    with pytest.raises(HubConflict, match="already exists"):
        Module.push(h, bundle(first, tmp_path / "again", "demo", "1", factor=9))

    # Endpoint keys: (primary, secondary); regenerating one keeps the other.
    keyed = h.deploy("keyed", "demo:1", DeploymentConfig(port=18896, auth_enabled=True), Devices("edge-1"))
    primary, secondary = keyed.get_keys()
    rotated = keyed.regen_key("secondary")
    assert rotated.keys.primary == primary and rotated.keys.secondary not in (primary, secondary)
    assert keyed.get_keys() == (primary, rotated.keys.secondary)

    # download: a file whose bytes changed in the hub's store never appears whole.
    data = os.urandom(3 << 20)
    (tmp_path / "big.bin").write_bytes(data)
    big = Model.register(h, model_path=tmp_path / "big.bin", model_name="big")
    forged = bytearray(data)
    forged[-1] ^= 0xFF
    store = running.core.blobs
    if isinstance(store, FileBlobStore):
        Path(store.path(big.files[0].digest)).write_bytes(bytes(forged))
    else:
        assert isinstance(store, S3BlobStore)
        name = store.key(big.files[0].digest)
        store.client.put_object(Bucket=store.location.bucket, Key=name, Body=bytes(forged))
    with pytest.raises((FetchError, TrustError)):
        big.download(tmp_path / "forged")
    assert not (tmp_path / "forged" / "big.bin").exists()

    # A service that targets no device: the wait fails at once, naming why.
    h.deploy("nowhere", "demo:1", config, Selector(site="nowhere"))
    with pytest.raises(DeploymentFailed, match="targets no device") as failed:
        Service(h, "nowhere").wait_for_deployment(timeout=60)
    assert failed.value.exit_code == 5 and failed.value.devices == []


def test_an_https_hub_is_verified_with_the_ca_given_or_named_by_the_environment(
    hub: HubFactory, sdk_home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = make_tls_material(
        HubSettings(data_dir=tmp_path / "hub"),
        hub_hosts=["127.0.0.1"],
        broker_hosts=["127.0.0.1"],
        broker_dir=tmp_path / "broker",
    )
    running = hub(data_dir=tmp_path / "hub", ca=files.ca_cert, tls_cert=files.hub_cert, tls_key=files.hub_key)
    assert running.url.startswith("https://")
    with Hub(running.url, running.admin_token, ca=files.ca_cert, progress=False) as given:
        assert Model.list(given) == []
    with (
        Hub(running.url, running.admin_token, progress=False) as unverified,
        pytest.raises(FetchError) as refused,
    ):
        Model.list(unverified)
    assert "EDGEPACK_HUB_CA" in str(refused.value)  # what to pass
    monkeypatch.setenv("EDGEPACK_HUB_URL", running.url)
    monkeypatch.setenv("EDGEPACK_TOKEN", running.admin_token)
    monkeypatch.setenv("EDGEPACK_HUB_CA", str(files.ca_cert))
    with Hub.from_config(progress=False) as from_environment:
        assert Model.list(from_environment) == []


def test_no_hub_an_unreachable_hub_and_progress_outside_a_terminal(
    sdk_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(ConfigError, match="edgepack login") as none:
        Hub.from_config()
    assert none.value.exit_code == 2
    nowhere = Hub(f"http://127.0.0.1:{free_port()}", "token", progress=False)
    with pytest.raises(HubUnavailable, match="cannot reach the hub") as down:
        Model.list(nowhere)
    assert down.value.exit_code == 4
    # The default progress: bars only on a terminal, nothing on a pipe; False: nothing at all.
    monkeypatch.setattr("sys.stderr", io.StringIO())
    monkeypatch.setattr("sys.stdout", io.StringIO())
    with reporting(None) as piped, reporting(False) as off:
        assert piped is None and off is None
    assert isinstance(show_output_view(), StateLines)  # show_output=True in a pipe: a line per change
    monkeypatch.setattr("sys.stderr", Terminal())
    monkeypatch.setattr("sys.stdout", Terminal())
    with reporting(None) as bars:
        assert isinstance(bars, RichBars)
    assert isinstance(show_output_view(), LiveServiceView)  # in a terminal: the live table
    # The grace an agent that is just connecting gets before a wait gives up on offline devices.
    assert inspect.signature(Service.wait_for_deployment).parameters["offline_grace"].default == 10


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True
