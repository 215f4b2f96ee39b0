"""Hub configuration: command-line flags and ``EDGEPACK_HUB_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from manifests.logs import MAX_LINE_CHARS, LogLimits


def _default_data_dir() -> Path:
    # The hub's folder sits in the same home as the CLI's keys and login (packager.home),
    # so one EDGEPACK_HOME moves everything edgepack keeps on a machine.
    return Path(os.environ.get("EDGEPACK_HOME", Path.home() / ".edgepack")) / "hub"


class HubSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EDGEPACK_HUB_", extra="forbid")

    data_dir: Path = Field(default_factory=_default_data_dir)
    db: str | None = Field(default=None, description="SQLAlchemy URL; default sqlite:///<data_dir>/hub.db")
    host: str = "127.0.0.1"
    port: int = Field(default=8800, ge=0, le=65535)
    public_url: str | None = Field(
        default=None, description="URL devices use to reach this hub (default http://host:port)"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="admin token; generated into <data_dir>/admin_token if unset"
    )
    hub_key: Path | None = Field(
        default=None, description="hub signing key; generated into <data_dir>/hub.key if unset"
    )
    trusted_keys: list[Path] = Field(
        default_factory=list, description="publisher .pub files or trust-store JSON files"
    )
    # HTTPS: the hub's certificate chain and key (made by 'edgepack hub broker-config --tls'
    # into <data_dir>/tls/, which is used when these are unset and the files exist).
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = Field(
        default=None,
        description="CA certificate handed to devices at enrolment; default <data_dir>/tls/ca.crt if present",
    )
    allow_plain_http: bool = Field(
        default=False, description="serve plain HTTP on an address other than loopback (not advised)"
    )
    blob_store: str | None = Field(
        default=None,
        description="where blobs live: unset = <data_dir>/blobs; file:///FOLDER for a folder "
        "replicas share; s3://BUCKET?endpoint=URL for S3 (credentials from the AWS_* variables)",
    )
    max_upload_mb: int = Field(default=2048, gt=0)
    agent_bundle: Path | None = Field(
        default=None,
        description="folder 'edgepack hub agent-bundle build' wrote, served with /install.sh; "
        "default <data_dir>/agent-bundle if present",
    )
    # Device downloads (cloud_hub.api.downloads, docs/security.md §downloads): what a replica
    # remembers of who may fetch what.
    download_grant_ttl_s: float = Field(
        default=30.0, gt=0, le=300,
        description="a device revoked (or a module withdrawn) on another replica can still "
        "download for at most this long",
    )
    download_cache_devices: int = Field(
        default=100_000, ge=1, le=10_000_000, description="device grants held"
    )
    download_cache_modules: int = Field(
        default=1024, ge=1, le=1_000_000, description="modules whose manifest and blob list are held"
    )
    download_cache_blobs: int = Field(
        default=16_384, ge=1, le=10_000_000,
        description="blob files remembered as checked, and presigned S3 URLs kept for reuse",
    )
    download_offload: Literal["hub", "nginx"] = Field(
        default="hub",
        description="who sends blob bytes to devices: the hub, or nginx in front of it "
        "(X-Accel-Redirect: to the blob's file, needs 'edgepack hub nginx-config --blob-dir'; "
        "to a presigned GET in S3, needs '--s3-endpoint')",
    )
    download_url_ttl_s: int = Field(
        default=60, ge=5, le=3600, description="expiry of the presigned S3 URL handed to nginx"
    )
    # What any client that reaches the hub's port can hold (docs/security.md §13, enforced by
    # cloud_hub.connections and cloud_hub.api.body_limit): every bound per hub process.
    max_connections: int = Field(
        default=1024, ge=1, le=1_000_000,
        description="open connections; at the bound the oldest idle one is closed, else 503",
    )
    header_timeout_s: float = Field(
        default=10, gt=0, le=3600, description="a request head must be complete within this (408)"
    )
    max_head_kb: int = Field(default=64, ge=1, le=16384, description="largest request head (431)")
    body_timeout_s: float = Field(
        default=30, gt=0, le=3600,
        description="window in which a request body must bring body_min_bytes_per_s on average (408)",
    )
    body_min_bytes_per_s: int = Field(default=1024, ge=0, le=1 << 30)
    keep_alive_s: int = Field(default=5, ge=1, le=3600, description="idle time between requests")
    max_body_mb: int = Field(
        default=16, ge=1, le=1024, description="largest JSON or form body (uploads: max_upload_mb)"
    )
    max_bodies_in_flight_mb: int = Field(
        default=64, ge=1, le=65536,
        description="JSON and form bodies all requests together may hold in memory (503 beyond)",
    )
    desired_ttl_s: int = Field(default=7 * 24 * 3600, gt=0)
    upkeep_interval_s: float = Field(
        default=5.0, gt=0, description="seconds between upkeep rounds (renewals, unpublished states)"
    )
    telemetry_keep: int = Field(default=500, gt=0, le=1_000_000, description="samples kept per device")
    # What one device may send; the excess is dropped and counted (see cloud_hub.ingest.budget).
    device_reports_per_min: float = Field(default=120, gt=0, le=1e6)
    device_telemetry_per_min: float = Field(default=120, gt=0, le=1e6)
    device_events_per_min: float = Field(default=120, gt=0, le=1e6)
    events_keep: int = Field(default=100_000, ge=100, le=100_000_000, description="events kept")
    events_max_age_days: float = Field(default=30, gt=0, le=3650)
    # Zero-touch enrolment (docs/enrolment.md, security.md §19): join attempts per second this
    # process accepts (a token bucket of join_burst), joins committed in one fleet change, and
    # how far a join request's time may be from the hub's (a replay outside it is refused).
    join_per_s: float = Field(
        default=500, gt=0, le=100_000, description="join attempts per second (429 beyond)"
    )
    join_burst: int = Field(default=1000, ge=1, le=1_000_000, description="join attempts at once")
    join_batch: int = Field(default=500, ge=1, le=5000, description="joins committed in one fleet change")
    join_max_age_s: float = Field(
        default=300, ge=10, le=3600, description="how old (or ahead) a join request may be"
    )
    # Credential rotation (docs/enrolment.md): how far a device's signing request's time may
    # be from the hub's (an older one is refused; newer-than-the-last is checked besides).
    rotation_max_age_s: float = Field(
        default=300, ge=10, le=3600, description="how old (or ahead) a rotation request may be"
    )
    # Credentials older than this (since enrolment or the last rotation) are marked for
    # rotation by the hub itself, in the upkeep loop; 0 (the default) leaves it to the admin.
    credentials_max_age_days: float = Field(
        default=0, ge=0, le=3650, description="rotate device credentials older than this; 0: never"
    )
    # Dashboard sign-in, per client address (cloud_hub.login_throttle): the
    # login_free_failures-th wrong token blocks the address for login_delay_s (429), and each
    # wrong one after a block doubles it, up to login_max_delay_s; an address silent for
    # login_forget_s is forgotten, and at most login_throttle_clients addresses are remembered.
    login_free_failures: int = Field(default=5, ge=1, le=1000)
    login_delay_s: float = Field(default=1.0, gt=0, le=3600)
    login_max_delay_s: float = Field(default=300.0, gt=0, le=86400)
    login_forget_s: float = Field(default=900.0, gt=0, le=86400)
    login_throttle_clients: int = Field(default=10_000, ge=1, le=1_000_000)
    # Alert rules (cloud_hub.alerts, docs/monitoring.md): a round every alert_interval_s over
    # the telemetry received in the last alert_window_s; every query of a round is bounded.
    alert_interval_s: float = Field(default=5.0, gt=0, le=3600, description="seconds between alert rounds")
    alert_window_s: float = Field(
        default=30.0, ge=5, le=3600, description="telemetry window a service metric is computed over"
    )
    alert_max_rules: int = Field(default=200, ge=1, le=10_000, description="alert rules the hub holds")
    alert_max_subjects: int = Field(
        default=10_000, ge=1, le=1_000_000, description="services or devices one rule looks at per round"
    )
    alert_max_samples: int = Field(
        default=50_000, ge=100, le=10_000_000, description="telemetry samples one round reads"
    )
    # Progressive rollouts (cloud_hub.rollouts, docs/rollouts.md, docs/security.md §18).
    rollout_interval_s: float = Field(
        default=2.0, gt=0, le=600, description="seconds between two looks at the running rollouts"
    )
    rollout_health_timeout_s: float = Field(
        default=300.0, ge=1, le=86_400,
        description="how long a released wave's devices may take to be Healthy before the rollout halts",
    )  # fmt: skip
    rollout_max_samples: int = Field(
        default=500_000, ge=100, le=10_000_000, description="telemetry samples one gate judgement reads"
    )
    rollout_max_spread_values: int = Field(
        default=1000, ge=1, le=100_000, description="distinct values of a rollout's --spread-by tag"
    )
    rollout_max_running: int = Field(
        default=100, ge=1, le=10_000, description="rollouts staging devices at once (running or halted)"
    )
    # Prometheus /metrics (cloud_hub.metrics): a bearer token, the admin's or this read-only one;
    # metrics_public serves it to anyone (only behind a network that keeps others out).
    metrics_token: SecretStr | None = Field(default=None, description="read-only token for /metrics")
    metrics_public: bool = Field(default=False, description="serve /metrics without a token")
    # MQTT: with no host, the hub runs without a broker (devices then poll over HTTP).
    mqtt_host: str | None = None
    mqtt_port: int = Field(default=1883, ge=1, le=65535)
    mqtt_username: str | None = "edgepack-hub"
    mqtt_password: SecretStr | None = None
    mqtt_tls_ca: Path | None = None
    # Where devices reach the broker, when not where the hub does (e.g. the hub on the
    # broker's machine uses 127.0.0.1); goes into each device's credentials.
    mqtt_public_host: str | None = None
    mqtt_public_port: int | None = Field(default=None, ge=1, le=65535)
    mqtt_share_group: str | None = Field(
        default="edgepack-hub",
        pattern=r"^[A-Za-z0-9_-]+$",
        description="shared-subscription group of the hub replicas; unset for a broker without "
        "shared subscriptions (RabbitMQ before 3.13): then the database alone de-duplicates",
    )
    topic_prefix: str = Field(default="edgepack", pattern=r"^[A-Za-z0-9_-][A-Za-z0-9_/-]*$")
    # What the hub accepts of a device's answer to a log request (manifests.logs.LogLimits):
    # the MQTT message before it is parsed, each line (cut with a marker), all lines passed on.
    log_payload_max_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    log_line_max_chars: int = Field(default=MAX_LINE_CHARS, ge=80, le=1 << 20)
    log_answer_max_bytes: int = Field(default=1 << 20, ge=1024, le=64 << 20)
    # Where the hub writes the Mosquitto password file and ACL for enrolled devices, and the
    # broker's pid file so that it can be told (SIGHUP) to reload them.
    broker_dir: Path | None = None
    broker_pid_file: Path | None = None
    # Or: RabbitMQ's MQTT plugin, whose users and permissions the hub sets through the
    # management API (cloud_hub.broker.rabbitmq) instead of writing Mosquitto's files.
    rabbitmq_api: str | None = Field(default=None, description="management API URL, http://HOST:15672")
    rabbitmq_api_username: str = "guest"
    rabbitmq_api_password: SecretStr | None = None
    rabbitmq_vhost: str = "/"

    # Webhooks (cloud_hub.webhooks, docs/webhooks.md): what one hub process spends on
    # receivers, and how long an undeliverable event is retried before it is dead-lettered.
    webhook_concurrency: int = Field(default=64, ge=1, le=4096, description="requests in flight")
    webhook_concurrency_per_subscription: int = Field(
        default=8, ge=1, le=4096,
        description="requests in flight to one subscription (a hanging receiver holds no more)",
    )
    webhook_timeout_s: float = Field(default=10, gt=0, le=300, description="whole request, answer included")
    webhook_retry_base_s: float = Field(default=1, gt=0, le=3600, description="first backoff's cap")
    webhook_retry_max_s: float = Field(default=3600, gt=0, le=86400, description="largest backoff")
    webhook_max_age_s: float = Field(
        default=24 * 3600, gt=0, le=30 * 86400, description="retried this long, then dead-lettered"
    )
    webhook_poll_s: float = Field(default=0.5, gt=0, le=60, description="idle dispatcher's look for work")
    webhook_keep_delivered_s: float = Field(
        default=24 * 3600, gt=0, le=365 * 86400, description="delivered rows kept this long"
    )
    webhook_max_subscriptions: int = Field(default=100, ge=1, le=10_000)

    # Collected production data (cloud_hub.data, docs/data-collection.md): what one device may
    # upload, how long the hub keeps it, and how long after a service left a device its data
    # is still taken from it (a device offline for a while comes back with its spool).
    data_mb_per_hour: float = Field(
        default=64, gt=0, le=1 << 20,
        description="compressed data one device may upload per hour (429 beyond)",
    )
    data_burst_mb: int = Field(
        default=32, ge=8, le=1 << 16,
        description="what a device that was quiet may upload at once (at least one largest batch, 8 MiB)",
    )
    data_checks_in_flight: int = Field(
        default=2, ge=1, le=256,
        description="batches checked at once per hub process (each holds a few MiB while it is)",
    )
    data_retention_days: float = Field(
        default=30, ge=0, le=36500,
        description="collected data older than this is deleted; 0 keeps it for ever",
    )
    data_grace_days: float = Field(
        default=7, ge=0, le=3650,
        description="days after a service left a device during which the device may still upload its data",
    )

    def log_limits(self) -> LogLimits:
        return LogLimits(
            payload_bytes=self.log_payload_max_bytes,
            line_chars=self.log_line_max_chars,
            answer_bytes=self.log_answer_max_bytes,
        )

    @field_validator("metrics_token")
    @classmethod
    def _metrics_token_long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        # An empty token (an unset variable in a compose file) would open /metrics to anyone.
        if value is not None and len(value.get_secret_value()) < 16:
            raise ValueError("metrics_token: use at least 16 random characters")
        return value

    @field_validator("login_max_delay_s")
    @classmethod
    def _max_delay_not_below_delay(cls, value: float, info: ValidationInfo) -> float:
        if value < info.data.get("login_delay_s", 0):
            raise ValueError("login_max_delay_s must be at least login_delay_s")
        return value

    @model_validator(mode="after")
    def _one_body_fits_in_flight(self) -> HubSettings:
        if self.max_body_mb > self.max_bodies_in_flight_mb:
            raise ValueError(
                f"max_body_mb ({self.max_body_mb}) is more than max_bodies_in_flight_mb "
                f"({self.max_bodies_in_flight_mb}): no body that large could ever be read"
            )
        return self

    def agent_bundle_dir(self) -> Path | None:
        """The agent bundle this hub serves to devices, if any."""
        if self.agent_bundle is not None:
            return self.agent_bundle
        default = self.data_dir / "agent-bundle"
        return default if default.is_dir() else None

    def database_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'hub.db'}"

    def base_url(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"
