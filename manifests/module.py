"""The module manifest: what a signed ``.edgepack`` bundle promises.

A module's files live under two roots inside the bundle: ``src/`` (the source directory with
the entry script) and ``model/`` (the model file or folder, kept under its own base name, as
Azure ML places a registered model under ``AZUREML_MODEL_DIR``). ``model/`` may be empty: a
module deployed the way Azure deploys a local model carries it in ``src/``.
"""

from __future__ import annotations

import posixpath
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from manifests.bounds import Count, EnvMap, TagMap, Text
from manifests.digests import DIGEST_PATTERN

MODULE_SCHEMA = "edgepack.module/v1"
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,62})$"
VERSION_PATTERN = r"^[0-9A-Za-z]([0-9A-Za-z.+_-]{0,62})$"
SRC_ROOT = "src"
MODEL_ROOT = "model"
#: Tags ``edgepack.model.1``, ``edgepack.model.2``, ... name the registered models
#: (``NAME:VERSION``) a module was built from. Signed with the rest, they are what makes a
#: model "in use" by a deployment of the module: byte-identical files alone do not.
MODEL_TAG_PREFIX = "edgepack.model."


def check_relative_path(path: str) -> str:
    """Refuse any path that could escape the directory it is unpacked into."""
    if not path or "\\" in path or "\x00" in path:
        raise ValueError(f"unsafe path {path!r}: empty, backslash or NUL")
    if path.startswith("/"):
        raise ValueError(f"unsafe path {path!r}: absolute")
    parts = path.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"unsafe path {path!r}: empty, '.' or '..' component")
    if posixpath.normpath(path) != path:
        raise ValueError(f"unsafe path {path!r}: not normalised")
    return path


def model_tags(refs: list[str]) -> dict[str, str]:
    """The tags that record ``refs`` (``NAME:VERSION``) as the models a module is built from."""
    return {f"{MODEL_TAG_PREFIX}{i}": ref for i, ref in enumerate(refs, start=1)}


def tagged_models(tags: dict[str, Any]) -> list[str]:
    """The ``NAME:VERSION`` refs of the models that ``tags`` say a module was built from, in
    the order they were given (which decides where several lie under ``model/``)."""
    numbered = []
    for key, value in tags.items():
        number = key.removeprefix(MODEL_TAG_PREFIX)
        if key.startswith(MODEL_TAG_PREFIX) and number.isdigit():
            numbered.append((int(number), str(value)))
    return [ref for _, ref in sorted(numbered)]


class FileEntry(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(description="relative POSIX path inside the module, under src/ or model/")
    size: Count
    digest: str = Field(pattern=DIGEST_PATTERN)

    @field_validator("path")
    @classmethod
    def _safe_path(cls, v: str) -> str:
        check_relative_path(v)
        if v.split("/", 1)[0] not in (SRC_ROOT, MODEL_ROOT):
            raise ValueError(f"path {v!r} must lie under {SRC_ROOT}/ or {MODEL_ROOT}/")
        return v


class PythonRuntime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requirements: list[Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=list, max_length=1000, description="pip requirement strings the entry script needs"
    )
    conda_file: str | None = Field(default=None, max_length=1024, description="conda YAML kept for reference")


class Runtime(BaseModel):
    model_config = ConfigDict(extra="forbid")

    image: str = Field(
        default="edgepack/runtime:py311",
        max_length=1024,
        pattern=r"^[\x21-\x7e]+$",
        description="container image for the docker runtime",
    )
    image_digest: str | None = Field(default=None, pattern=DIGEST_PATTERN)
    python: PythonRuntime = Field(default_factory=PythonRuntime)
    environment: EnvMap = Field(default_factory=dict, description="environment variables every instance gets")


class Resources(BaseModel):
    """Requested resources; the agent turns them into limits."""

    model_config = ConfigDict(extra="forbid")

    cpu: float = Field(default=0.5, gt=0, le=256, allow_inf_nan=False)
    memory_mb: int = Field(default=512, strict=True, gt=0, le=1 << 20)


class ModuleManifest(BaseModel):
    """The ``signed`` payload of ``module.json``."""

    model_config = ConfigDict(extra="forbid")

    schema_: Literal["edgepack.module/v1"] = Field(default="edgepack.module/v1", alias="schema")
    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(pattern=VERSION_PATTERN)
    created: datetime
    description: Text = ""
    entry_script: str = Field(max_length=4096, description="path of the entry script, under src/")
    runtime: Runtime = Field(default_factory=Runtime)
    resources: Resources = Field(default_factory=Resources)
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None
    tags: TagMap = Field(default_factory=dict)
    files: list[FileEntry] = Field(max_length=1_000_000)

    @model_validator(mode="after")
    def _consistent(self) -> ModuleManifest:
        paths = [f.path for f in self.files]
        if len(set(paths)) != len(paths):
            raise ValueError("files lists a path twice")
        if paths != sorted(paths):
            raise ValueError("files must be sorted by path")
        check_relative_path(self.entry_script)
        if not self.entry_script.startswith(SRC_ROOT + "/"):
            raise ValueError(f"entry_script must lie under {SRC_ROOT}/")
        if self.entry_script not in paths:
            raise ValueError(f"entry_script {self.entry_script!r} is not among files")
        return self

    @property
    def ref(self) -> str:
        return f"{self.name}:{self.version}"

    def payload(self) -> dict[str, Any]:
        """The JSON-ready dict that gets signed."""
        return self.model_dump(mode="json", by_alias=True)

    def total_size(self) -> int:
        return sum(f.size for f in self.files)
