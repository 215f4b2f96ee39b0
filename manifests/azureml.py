"""Azure ML v1 ``inferenceconfig.json`` and ``deploymentconfig.json``, accepted as they are.

Every key the v1 CLI reference documents is accepted (most are recorded and ignored because
they describe Azure infrastructure); any other key is refused with a did-you-mean hint, so
that a typo such as ``entryScipt`` never silently falls back to a default. edgepack's own
settings live in an optional ``edgepack`` object, which Azure's tooling would not look at.
"""

from __future__ import annotations

from typing import Any, Literal, TypeVar

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, model_validator

from manifests.bounds import EnvMap, Port, TagMap, Text, finite
from manifests.desired import (
    DEFAULT_MAX_BODY_BYTES,
    MAX_BODY_BYTES_BOUND,
    MAX_BODY_BYTES_IN_FLIGHT_BOUND,
    MAX_CPUS,
    MAX_DATA_SPOOL_MB,
    MAX_MEMORY_MB,
    PROBE_PATH_PATTERN,
    DataCollection,
    DeploymentSettings,
    EndpointLimits,
    EndpointTLS,
    HealthProbe,
    RestartPolicy,
    RuntimeKind,
)
from manifests.errors import ConfigError
from manifests.validation import describe_validation_error

M = TypeVar("M", bound=BaseModel)


