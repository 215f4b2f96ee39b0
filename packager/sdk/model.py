"""``Model``: a registered model version, as Azure ML's ``Model`` is.

A model is a file or a folder of files, versioned by name (1, 2, …) with tags, properties and
a description. Registering uploads only the files the hub does not hold already and makes
the new version visible only once every file is there: an interrupted registration leaves
no version behind (the uploaded files are unused and ``edgepack hub gc`` frees them).
"""

from __future__ import annotations

import builtins
import re
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN, check_relative_path
from packager.sdk.answers import Deleted, FileRecord, ModelRecord
from packager.sdk.blobs import download_blobs, file_digest, upload_missing
from packager.sdk.errors import BadArgument, unknown_keywords
from packager.sdk.hub import Hub
from packager.sdk.progress import ProgressOption, Tracker, reporting

if TYPE_CHECKING:
    from packager.sdk.configs import DeploymentConfig, InferenceConfig
    from packager.sdk.service import Service
    from packager.sdk.targets import Target

TagFilter = Mapping[str, str] | Sequence[str | Sequence[str]]


def check_name(name: object, what: str) -> str:
    """A model, module or service name the hub accepts; a BadArgument otherwise."""
    if not isinstance(name, str) or not re.match(NAME_PATTERN, name):
        raise BadArgument(
            f"{what} name {name!r} is invalid: lower-case letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 63)"
        )
    return name


def string_map(value: object, what: str) -> dict[str, str]:
    """A dict of strings (tags, properties); numbers are written as text, as Azure ML does."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise BadArgument(f"{what} must be a dict of strings, not {type(value).__name__}")
    out: dict[str, str] = {}
    for key, item in value.items():
        if not isinstance(key, str) or not key:
            raise BadArgument(f"{what}: key {key!r} must be a non-empty string")
        if not isinstance(item, str | int | float) or isinstance(item, bool):
            raise BadArgument(
                f"{what}[{key!r}]: value must be a string or a number, not {type(item).__name__}"
            )
        out[key] = str(item)
    return out


def tag_filters(tags: TagFilter | None) -> list[str]:
    """Azure ML's tag filters (``['key', ['key2', 'value']]`` or ``{'key': 'value'}``) as the
    hub's ``tag`` query (``key`` or ``key=value``, all must match)."""
    if tags is None:
        return []
    if isinstance(tags, Mapping):
        return [f"{k}={v}" for k, v in string_map(tags, "tags").items()]
    if isinstance(tags, str):
        raise BadArgument("tags: give a list of keys or [key, value] pairs, or a dict, not one string")
    out: list[str] = []
    for item in tags:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, Sequence) and len(item) == 2 and all(isinstance(p, str) for p in item):
            out.append(f"{item[0]}={item[1]}")
        else:
            raise BadArgument(f"tags: {item!r} is neither a key nor a [key, value] pair")
    return out


def model_files(path: Path) -> dict[str, Path]:
    """A file registers as its own name; a folder as ``folder/…`` for every file beneath it."""
    if path.is_symlink() or not path.exists():
        raise ConfigError(f"{path}: no such model file or folder")
    if path.is_file():
        return {path.name: path}
    files: dict[str, Path] = {}
    for item in sorted(path.rglob("*")):
        rel = f"{path.name}/{item.relative_to(path).as_posix()}"
        if item.is_symlink():
            raise ConfigError(f"{item}: links are not registered; copy the file into the folder")
        if item.is_file():
            files[check_relative_path(rel)] = item
    if not files:
        raise ConfigError(f"{path}: the folder holds no files")
    return files


