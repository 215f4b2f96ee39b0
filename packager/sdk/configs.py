"""``InferenceConfig`` and ``DeploymentConfig``: Azure ML's two configurations, in Python.

Each accepts exactly what its JSON file accepts (``inferenceconfig.json``,
``deploymentconfig.json`` in Azure ML's v1 schema, see ``manifests.azureml``), as keyword
arguments named as in Azure ML's SDK, or from the file itself (:meth:`from_file`). Every
value is checked when the object is made: an unknown keyword or a misspelt field in a file is
a :class:`~packager.sdk.errors.BadArgument` with a did-you-mean, never a silent default.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from pydantic import ValidationError

from manifests import azureml
from manifests.desired import DeploymentSettings
from manifests.errors import ConfigError
from packager.files import load_json_file
from packager.sdk.environment import Environment
from packager.sdk.errors import BadArgument, unknown_keywords


def _document(model: type[azureml.M], data: dict[str, Any], source: str) -> azureml.M:
    try:
        return azureml.parse_config(model, data, source=source)
    except ConfigError as exc:
        raise BadArgument(str(exc)) from None


def _from_file(model: type[azureml.M], path: str | Path) -> tuple[azureml.M, Path]:
    file = Path(path)
    try:
        data = load_json_file(file, what="config file")
    except ConfigError as exc:
        raise BadArgument(str(exc)) from None
    return _document(model, data, str(file)), file.resolve().parent


def _kwargs_error(what: str, exc: ValidationError, paths: dict[str, tuple[str, ...]]) -> BadArgument:
    """A validation error of the JSON a constructor made, named by the keyword it came from."""
    err = exc.errors()[0]
    loc = tuple(str(p) for p in err["loc"])
    name = next((k for k, path in paths.items() if path == loc), ".".join(loc))
    return BadArgument(f"{what}: {name}: {err['msg']}")


class InferenceConfig:
    """How a model is served: the entry script, its folder and its environment.

    ``entry_script`` (and ``source_directory``) are relative to the current folder when the
    object is made, as in Azure ML; :meth:`from_file` resolves them against the file's folder.
    """

    #: keyword → where it goes in ``inferenceconfig.json``
    _PATHS: ClassVar[dict[str, tuple[str, ...]]] = {
        "entry_script": ("entryScript",),
        "source_directory": ("sourceDirectory",),
        "environment": ("environment",),
        "description": ("description",),
        "runtime": ("runtime",),
        "conda_file": ("condaFile",),
        "extra_docker_file_steps": ("extraDockerfileSteps",),
        "enable_gpu": ("enableGpu",),
        "base_image": ("baseImage",),
        "base_image_registry": ("baseImageRegistry",),
        "cuda_version": ("cudaVersion",),
    }

    def __init__(
        self,
        entry_script: str | Path | None = None,
        runtime: str | None = None,
        conda_file: str | None = None,
        extra_docker_file_steps: str | None = None,
        source_directory: str | Path | None = None,
        enable_gpu: bool | None = None,
        description: str | None = None,
        base_image: str | None = None,
        base_image_registry: dict[str, Any] | None = None,
        cuda_version: str | None = None,
        environment: Environment | dict[str, Any] | None = None,
        **unknown: Any,
    ) -> None:
        error = unknown_keywords("InferenceConfig", unknown, self._PATHS)
        if error is not None:
            raise error
        if entry_script is None:
            raise BadArgument("InferenceConfig: entry_script is required, e.g. entry_script='score.py'")
        if environment is not None and not isinstance(environment, Environment | dict):
            raise BadArgument(
                f"InferenceConfig: environment must be an Environment, not {type(environment).__name__}"
            )
        values = {
            "entry_script": str(entry_script),
            "source_directory": str(source_directory) if source_directory is not None else None,
            "environment": environment.to_json() if isinstance(environment, Environment) else environment,
            "description": description,
            "runtime": runtime,
            "conda_file": conda_file,
            "extra_docker_file_steps": extra_docker_file_steps,
            "enable_gpu": enable_gpu,
            "base_image": base_image,
            "base_image_registry": base_image_registry,
            "cuda_version": cuda_version,
        }
        data = {self._PATHS[k][0]: v for k, v in values.items() if v is not None}
        try:
            self.document = azureml.InferenceConfig.model_validate(data)
        except ValidationError as exc:
            raise _kwargs_error("InferenceConfig", exc, self._PATHS) from None
        #: the folder relative paths are resolved against
        self.base_dir = Path.cwd()

    @classmethod
    def from_file(cls, path: str | Path) -> InferenceConfig:
        """Read an Azure ML ``inferenceconfig.json``."""
        document, base = _from_file(azureml.InferenceConfig, path)
        return cls._of(document, base)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, base_dir: str | Path | None = None) -> InferenceConfig:
        """Take the JSON object of an ``inferenceconfig.json`` (paths relative to ``base_dir``)."""
        document = _document(azureml.InferenceConfig, data, "inference config")
        return cls._of(document, Path(base_dir).resolve() if base_dir else Path.cwd())

    @classmethod
    def _of(cls, document: azureml.InferenceConfig, base: Path) -> InferenceConfig:
        config = cls.__new__(cls)
        config.document, config.base_dir = document, base
        return config

    @property
    def entry_script(self) -> str:
        """The entry script, as given (relative to ``base_dir`` or ``source_directory``)."""
        return self.document.entry_script

    @property
    def source_directory(self) -> str | None:
        """The folder packed under ``src/``, as given."""
        return self.document.source_directory

    def to_json(self) -> dict[str, Any]:
        """The configuration as ``inferenceconfig.json`` holds it."""
        return self.document.model_dump(mode="json", by_alias=True, exclude_none=True)

    def __repr__(self) -> str:
        return f"InferenceConfig({self.to_json()!r})"


class DeploymentConfig:
    """How a service runs on each device: port, resources, health probe, runtime, endpoint
    security. The keywords are those of Azure ML's ``*Webservice.deploy_configuration``; the
    edgepack-only ones (``runtime``, ``workers``, ``restart_policy``, ``environment_variables``,
    ``health_path``, ``start_timeout_seconds``) fill the file's ``edgepack`` object.
    ``collect_model_data=True`` (Azure's keyword) turns on ``ModelDataCollector`` in the
    module (``dataCollection.storageEnabled``); ``data_sample_rate`` and ``data_spool_quota_mb``
    tune it (``edgepack.dataCollection``; see docs/data-collection.md).

    ``runtime`` is ``"docker"`` or ``"process"``. Left unset, ``hub.deploy`` runs the service in
    Docker (the hub's default), while ``Model.deploy`` picks Docker when the module pins its
    runtime image and the process runtime when it does not (Docker could not run it).
    """

    _PATHS: ClassVar[dict[str, tuple[str, ...]]] = {
        "compute_type": ("computeType",),
        "port": ("port",),
        "cpu_cores": ("containerResourceRequirements", "cpu"),
        "memory_gb": ("containerResourceRequirements", "memoryInGB"),
        "cpu_cores_limit": ("containerResourceRequirements", "cpuLimit"),
        "memory_gb_limit": ("containerResourceRequirements", "memoryInGBLimit"),
        "gpu_cores": ("gpuCores",),
        "period_seconds": ("livenessProbeRequirements", "periodSeconds"),
        "initial_delay_seconds": ("livenessProbeRequirements", "initialDelaySeconds"),
        "timeout_seconds": ("livenessProbeRequirements", "timeoutSeconds"),
        "failure_threshold": ("livenessProbeRequirements", "failureThreshold"),
        "success_threshold": ("livenessProbeRequirements", "successThreshold"),
        "scoring_timeout_ms": ("scoringTimeoutMs",),
        "auth_enabled": ("authEnabled",),
        "ssl_enabled": ("sslEnabled",),
        "primary_key": ("keys", "primaryKey"),
        "secondary_key": ("keys", "secondaryKey"),
        "tags": ("tags",),
        "properties": ("properties",),
        "description": ("description",),
        "runtime": ("edgepack", "runtime"),
        "workers": ("edgepack", "workers"),
        "restart_policy": ("edgepack", "restartPolicy"),
        "environment_variables": ("edgepack", "environmentVariables"),
        "health_path": ("edgepack", "healthPath"),
        "start_timeout_seconds": ("edgepack", "startTimeoutSeconds"),
        "collect_model_data": ("dataCollection", "storageEnabled"),
        "data_sample_rate": ("edgepack", "dataCollection", "sampleRate"),
        "data_spool_quota_mb": ("edgepack", "dataCollection", "spoolQuotaMB"),
    }

    def __init__(
        self,
        port: int | None = None,
        cpu_cores: float | None = None,
        memory_gb: float | None = None,
        *,
        compute_type: str = "local",
        cpu_cores_limit: float | None = None,
        memory_gb_limit: float | None = None,
        gpu_cores: int | None = None,
        period_seconds: int | None = None,
        initial_delay_seconds: int | None = None,
        timeout_seconds: int | None = None,
        failure_threshold: int | None = None,
        success_threshold: int | None = None,
        scoring_timeout_ms: int | None = None,
        auth_enabled: bool | None = None,
        ssl_enabled: bool | None = None,
        primary_key: str | None = None,
        secondary_key: str | None = None,
        tags: dict[str, str] | None = None,
        properties: dict[str, str] | None = None,
        description: str | None = None,
        runtime: str | None = None,
        workers: int | None = None,
        restart_policy: str | None = None,
        environment_variables: dict[str, str] | None = None,
        health_path: str | None = None,
        start_timeout_seconds: float | None = None,
        collect_model_data: bool | None = None,
        data_sample_rate: float | None = None,
        data_spool_quota_mb: int | None = None,
        **unknown: Any,
    ) -> None:
        error = unknown_keywords("DeploymentConfig", unknown, self._PATHS)
        if error is not None:
            raise error
        given = {k: v for k, v in locals().items() if k in self._PATHS and v is not None}
        data: dict[str, Any] = {}
        for key, value in given.items():
            *parents, leaf = self._PATHS[key]
            node = data
            for parent in parents:
                node = node.setdefault(parent, {})
            node[leaf] = value
        try:
            self.document = azureml.DeploymentConfig.model_validate(data)
        except ValidationError as exc:
            raise _kwargs_error("DeploymentConfig", exc, self._PATHS) from None
        self._json = data

    @classmethod
    def from_file(cls, path: str | Path) -> DeploymentConfig:
        """Read an Azure ML ``deploymentconfig.json`` (sent to the hub as it is)."""
        file = Path(path)
        try:
            data = load_json_file(file, what="config file")
        except ConfigError as exc:
            raise BadArgument(str(exc)) from None
        return cls._of(_document(azureml.DeploymentConfig, data, str(file)), data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DeploymentConfig:
        """Take the JSON object of a ``deploymentconfig.json``."""
        return cls._of(_document(azureml.DeploymentConfig, data, "deployment config"), data)

    @classmethod
    def _of(cls, document: azureml.DeploymentConfig, data: dict[str, Any]) -> DeploymentConfig:
        config = cls.__new__(cls)
        config.document, config._json = document, data
        return config

    @property
    def port(self) -> int | None:
        """The port the service listens on (None: the default, 8890)."""
        return self.document.port

    @property
    def runtime(self) -> str | None:
        """``"docker"``, ``"process"``, or None when not said."""
        return self.document.edgepack.runtime if self.document.edgepack else None

    def settings(self) -> DeploymentSettings:
        """What each device receives for this configuration (as the hub computes it)."""
        return self.document.to_settings()

    def to_json(self) -> dict[str, Any]:
        """The configuration as ``deploymentconfig.json`` holds it (a file's own keys, as given)."""
        return dict(self._json)

    def with_runtime(self, runtime: str) -> DeploymentConfig:
        """A copy whose ``edgepack.runtime`` is ``runtime``."""
        data = self.to_json()
        data["edgepack"] = {**data.get("edgepack", {}), "runtime": runtime}
        return DeploymentConfig.from_dict(data)

    def __repr__(self) -> str:
        return f"DeploymentConfig({self.to_json()!r})"