class _AzureModel(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


# --- inferenceconfig.json -------------------------------------------------------------------


class CondaDependencies(BaseModel):
    model_config = ConfigDict(extra="allow")


class EnvironmentPython(_AzureModel):
    user_managed_dependencies: bool | None = Field(None, alias="userManagedDependencies")
    interpreter_path: str | None = Field(None, alias="interpreterPath")
    conda_dependencies_file: str | None = Field(None, alias="condaDependenciesFile")
    conda_dependencies: dict[str, Any] | None = Field(None, alias="condaDependencies")
    base_conda_environment: str | None = Field(None, alias="baseCondaEnvironment")


class ImageRegistry(_AzureModel):
    address: str | None = None
    username: str | None = None
    password: str | None = None
    registry_identity: dict[str, Any] | None = Field(None, alias="registryIdentity")


class EnvironmentDocker(_AzureModel):
    enabled: bool | None = None
    base_image: str | None = Field(None, alias="baseImage")
    platform: dict[str, Any] | None = None
    base_dockerfile: str | None = Field(None, alias="baseDockerfile")
    shared_volumes: bool | None = Field(None, alias="sharedVolumes")
    shm_size: str | None = Field(None, alias="shmSize")
    arguments: list[str] | None = None
    base_image_registry: ImageRegistry | None = Field(None, alias="baseImageRegistry")
    build_context: dict[str, Any] | None = Field(None, alias="buildContext")


class Environment(_AzureModel):
    name: str | None = None
    version: str | None = None
    python: EnvironmentPython | None = None
    docker: EnvironmentDocker | None = None
    environment_variables: EnvMap = Field(default_factory=dict, alias="environmentVariables")
    inferencing_stack_version: str | None = Field(None, alias="inferencingStackVersion")
    spark: dict[str, Any] | None = None
    databricks: dict[str, Any] | None = None
    r: dict[str, Any] | None = None
    asset_id: str | None = Field(None, alias="assetId")


class InferenceConfig(_AzureModel):
    """``inferenceconfig.json`` in the Azure ML v1 CLI schema."""

    entry_script: str = Field(alias="entryScript")
    source_directory: str | None = Field(None, alias="sourceDirectory")
    environment: Environment | None = None
    # The pre-environment (legacy) keys of the same schema.
    runtime: Literal["python", "spark-py"] | None = None
    conda_file: str | None = Field(None, alias="condaFile")
    extra_dockerfile_steps: str | None = Field(None, alias="extraDockerfileSteps")
    enable_gpu: bool | None = Field(None, alias="enableGpu")
    base_image: str | None = Field(None, alias="baseImage")
    base_image_registry: ImageRegistry | None = Field(None, alias="baseImageRegistry")
    cuda_version: str | None = Field(None, alias="cudaVersion")
    schema_file: str | None = Field(None, alias="schemaFile")
    dependencies: list[str] | None = None
    description: str | None = None

    def pip_requirements(self) -> list[str]:
        """pip packages named in the environment's conda dependencies, if any."""
        if not self.environment or not self.environment.python:
            return []
        conda = self.environment.python.conda_dependencies or {}
        out: list[str] = []
        for dep in conda.get("dependencies", []):
            if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
                out.extend(str(p) for p in dep["pip"])
        return out

    def environment_variables(self) -> dict[str, str]:
        return dict(self.environment.environment_variables) if self.environment else {}

    def docker_image(self) -> str | None:
        if self.environment and self.environment.docker and self.environment.docker.base_image:
            return self.environment.docker.base_image
        return self.base_image


# --- deploymentconfig.json ------------------------------------------------------------------

MAX_MEMORY_GB = MAX_MEMORY_MB / 1024


class ContainerResourceRequirements(_AzureModel):
    cpu: float | None = Field(None, gt=0, le=MAX_CPUS, allow_inf_nan=False)
    memory_in_gb: float | None = Field(None, alias="memoryInGB", gt=0, le=MAX_MEMORY_GB, allow_inf_nan=False)
    cpu_limit: float | None = Field(None, alias="cpuLimit", gt=0, le=MAX_CPUS, allow_inf_nan=False)
    memory_in_gb_limit: float | None = Field(
        None, alias="memoryInGBLimit", gt=0, le=MAX_MEMORY_GB, allow_inf_nan=False
    )
    gpu: int | None = Field(None, strict=True, ge=0, le=1024)


class LivenessProbeRequirements(_AzureModel):
    period_seconds: int = Field(10, alias="periodSeconds", strict=True, ge=1, le=3600)
    initial_delay_seconds: int = Field(310, alias="initialDelaySeconds", strict=True, ge=0, le=86400)
    timeout_seconds: int = Field(2, alias="timeoutSeconds", strict=True, ge=1, le=600)
    failure_threshold: int = Field(3, alias="failureThreshold", strict=True, ge=1, le=1000)
    success_threshold: int = Field(1, alias="successThreshold", strict=True, ge=1, le=1000)


class AutoScaler(_AzureModel):
    autoscale_enabled: bool | None = Field(None, alias="autoscaleEnabled")
    min_replicas: int | None = Field(None, alias="minReplicas")
    max_replicas: int | None = Field(None, alias="maxReplicas")
    refresh_period_in_seconds: int | None = Field(None, alias="refreshPeriodInSeconds")
    target_utilization: int | None = Field(None, alias="targetUtilization")


#: An endpoint key a user chose: long enough to resist guessing, printable, no spaces.
ENDPOINT_KEY_PATTERN = r"^[\x21-\x7e]{16,256}$"


class AzureKeys(_AzureModel):
    """Endpoint keys given in the config instead of made by the hub."""

    primary_key: str | None = Field(None, alias="primaryKey", pattern=ENDPOINT_KEY_PATTERN)
    secondary_key: str | None = Field(None, alias="secondaryKey", pattern=ENDPOINT_KEY_PATTERN)


class AzureDataCollection(_AzureModel):
    """Azure's ``dataCollection`` (AKS): ``storageEnabled`` turns ``ModelDataCollector`` on."""

    storage_enabled: bool = Field(False, alias="storageEnabled")


class EdgepackDataCollection(_AzureModel):
    """How much collected data a device keeps and sends (``edgepack.dataCollection``)."""

    sample_rate: float | None = finite(default=None, gt=0, le=1, alias="sampleRate")
    spool_quota_mb: int | None = Field(None, alias="spoolQuotaMB", strict=True, ge=1, le=MAX_DATA_SPOOL_MB)


class EdgepackExtension(_AzureModel):
    """edgepack's own deployment settings; everything optional."""

    runtime: RuntimeKind | None = None
    workers: int | None = Field(None, strict=True, ge=1, le=64)
    restart_policy: RestartPolicy | None = Field(None, alias="restartPolicy")
    environment_variables: EnvMap = Field(default_factory=dict, alias="environmentVariables")
    health_path: str | None = Field(None, alias="healthPath", pattern=PROBE_PATH_PATTERN)
    # The scoring server under hostile clients (see edge_agent.scoring.limits).
    max_connections: int | None = Field(None, alias="maxConnections", strict=True, ge=1, le=100_000)
    header_timeout_seconds: float | None = finite(default=None, gt=0, le=3600, alias="headerTimeoutSeconds")
    body_timeout_seconds: float | None = finite(default=None, gt=0, le=3600, alias="bodyTimeoutSeconds")
    run_timeout_seconds: float | None = finite(default=None, gt=0, le=3600, alias="runTimeoutSeconds")
    # The largest input the model takes, as a request body; and what one worker may hold of
    # all bodies at once (null: BODIES_IN_FLIGHT times maxBodyBytes).
    max_body_bytes: int | None = Field(None, alias="maxBodyBytes", strict=True, ge=1, le=MAX_BODY_BYTES_BOUND)
    max_body_bytes_in_flight: int | None = Field(
        None, alias="maxBodyBytesInFlight", strict=True, ge=1, le=MAX_BODY_BYTES_IN_FLIGHT_BOUND
    )
    data_collection: EdgepackDataCollection | None = Field(None, alias="dataCollection")
    start_timeout_s: float | None = Field(
        None,
        alias="startTimeoutSeconds",
        gt=0,
        le=3600,
        allow_inf_nan=False,
        description="how long a new version may take to become ready before it is abandoned",
    )

    @model_validator(mode="after")
    def _a_body_fits_the_budget(self) -> EdgepackExtension:
        body, in_flight = self.max_body_bytes or DEFAULT_MAX_BODY_BYTES, self.max_body_bytes_in_flight
        if in_flight is not None and in_flight < body:
            raise ValueError(
                f"maxBodyBytesInFlight ({in_flight}) is less than maxBodyBytes ({body}): "
                "no request of the largest size could ever be taken"
            )
        return self


class DeploymentConfig(_AzureModel):
    """``deploymentconfig.json`` in the Azure ML v1 CLI schema (local, ACI, AKS, IoT Edge)."""

    compute_type: Literal["local", "aci", "aks", "iotedge", "edge", "ACI", "AKS", "Local"] = Field(
        "local", alias="computeType"
    )
    port: Port | None = None
    container_resource_requirements: ContainerResourceRequirements | None = Field(
        None, alias="containerResourceRequirements"
    )
    liveness_probe_requirements: LivenessProbeRequirements | None = Field(
        None, alias="livenessProbeRequirements"
    )
    # Documented ACI / AKS keys. Those edgepack does not act on are accepted, recorded and
    # named in a warning at deploy time (ignored_keys), never silently dropped.
    location: str | None = None
    auth_enabled: bool | None = Field(None, alias="authEnabled")
    token_auth_enabled: bool | None = Field(None, alias="tokenAuthEnabled")
    ssl_enabled: bool | None = Field(None, alias="sslEnabled")
    ssl_certificate: str | None = Field(None, alias="sslCertificate")
    ssl_key: str | None = Field(None, alias="sslKey")
    cname: str | None = None
    dns_name_label: str | None = Field(None, alias="dnsNameLabel")
    app_insights_enabled: bool | None = Field(None, alias="appInsightsEnabled")
    data_collection: AzureDataCollection | None = Field(None, alias="dataCollection")
    autoscaler: AutoScaler | None = Field(
        None, validation_alias=AliasChoices("autoScaler", "autoscaler"), alias="autoScaler"
    )
    num_replicas: int | None = Field(None, alias="numReplicas", ge=1, le=1000)
    scoring_timeout_ms: int | None = Field(None, alias="scoringTimeoutMs", strict=True, ge=1, le=3_600_000)
    max_concurrent_requests_per_container: int | None = Field(
        None, alias="maxConcurrentRequestsPerContainer", strict=True, ge=1, le=10_000
    )
    max_queue_wait_ms: int | None = Field(None, alias="maxQueueWaitMs", ge=0, le=3_600_000)
    gpu_cores: int | None = Field(None, alias="gpuCores", ge=0, le=1024)
    keys: AzureKeys | None = None
    namespace: str | None = None
    compute_target_name: str | None = Field(None, alias="computeTargetName")
    description: Text | None = None
    tags: TagMap | None = None
    properties: TagMap | None = None
    edgepack: EdgepackExtension | None = None

    @model_validator(mode="after")
    def _tuning_needs_collection_on(self) -> DeploymentConfig:
        ext = self.edgepack
        if ext is not None and ext.data_collection is not None and not self.collects_data:
            raise ValueError(
                "edgepack.dataCollection tunes data collection, which is off: "
                'set "dataCollection": {"storageEnabled": true} to turn it on'
            )
        return self

    @property
    def collects_data(self) -> bool:
        return self.data_collection is not None and self.data_collection.storage_enabled

    def _data_collection(self) -> DataCollection | None:
        if not self.collects_data:
            return None
        tuned = (self.edgepack.data_collection if self.edgepack else None) or EdgepackDataCollection()
        defaults = DataCollection()
        return DataCollection(
            sample_rate=tuned.sample_rate if tuned.sample_rate is not None else defaults.sample_rate,
            spool_quota_mb=tuned.spool_quota_mb or defaults.spool_quota_mb,
        )

    def ignored_keys(self) -> list[str]:
        """The documented keys set here that edgepack does not act on, for a deploy warning."""
        set_fields = self.model_fields_set
        out = [
            type(self).model_fields[name].alias or name
            for name in (
                "location",
                "ssl_certificate",
                "ssl_key",
                "cname",
                "dns_name_label",
                "app_insights_enabled",
                "autoscaler",
                "num_replicas",
                "max_queue_wait_ms",
                "gpu_cores",
                "namespace",
                "compute_target_name",
            )
            if name in set_fields and getattr(self, name) not in (None, False)
        ]
        if self.token_auth_enabled:
            out.append("tokenAuthEnabled (edgepack endpoints use keys: authEnabled)")
        if self.ssl_enabled and (self.ssl_certificate or self.ssl_key):
            out.append("sslCertificate/sslKey (the certificate comes from the hub's endpoint CA)")
        res = self.container_resource_requirements
        if res is not None and res.gpu:
            out.append("containerResourceRequirements.gpu")
        probe = self.liveness_probe_requirements
        if probe is not None and "success_threshold" in probe.model_fields_set:
            out.append("livenessProbeRequirements.successThreshold")
        return out

    def to_settings(self, *, default_port: int = 8890) -> DeploymentSettings:
        """Turn this config into the per-module settings a device receives.

        ``authEnabled`` is not decided here: the hub makes (or takes from ``keys``) the
        endpoint keys and puts their hashes into ``auth``.
        """
        ext = self.edgepack or EdgepackExtension()
        res = self.container_resource_requirements
        cpu = (res.cpu_limit or res.cpu) if res else None
        mem_gb = (res.memory_in_gb_limit or res.memory_in_gb) if res else None
        probe = self.liveness_probe_requirements
        start = ext.start_timeout_s if ext.start_timeout_s is not None else HealthProbe().start_timeout_s
        health = HealthProbe(path=ext.health_path or "/healthz", start_timeout_s=start)
        if probe is not None:
            health = HealthProbe(
                path=health.path,
                period_s=probe.period_seconds,
                # Azure's 310 s default is sized for image builds; a device starts in seconds.
                initial_delay_s=min(probe.initial_delay_seconds, 600),
                timeout_s=probe.timeout_seconds,
                failure_threshold=probe.failure_threshold,
                start_timeout_s=start,
            )
        return DeploymentSettings(
            port=self.port or default_port,
            env=dict(ext.environment_variables),
            runtime=ext.runtime,
            restart_policy=ext.restart_policy or RestartPolicy.ALWAYS,
            workers=ext.workers or 1,
            cpu=cpu,
            memory_mb=int(mem_gb * 1024) if mem_gb else None,
            health=health,
            tls=EndpointTLS() if self.ssl_enabled else None,
            limits=self._limits(ext),
            data_collection=self._data_collection(),
        )

    def _limits(self, ext: EdgepackExtension) -> EndpointLimits:
        defaults = EndpointLimits()
        run_timeout = ext.run_timeout_seconds
        if run_timeout is None and self.scoring_timeout_ms is not None:
            run_timeout = self.scoring_timeout_ms / 1000  # Azure's own name for the same limit
        return EndpointLimits(
            max_connections=ext.max_connections or defaults.max_connections,
            header_timeout_s=ext.header_timeout_seconds or defaults.header_timeout_s,
            body_timeout_s=ext.body_timeout_seconds or defaults.body_timeout_s,
            run_timeout_s=run_timeout or defaults.run_timeout_s,
            max_body_bytes=ext.max_body_bytes or defaults.max_body_bytes,
            max_body_bytes_in_flight=ext.max_body_bytes_in_flight,
        )


# --- parsing with errors that name the file and the field -----------------------------------


def parse_config(model: type[M], data: Any, *, source: str) -> M:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a JSON object at the top level")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(describe_validation_error(exc, source=source, model=model)) from None
