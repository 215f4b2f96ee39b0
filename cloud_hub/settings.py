"""Hub configuration: command-line flags and ``EDGEPACK_HUB_*`` environment variables."""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict


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
        description="where blobs live: unset = <data_dir>/blobs; s3://BUCKET?endpoint=URL for S3 "
        "(credentials from the AWS_* variables)",
    )
    max_upload_mb: int = Field(default=2048, gt=0)
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

    def database_url(self) -> str:
        return self.db or f"sqlite:///{self.data_dir / 'hub.db'}"

    def base_url(self) -> str:
        scheme = "https" if self.tls_cert is not None else "http"
        return self.public_url or f"{scheme}://{self.host}:{self.port}"
