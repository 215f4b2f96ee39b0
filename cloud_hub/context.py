"""Everything a running hub holds, built once at start-up and passed down (no globals)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.db.base import Sessions, create_schema, make_engine, utcnow
from cloud_hub.settings import HubSettings
from cloud_hub.store.blobs import BlobStore, FileBlobStore
from cloud_hub.store.files import write_atomic
from cloud_hub.store.private import prepare_data_dir, private_sqlite_file
from manifests.errors import ConfigError
from manifests.signing import (
    TrustStore,
    generate_private_key,
    key_id,
    load_private_key,
    parse_trust,
    private_key_pem,
)

if TYPE_CHECKING:
    from cloud_hub.mqtt.link import MqttLink


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, data, 0o600)


def _load_or_create_hub_key(settings: HubSettings) -> Ed25519PrivateKey:
    path = settings.hub_key or settings.data_dir / "hub.key"
    if path.exists():
        return load_private_key(path.read_bytes(), source=str(path))
    key = generate_private_key()
    _write_secret(path, private_key_pem(key))
    return key


#: Shorter admin tokens are refused: an empty one (say, an unset variable in a compose file)
#: would let anyone in with an empty login cookie.
MIN_ADMIN_TOKEN_CHARS = 16


def _check_admin_token(token: str, source: str) -> str:
    if len(token) < MIN_ADMIN_TOKEN_CHARS:
        raise ConfigError(
            f"admin token from {source} has {len(token)} characters; use at least "
            f"{MIN_ADMIN_TOKEN_CHARS} random ones, or unset it to have the hub generate one"
        )
    return token


def _load_or_create_admin_token(settings: HubSettings) -> str:
    if settings.admin_token is not None:
        return _check_admin_token(settings.admin_token.get_secret_value(), "EDGEPACK_HUB_ADMIN_TOKEN")
    path = settings.data_dir / "admin_token"
    if path.exists():
        return _check_admin_token(path.read_text().strip(), str(path))
    token = "ep_admin_" + secrets.token_urlsafe(32)
    _write_secret(path, token.encode() + b"\n")
    return token


def _load_trust(paths: list[Path]) -> TrustStore:
    store = TrustStore()
    for path in paths:
        store = store.merged(parse_trust(path.read_bytes(), source=str(path), name=path.stem))
    return store


@dataclass
class HubContext:
    settings: HubSettings
    sessions: Sessions
    blobs: BlobStore
    hub_key: Ed25519PrivateKey
    admin_token: str
    trust: TrustStore
    mqtt: MqttLink | None = None
    extras: dict[str, object] = field(default_factory=dict)

    @property
    def hub_key_id(self) -> str:
        return key_id(self.hub_key.public_key())

    @classmethod
    def open(cls, settings: HubSettings) -> HubContext:
        started = utcnow()
        prepare_data_dir(settings.data_dir)
        private_sqlite_file(settings.database_url())
        engine = make_engine(settings.database_url())
        create_schema(engine)
        blobs = FileBlobStore(settings.data_dir / "blobs")
        # Uploads staged before this start belong to a hub process that is gone (killed
        # mid-push): nothing will ever finish them.
        blobs.clean_partial(started)
        return cls(
            settings=settings,
            sessions=Sessions(engine),
            blobs=blobs,
            hub_key=_load_or_create_hub_key(settings),
            admin_token=_load_or_create_admin_token(settings),
            trust=_load_trust(settings.trusted_keys),
        )

    def start_services(self) -> None:
        """Start the background work of a serving hub: fleet upkeep, then the MQTT link.

        Upkeep renews desired states before they expire and republishes them whenever the
        broker connection comes back (a broker restarted without persistence lost them).
        """
        from cloud_hub.fleet.maintenance import FleetMaintenance

        upkeep = FleetMaintenance(self)
        upkeep.start()
        self.extras["fleet.maintenance"] = upkeep
        self.start_mqtt(on_connected=upkeep.request_republish)

    def start_mqtt(self, *, on_connected: Callable[[], None] | None = None) -> None:
        """Connect to the broker when one is configured (publishing, ingest).

        ``on_connected`` runs after every (re)connection, on the MQTT network thread.
        """
        if self.settings.mqtt_host is None:
            return
        from cloud_hub.mqtt.link import MqttLink

        self.mqtt = MqttLink.from_context(self, on_connected=on_connected)
        self.mqtt.start()

    def close(self) -> None:
        upkeep = self.extras.pop("fleet.maintenance", None)
        if upkeep is not None:
            upkeep.stop()  # type: ignore[attr-defined]
        if self.mqtt is not None:
            with contextlib.suppress(Exception):
                self.mqtt.stop()
            self.mqtt = None
        self.sessions.engine.dispose()
