"""The model registry (Azure ML's "register your model"): named, versioned sets of files.

A model version is a list of ``(path, digest, size)`` whose bytes the blob store already
holds (the CLI uploads them first, skipping any the hub has). Versions count up per name and
are allocated in the database under the registry lock, so concurrent registrations on any
number of hub replicas get distinct, consecutive versions; a deleted version is never reused.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.orm import Session, selectinload

from cloud_hub.db.base import Sessions
from cloud_hub.errors import NotFound
from cloud_hub.events import record_event
from cloud_hub.registry.blob_refs import lock_registry
from cloud_hub.registry.tables import ModelFile, ModelName, ModelVersion
from cloud_hub.registry.tags import check_tags, matches
from cloud_hub.registry.usage import delete_unless_used, lock_fleet
from cloud_hub.store.blobs import BlobStore, check_digest
from manifests.bounds import MAX_INT63, MAX_TAGS
from manifests.errors import ConfigError
from manifests.module import NAME_PATTERN, check_relative_path

_NAME = re.compile(NAME_PATTERN)


@dataclass(frozen=True)
class FileRef:
    path: str
    digest: str
    size: int


def check_model_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ConfigError(
            f"model name {name!r} is invalid: lower-case letters, digits, '.', '_', '-' "
            "(starting with a letter or digit, at most 63)"
        )
    return name


def check_files(files: Sequence[FileRef]) -> list[FileRef]:
    """Paths safe and distinct, digests well-formed; sorted by path. Pure."""
    if not files:
        raise ConfigError("a model needs at least one file")
    seen: set[str] = set()
    for f in files:
        try:
            check_relative_path(f.path)
        except ValueError as exc:
            raise ConfigError(f"model file {exc}") from None
        if f.path in seen:
            raise ConfigError(f"model file {f.path!r} is listed twice")
        if f.size < 0:
            raise ConfigError(f"model file {f.path!r} has a negative size")
        check_digest(f.digest)
        seen.add(f.path)
    # 'a' and 'a/b' cannot both be written out: the download would fail half-way.
    folders = {p[:i] for p in seen for i, ch in enumerate(p) if ch == "/"}
    if clash := sorted(folders & seen):
        raise ConfigError(f"model file {clash[0]!r} is also the folder of other files; rename one")
    return sorted(files, key=lambda f: f.path)


def parse_version(version: str | int) -> int | None:
    """``latest`` → None, else the positive version number."""
    if isinstance(version, int):
        if not 0 < version <= MAX_INT63:
            raise ConfigError(f"model version {version} is out of range")
        return version
    if version == "latest":
        return None
    # ASCII digits only (superscripts and Arabic-Indic digits pass str.isdigit) and within 63
    # bits, as the database holds.
    if re.fullmatch(r"[0-9]{1,19}", version) and 0 < int(version) <= MAX_INT63:
        return int(version)
    raise ConfigError(f"model version {version[:40]!r} is not a number (1 to {MAX_INT63}) or 'latest'")


def _allocate_version(session: Session, name: str) -> int:
    bumped = session.execute(
        update(ModelName).where(ModelName.name == name).values(last_version=ModelName.last_version + 1)
    )
    if bumped.rowcount == 0:  # type: ignore[attr-defined]
        session.add(ModelName(name=name, last_version=1))
        session.flush()
        return 1
    last = session.scalar(select(ModelName.last_version).where(ModelName.name == name))
    assert last is not None
    return last


def register_model(
    sessions: Sessions,
    blobs: BlobStore,
    name: str,
    files: Sequence[FileRef],
    *,
    description: str = "",
    tags: Mapping[str, str] | None = None,
    properties: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Register a new version of ``name`` over blobs the store holds."""
    check_model_name(name)
    checked = check_files(files)
    clean_tags = check_tags(tags or {})
    with sessions.begin() as session:
        # The lock comes first: it serialises version allocation and keeps a concurrent delete
        # from removing a blob this version is about to name.
        lock_registry(session)
        for f in checked:
            if not blobs.has(f.digest):
                raise ConfigError(
                    f"model file {f.path!r}: blob {f.digest} is not on the hub; upload it first "
                    "(PUT /api/v1/blobs/<digest>, which 'edgepack model register' does)"
                )
            held = blobs.size(f.digest)
            if held != f.size:
                raise ConfigError(f"model file {f.path!r} is {f.size} bytes, but blob {f.digest} has {held}")
        model = ModelVersion(
            name=name,
            version=_allocate_version(session, name),
            description=description,
            tags=clean_tags,
            properties=dict(properties or {}),
            size=sum(f.size for f in checked),
            files=[ModelFile(path=f.path, digest=f.digest, size=f.size) for f in checked],
        )
        session.add(model)
        record_event(session, "model_registered", f"model {model.ref} registered ({len(checked)} files)")
    return model


def get_model(session: Session, name: str, version: str | int = "latest") -> ModelVersion:
    """One version (``latest`` = highest); NotFound naming what exists."""
    number = parse_version(version)
    query = select(ModelVersion).where(ModelVersion.name == name).options(selectinload(ModelVersion.files))
    if number is None:
        query = query.order_by(ModelVersion.version.desc()).limit(1)
    else:
        query = query.where(ModelVersion.version == number)
    model = session.scalar(query)
    if model is not None:
        return model
    known = list(session.scalars(select(ModelVersion.version).where(ModelVersion.name == name)))
    if known:
        listed = ", ".join(str(v) for v in sorted(known))
        raise NotFound(f"model {name}:{version} does not exist; known versions: {listed}")
    raise NotFound(
        f"model {name!r} is not registered; register it with 'edgepack model register -n {name} -p PATH'"
    )


def list_models(
    session: Session, *, name: str | None = None, filters: Mapping[str, str | None] | None = None
) -> list[ModelVersion]:
    """Every version (optionally of one name), oldest first per name, filtered by tags.

    Tags are filtered here rather than in SQL: JSON querying is not portable across backends.
    """
    query = (
        select(ModelVersion)
        .options(selectinload(ModelVersion.files))
        .order_by(ModelVersion.name, ModelVersion.version)
    )
    if name is not None:
        query = query.where(ModelVersion.name == name)
    return [m for m in session.scalars(query) if matches(m.tags, filters or {})]


def update_model(
    sessions: Sessions,
    name: str,
    version: str | int,
    *,
    set_tags: Mapping[str, str] | None = None,
    remove_tags: Sequence[str] = (),
    description: str | None = None,
    properties: Mapping[str, Any] | None = None,
) -> ModelVersion:
    """Change a version's tags, description or (added, never removed) properties.

    The files never change: a new version is what changes a model's content.
    """
    clean = check_tags(set_tags or {})
    with sessions.begin() as session:
        model = get_model(session, name, version)
        tags = {k: v for k, v in model.tags.items() if k not in remove_tags}
        model.tags = {**tags, **clean}
        if len(model.tags) > MAX_TAGS:
            raise ConfigError(f"a model version has at most {MAX_TAGS} tags; remove some first")
        if properties:
            model.properties = {**model.properties, **properties}
        if description is not None:
            model.description = description
        record_event(session, "model_updated", f"model {model.ref} updated")
    return model


def delete_model(sessions: Sessions, blobs: BlobStore, name: str, version: str | int) -> list[str]:
    """Remove one version unless a deployment uses it; return the blobs freed."""
    if parse_version(version) is None:
        raise ConfigError("delete names an exact model version (NAME:VERSION), not 'latest'")
    with sessions.begin() as session:
        lock_fleet(session)
        lock_registry(session)
        return delete_unless_used(session, blobs, get_model(session, name, version))