class Model:
    """A registered model version: ``Model(hub, "digits")`` is the latest, ``Model(hub,
    "digits", version=2)`` that one. Attributes: ``name``, ``version``, ``id``
    (``name:version``), ``tags``, ``properties``, ``description``, ``created_time``, ``files``.
    """

    def __init__(self, workspace: Hub, name: str, version: int | None = None) -> None:
        if not isinstance(workspace, Hub):
            raise BadArgument(f"Model: the first argument is a Hub, not {type(workspace).__name__}")
        check_name(name, "model")
        if version is not None and (not isinstance(version, int) or isinstance(version, bool) or version < 1):
            raise BadArgument(f"Model {name}: version must be a whole number from 1, not {version!r}")
        self.workspace = workspace
        self._set(
            ModelRecord.of(workspace.transport.get(f"/api/v1/models/{name}/versions/{version or 'latest'}"))
        )

    @classmethod
    def _of(cls, workspace: Hub, record: ModelRecord) -> Model:
        model = cls.__new__(cls)
        model.workspace = workspace
        model._set(record)
        return model

    def _set(self, record: ModelRecord) -> None:
        self.record = record

    @property
    def name(self) -> str:
        """The model's name."""
        return self.record.name

    @property
    def version(self) -> int:
        """Its version: 1, 2, … per name."""
        return self.record.version

    @property
    def id(self) -> str:
        """``name:version``, as Azure ML writes a model's id."""
        return self.record.ref

    @property
    def tags(self) -> dict[str, str]:
        """Its tags."""
        return dict(self.record.tags)

    @property
    def properties(self) -> dict[str, Any]:
        """Its properties (added, never changed)."""
        return dict(self.record.properties)

    @property
    def description(self) -> str:
        """Its description."""
        return self.record.description

    @property
    def created_time(self) -> datetime:
        """When this version was registered."""
        return self.record.created_at

    @property
    def files(self) -> list[FileRecord]:
        """Its files: path, sha256 digest, size."""
        return list(self.record.files)

    def __repr__(self) -> str:
        return f"Model({self.id!r}, tags={self.record.tags})"

    @classmethod
    def register(
        cls,
        workspace: Hub,
        model_path: str | Path,
        model_name: str,
        tags: Mapping[str, str] | None = None,
        properties: Mapping[str, str] | None = None,
        description: str | None = None,
        *,
        progress: ProgressOption = None,
        **unknown: Any,
    ) -> Model:
        """Register a file or folder as the next version of ``model_name``.

        Only files the hub does not hold are uploaded. Everything is checked before the first
        request: the name, the tags and properties, that every file is there and no link.
        """
        error = unknown_keywords(
            "Model.register", unknown, ["model_path", "model_name", "tags", "properties", "description"]
        )
        if error is not None:
            raise error
        if not isinstance(workspace, Hub):
            raise BadArgument(f"Model.register: workspace must be a Hub, not {type(workspace).__name__}")
        check_name(model_name, "model")
        tag_map = string_map(tags, "tags")
        prop_map = string_map(properties, "properties")
        if description is not None and not isinstance(description, str):
            raise BadArgument("Model.register: description must be a string")
        try:
            files = model_files(Path(model_path))
        except ConfigError as exc:
            raise BadArgument(str(exc)) from None
        sizes = {rel: p.stat().st_size for rel, p in files.items()}
        total = sum(sizes.values())
        with reporting(progress if progress is not None else workspace.progress) as report:
            hashing = Tracker(report, "hashing", total)
            digests = {rel: file_digest(p, hashing.advance) for rel, p in files.items()}
            uploading = Tracker(report, "uploading", total)
            sent = upload_missing(workspace.transport, {digests[r]: p for r, p in files.items()}, uploading)
            body = {
                "files": [{"path": r, "digest": digests[r], "size": sizes[r]} for r in files],
                "tags": tag_map,
                "properties": prop_map,
                "description": description or "",
            }
            record = ModelRecord.of(
                workspace.transport.send("POST", f"/api/v1/models/{model_name}/versions", body)
            )
        model = cls._of(workspace, record)
        model.uploaded = sent
        return model

    #: how many files the registration that made this object uploaded (the rest were on the hub)
    uploaded: int = 0

    @classmethod
    def list(
        cls,
        workspace: Hub,
        name: str | None = None,
        tags: TagFilter | None = None,
        properties: Mapping[str, str] | None = None,
        latest: bool = False,
    ) -> builtins.list[Model]:
        """Model versions, oldest first, optionally of one ``name``, with every tag of ``tags``
        (keys, or key/value pairs), every property of ``properties``, or only the latest
        version of each name."""
        if name is not None:
            check_name(name, "model")
        params: dict[str, Any] = {"tag": tag_filters(tags), "latest": latest}
        if name is not None:
            params["name"] = name
        wanted = string_map(properties, "properties")
        answer = workspace.transport.get("/api/v1/models", params=params)
        models = [cls._of(workspace, ModelRecord.of(m)) for m in answer]
        # The hub filters by tag; properties are few and filtered here.
        return [m for m in models if all(str(m.properties.get(k)) == v for k, v in wanted.items())]

    def download(
        self, target_dir: str | Path = ".", exist_ok: bool = False, *, progress: ProgressOption = None
    ) -> str:
        """Download this version's files into ``target_dir`` (each checked against its digest);
        the path of the model (its file, or its folder) is returned, as in Azure ML."""
        target = Path(target_dir)
        wanted = [(f.digest, target / check_relative_path(f.path)) for f in self.record.files]
        if not exist_ok:
            present = [str(p) for _, p in wanted if p.exists()]
            if present:
                raise BadArgument(f"{present[0]} exists; pass exist_ok=True to overwrite it")
        with reporting(progress if progress is not None else self.workspace.progress) as report:
            download_blobs(self.workspace.transport, wanted, Tracker(report, "downloading", self.record.size))
        top = {f.path.split("/", 1)[0] for f in self.record.files}
        return str(target / top.pop()) if len(top) == 1 else str(target)

    def update(
        self,
        tags: Mapping[str, str] | None = None,
        description: str | None = None,
        *,
        add_tags: Mapping[str, str] | None = None,
        remove_tags: Sequence[str] | None = None,
        add_properties: Mapping[str, str] | None = None,
    ) -> None:
        """Change this version's metadata in one request (its files never change).

        ``tags`` replaces every tag (Azure ML's ``update``); ``add_tags`` adds or changes some,
        ``remove_tags`` removes some; ``add_properties`` adds properties.
        """
        if tags is not None and add_tags is not None:
            raise BadArgument("Model.update: give tags (to replace them all) or add_tags, not both")
        if description is not None and not isinstance(description, str):
            raise BadArgument("Model.update: description must be a string")
        if remove_tags is not None and (
            isinstance(remove_tags, str) or not all(isinstance(k, str) for k in remove_tags)
        ):
            raise BadArgument("Model.update: remove_tags must be a list of tag keys")
        new = string_map(tags, "tags") if tags is not None else string_map(add_tags, "add_tags")
        drop = list(remove_tags or [])
        if tags is not None:
            drop += [k for k in self.record.tags if k not in new]
        body = {
            "set_tags": new,
            "remove_tags": drop,
            "properties": string_map(add_properties, "add_properties"),
            "description": description,
        }
        answer = self.workspace.transport.send(
            "PATCH", f"/api/v1/models/{self.name}/versions/{self.version}", body
        )
        self._set(ModelRecord.of(answer))

    def add_tags(self, tags: Mapping[str, str]) -> None:
        """Add or change tags."""
        self.update(add_tags=tags)

    def remove_tags(self, tags: Sequence[str]) -> None:
        """Remove the tags with these keys."""
        self.update(remove_tags=tags)

    def add_properties(self, properties: Mapping[str, str]) -> None:
        """Add properties (a property once set is not changed)."""
        self.update(add_properties=properties)

    def delete(self) -> Deleted:
        """Delete this version (refused while a deployment uses it)."""
        answer = self.workspace.transport.request(
            "DELETE", f"/api/v1/models/{self.name}/versions/{self.version}"
        )
        return Deleted.of(answer.json())

    @staticmethod
    def deploy(
        workspace: Hub,
        name: str,
        models: Sequence[Model],
        inference_config: InferenceConfig | None = None,
        deployment_config: DeploymentConfig | None = None,
        deployment_target: Target | None = None,
        overwrite: bool = False,
        show_output: bool = False,
        *,
        target: Target | None = None,
        progress: ProgressOption = None,
    ) -> Service:
        """Build, sign, push and deploy ``models`` with ``inference_config`` as service ``name``.

        The module (named ``name``, versioned 1, 2, … — reused when nothing changed) holds the
        entry script's folder under ``src/`` and the models under ``model/`` (one model: its
        files there; several: ``model/NAME/VERSION/…``, as Azure ML lays them out). It is
        signed with your key (``Hub(key=...)``, default the one ``edgepack keygen`` made);
        only the source files the hub lacks are uploaded, since the models' files are on the
        hub already. ``target`` (or Azure's ``deployment_target``) defaults to the hub's.
        An existing service of that name is updated only with ``overwrite=True``.
        ``models=[]`` deploys the source folder alone, as Azure deploys a local model that was
        never registered: the entry script loads it from its own folder (``model/`` is empty).

        The module signs the model files' digests as the hub's registry lists them: registering
        a model and deploying it trust the hub's registry alike.
        """
        from packager.sdk.deploy import deploy_models

        if target is not None and deployment_target is not None:
            raise BadArgument("Model.deploy: give target or deployment_target, not both")
        return deploy_models(
            workspace,
            name,
            models,
            inference_config,
            deployment_config,
            target if target is not None else deployment_target,
            overwrite=overwrite,
            show_output=show_output,
            progress=progress,
        )
