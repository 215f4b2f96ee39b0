"""What an instance's scoring endpoint is given beside its module: the hashes of the keys it
accepts, its TLS certificate and key, its limits against hostile clients (``docs/security.md``).

The files live in the instance's run folder (for docker: mounted as a folder, so an atomic
replacement of a file is seen through the mount), owned by the user the instance runs as and
readable by nobody else. A rotation of the keys or a renewed certificate only rewrites them:
the scoring server re-reads them, without a restart.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from edge_agent.data.spool import ENV_DIR, ENV_QUOTA_BYTES, ENV_SAMPLE_RATE, ENV_SERVICE
from manifests.desired import EndpointAuth, ModuleAssignment
from manifests.durable import write_durable

KEYS_FILE = "keys.json"
TLS_DIR = "tls"
CERT_FILE = "cert.pem"
KEY_FILE = "key.pem"


@dataclass(frozen=True)
class TlsMaterial:
    """A service's certificate (with its chain) and private key, PEM."""

    cert_pem: bytes
    key_pem: bytes


def _write_owned(path: Path, data: bytes, owner: int | None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_durable(path, data, mode=0o600)
    if owner is not None:
        os.chown(path.parent, owner, owner)
        os.chown(path, owner, owner)


def write_keys(
    run_dir: Path, auth: EndpointAuth | None, agent_key: str | None, *, owner: int | None = None
) -> None:
    """The keys file the scoring server checks presented keys against (or none at all): the
    hashes the hub signed, and the hash of the agent's own key for this instance."""
    path = run_dir / KEYS_FILE
    if auth is None:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    hashes = list(auth.key_sha256)
    if agent_key is not None:
        hashes.append(hashlib.sha256(agent_key.encode()).hexdigest())
    _write_owned(path, json.dumps({"sha256": hashes}).encode(), owner)


def write_tls(run_dir: Path, material: TlsMaterial, *, owner: int | None = None) -> None:
    """Certificate and key, the key first: the server reloads when both have changed."""
    _write_owned(run_dir / TLS_DIR / KEY_FILE, material.key_pem, owner)
    _write_owned(run_dir / TLS_DIR / CERT_FILE, material.cert_pem, owner)


def endpoint_environment(assignment: ModuleAssignment, run_dir_seen: str) -> dict[str, str]:
    """The scoring server's variables for the keys, TLS and limits of ``assignment``, with the
    run folder as the instance sees it (its path, or its mount point in a container)."""
    settings = assignment.settings
    limits = settings.limits
    env = {
        "EDGEPACK_MAX_CONNECTIONS": str(limits.max_connections),
        "EDGEPACK_HEADER_TIMEOUT_S": str(limits.header_timeout_s),
        "EDGEPACK_BODY_TIMEOUT_S": str(limits.body_timeout_s),
        "EDGEPACK_MAX_BODY_BYTES": str(limits.max_body_bytes),
    }
    if limits.run_timeout_s is not None:
        env["EDGEPACK_RUN_TIMEOUT_S"] = str(limits.run_timeout_s)
    if limits.max_body_bytes_in_flight is not None:
        env["EDGEPACK_MAX_BODY_BYTES_IN_FLIGHT"] = str(limits.max_body_bytes_in_flight)
    if settings.auth is not None:
        env["EDGEPACK_AUTH_KEYS_FILE"] = f"{run_dir_seen}/{KEYS_FILE}"
    if settings.tls is not None:
        env["EDGEPACK_TLS_CERT"] = f"{run_dir_seen}/{TLS_DIR}/{CERT_FILE}"
        env["EDGEPACK_TLS_KEY"] = f"{run_dir_seen}/{TLS_DIR}/{KEY_FILE}"
    return env


def data_environment(assignment: ModuleAssignment, spool_seen: str | None) -> dict[str, str]:
    """The collector's variables (:mod:`edge_agent.scoring.collector`): the service's spool as
    the instance sees it, the sampling rate and the quota; none when the service collects
    nothing (then every collect() in the module does nothing)."""
    collection = assignment.settings.data_collection
    if collection is None or spool_seen is None:
        return {}
    return {
        ENV_DIR: spool_seen,
        ENV_SERVICE: assignment.service,
        ENV_SAMPLE_RATE: repr(collection.sample_rate),
        ENV_QUOTA_BYTES: str(collection.spool_quota_mb << 20),
    }
