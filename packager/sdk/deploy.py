"""``Model.deploy``: registered models plus an entry script, built, signed, pushed, deployed.

The same operation as ``edgepack deploy -n SERVICE -m MODEL:VERSION --ic inferenceconfig.json
--dc deploymentconfig.json``. In order:

1. everything that can be checked here is checked before the first request: names, configs,
   the target, the signing key, the entry script and its folder;
2. the module's manifest is signed over the source files (hashed here) and the models' files
   (named by the digests the hub's registry lists; their bytes are not downloaded);
3. the module is named after the service and numbered 1, 2, …; when the newest version holds
   the very same content it is deployed again rather than duplicated;
4. only the source files the hub does not hold are uploaded, then the signed manifest is
   registered over them (the hub checks it as it checks a pushed bundle);
5. the service is created (or, with ``overwrite``, updated).

An interrupted call leaves at most some unused uploaded files (``edgepack hub gc`` frees them):
the module appears only with its manifest, the service only with its deployment.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from manifests.module import MODEL_ROOT, FileEntry, ModuleManifest, model_tags
from packager.build import AssembledModule, BuildSpec, assemble_module, collect_files, spec_from_configs
from packager.keys import read_private_key
from packager.sdk.answers import PushResult, ServiceRecord
from packager.sdk.blobs import upload_missing
from packager.sdk.configs import DeploymentConfig, InferenceConfig
from packager.sdk.errors import BadArgument, HubConflict, HubNotFound, ServiceExists
from packager.sdk.hub import Hub
from packager.sdk.model import Model, check_name
from packager.sdk.progress import ProgressOption, Tracker, reporting
from packager.sdk.service import Service, put_deployment
from packager.sdk.targets import Target, check_target

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

MANIFEST_MEDIA_TYPE = "application/vnd.edgepack.manifest+json"
#: how often a version taken by a concurrent deploy is skipped before giving up
_VERSION_ATTEMPTS = 5


def model_entries(models: Sequence[Model]) -> list[FileEntry]:
    """Where the models' files go in the module: one model's files straight under ``model/``
    (``AZUREML_MODEL_DIR`` is that folder), several under ``model/NAME/VERSION/``."""
    if len(models) == 1:
        return [
            FileEntry(path=f"{MODEL_ROOT}/{f.path}", size=f.size, digest=f.digest) for f in models[0].files
        ]
    return [
        FileEntry(path=f"{MODEL_ROOT}/{m.name}/{m.version}/{f.path}", size=f.size, digest=f.digest)
        for m in models
        for f in m.files
    ]


def _checked_models(models: object) -> list[Model]:
    if isinstance(models, Model):
        models = [models]
    if not isinstance(models, Sequence) or isinstance(models, str | bytes):
        # [] is Azure's local-model deploy: the model lies in the source folder, not registered.
        raise BadArgument(
            "Model.deploy: models must be a list of Model objects ([] when the model is in source_directory)"
        )
    for m in models:
        if not isinstance(m, Model):
            raise BadArgument(f"Model.deploy: models must be Model objects, not {type(m).__name__}")
    ids = [m.id for m in models]
    if len(set(ids)) != len(ids):
        raise BadArgument(f"Model.deploy: a model is given twice ({', '.join(ids)})")
    return list(models)


def _content(manifest: ModuleManifest) -> dict[str, Any]:
    """What makes two module versions the same module: all but their version and time."""
    payload = manifest.payload()
    payload.pop("version")
    payload.pop("created")
    return payload


def _next_version(hub: Hub, name: str, assembled: AssembledModule) -> tuple[str, bool]:
    """The version to register (1 + the highest numbered one), or the newest numbered
    version itself when it holds the same content; True when it is to be reused."""
    from packager.sdk.module import Module

    numbered = sorted((int(m.version), m) for m in Module.list(hub, name) if m.version.isdigit())
    if not numbered:
        return "1", False
    newest_number, newest = numbered[-1]
    if _content(newest.manifest) == _content(assembled.manifest):
        return newest.version, True
    return str(newest_number + 1), False


def _register(hub: Hub, assembled: AssembledModule, tracker: Tracker) -> int:
    """Upload the source files the hub lacks, then register the manifest; files uploaded."""
    sent = upload_missing(hub.transport, assembled.sources, tracker)
    answer = hub.transport.request(
        "POST",
        "/api/v1/modules",
        content=assembled.manifest_bytes,
        headers={"Content-Type": MANIFEST_MEDIA_TYPE},
    )
    PushResult.of(answer.json())
    return sent


def _build_and_push(
    hub: Hub, spec: BuildSpec, key: Ed25519PrivateKey, entries: list[FileEntry], progress: ProgressOption
) -> tuple[str, int | None]:
    """Sign the module, choose its version, send what the hub lacks: the version and how many
    files were uploaded (None when an identical version was there already)."""
    with reporting(progress) as report:
        source_bytes = sum(p.stat().st_size for _, p in collect_files(spec))
        hashing = Tracker(report, "hashing", source_bytes)
        assembled = assemble_module(spec, key, entries, progress=hashing.advance)
        version, reuse = _next_version(hub, spec.name, assembled)
        for _ in range(_VERSION_ATTEMPTS):
            if reuse:
                return version, None
            spec.version = version
            assembled = assemble_module(spec, key, entries)
            try:
                return version, _register(hub, assembled, Tracker(report, "uploading", source_bytes))
            except HubConflict as exc:
                if "already exists with different content" not in str(exc):
                    raise
                version = str(int(version) + 1)  # another deploy took it meanwhile
    raise HubConflict(
        f"module {spec.name}: versions up to {version} were taken while deploying; try again",
        status=409,
        kind="Conflict",
    )


def deploy_models(
    hub: Hub,
    name: str,
    models: Sequence[Model],
    inference_config: InferenceConfig | None,
    deployment_config: DeploymentConfig | None,
    target: Target | None,
    *,
    overwrite: bool,
    show_output: bool = False,
    keep: ServiceRecord | None = None,
    progress: ProgressOption = None,
) -> Service:
    """See :meth:`Model.deploy` (and :meth:`Service.update`, which passes ``keep``)."""
    if not isinstance(hub, Hub):
        raise BadArgument(f"Model.deploy: workspace must be a Hub, not {type(hub).__name__}")
    check_name(name, "service")
    checked = _checked_models(models)
    if not isinstance(inference_config, InferenceConfig):
        raise BadArgument(
            "Model.deploy: inference_config is required, e.g. InferenceConfig(entry_script='score.py')"
        )
    if deployment_config is not None and not isinstance(deployment_config, DeploymentConfig):
        raise BadArgument("Model.deploy: deployment_config must be a DeploymentConfig")
    if target is not None:
        where: Target | None = check_target(target, "Model.deploy")
    else:
        where = None if keep is not None else hub.target_for(None, "Model.deploy")
    key = read_private_key(hub.key_path)
    spec = spec_from_configs(
        name=name,
        version="1",
        model=None,
        inference_config=inference_config.document,
        ic_path=None,
        base_dir=inference_config.base_dir,
        entry_script=None,
        source_dir=None,
        deployment_config=deployment_config.document if deployment_config else None,
    )
    spec.exclude.add(hub.key_path)
    # The hub counts a model as used by a deployment only through these signed tags.
    spec.tags = {**spec.tags, **model_tags([m.id for m in checked])}
    collect_files(spec)  # the entry script, its folder and every file in it, checked now
    image = inference_config.document.docker_image()
    if image is not None:
        from packager.runtime_image.pinning import pin_base_image

        pin = pin_base_image(image)  # refused, not recorded unpinned, when it cannot be pinned
        spec.image, spec.image_digest = pin.image, pin.digest
    if deployment_config is not None and deployment_config.runtime is None:
        # Docker runs only a module whose image is pinned; anything else can only be a process.
        deployment_config = deployment_config.with_runtime("docker" if spec.image_digest else "process")
    if deployment_config is None and keep is None:
        deployment_config = DeploymentConfig(runtime="docker" if spec.image_digest else "process")

    if keep is None and not overwrite:
        try:
            Service(hub, name)
        except HubNotFound:
            pass
        else:
            raise ServiceExists(
                f"service {name} exists; pass overwrite=True to update it, or use Service.update"
            )

    version, pushed = _build_and_push(
        hub, spec, key, model_entries(checked), progress if progress is not None else hub.progress
    )
    if show_output:
        how = "unchanged, deployed again" if pushed is None else f"{pushed} file(s) uploaded"
        print(f"module {name}:{version} ({how})", flush=True)
    service = put_deployment(hub, name, (name, version), deployment_config, where, keep=keep)
    service.module_version = version
    if show_output:
        print(f"service {name} deploying to {len(service.devices)} device(s)", flush=True)
    return service
