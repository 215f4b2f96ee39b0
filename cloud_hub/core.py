"""What a hub is: its settings, database, blob store, keys and trust, opened once at start-up."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlsplit

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from cloud_hub.db.base import Sessions, import_tables, make_engine, utcnow
from cloud_hub.db.schema import ensure_schema
from cloud_hub.settings import HubSettings
from cloud_hub.store.blobs import BlobStore, FileBlobStore
from cloud_hub.store.private import prepare_data_dir, private_sqlite_file
from manifests.durable import write_durable
from manifests.errors import ConfigError
from manifests.signing import (
    TrustStore,
    generate_private_key,
    key_id,
    load_private_key,
    parse_trust,
    private_key_pem,
)


def _write_secret(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durable(path, data, mode=0o600)


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


def open_blob_store(settings: HubSettings) -> BlobStore:
    """The blob store the settings name: a local folder by default, or an S3 bucket."""
    url = settings.blob_store
    if url is None or url in ("", "file"):
        return FileBlobStore(settings.data_dir / "blobs")
    if url.startswith("file:"):
        return FileBlobStore(file_store_folder(url))
    if url.startswith("s3://"):
        from cloud_hub.store.s3 import S3BlobStore

        store = S3BlobStore.from_url(url)
        store.ensure_bucket()
        return store
    raise ConfigError(
        f"blob store {url!r}: use s3://BUCKET?endpoint=URL, file:///FOLDER, or leave it unset for files"
    )


def file_store_folder(url: str) -> Path:
    """The folder of a ``file:///FOLDER`` blob store (absolute: replicas started from other
    folders must name the same one)."""
    parts = urlsplit(url)
    odd = parts.netloc not in ("", "localhost") or parts.query or parts.fragment
    if odd or not parts.path.startswith("/"):
        raise ConfigError(f"blob store {url!r}: write a shared folder as file:///ABSOLUTE/FOLDER")
    return Path(unquote(parts.path))


def _load_trust(paths: list[Path]) -> TrustStore:
    store = TrustStore()
    for path in paths:
        store = store.merged(parse_trust(path.read_bytes(), source=str(path), name=path.stem))
    return store


@dataclass
class HubCore:
    """What the hub *is*, the same in every replica: settings, database, blobs, keys, trust.

    It holds no running part (no thread, no broker connection); those are built around it
    by :mod:`cloud_hub.wiring`, and each gets only the pieces of the core it needs.
    """

    settings: HubSettings
    sessions: Sessions
    blobs: BlobStore
    hub_key: Ed25519PrivateKey
    admin_token: str
    trust: TrustStore

    @property
    def hub_key_id(self) -> str:
        return key_id(self.hub_key.public_key())

    @classmethod
    def open(cls, settings: HubSettings) -> HubCore:
        started = utcnow()
        prepare_data_dir(settings.data_dir)
        private_sqlite_file(settings.database_url())
        import_tables()
        engine = make_engine(settings.database_url())
        try:
            ensure_schema(engine, settings.database_url())
        except BaseException:
            engine.dispose()
            raise
        blobs = open_blob_store(settings)
        if isinstance(blobs, FileBlobStore):
            # A file store belongs to one hub process: uploads staged before this start are
            # a killed process's, which nothing will ever finish. (An S3 store is shared by
            # replicas whose uploads may be under way; its gc removes the stale ones.)
            blobs.clean_partial(started)
        return cls(
            settings=settings,
            sessions=Sessions(engine),
            blobs=blobs,
            hub_key=_load_or_create_hub_key(settings),
            admin_token=_load_or_create_admin_token(settings),
            trust=_load_trust(settings.trusted_keys),
        )

    def close(self) -> None:
        self.sessions.engine.dispose()
