"""Running the hub under uvicorn (``edgepack hub serve``) and migrating its database."""

from __future__ import annotations

import logging
import resource
from typing import Any

import uvicorn
from fastapi import FastAPI

from cloud_hub.api.downloads import QuietDownloads
from cloud_hub.app import create_app
from cloud_hub.connections import SocketLimits, guarded_protocol
from cloud_hub.core import open_blob_store
from cloud_hub.db.schema import Migration, migrate
from cloud_hub.settings import HubSettings
from cloud_hub.store.copy import Copied, copy_blobs
from cloud_hub.tls.material import with_default_tls
from cloud_hub.wiring import open_hub


def serving_settings(settings: HubSettings) -> HubSettings:
    """The settings a hub serves with: its own certificate when it has one, and no plain HTTP
    beyond loopback unless asked for (see :func:`cloud_hub.tls.material.with_default_tls`)."""
    return with_default_tls(settings)


def run_hub(settings: HubSettings, *, log_level: str = "info") -> None:
    """Serve the hub until interrupted: HTTPS when it has a certificate (its own, from
    ``broker-config --tls``, is used by default), and never plain HTTP beyond loopback unless
    ``allow_plain_http`` says so.

    The hub is opened before the server starts, so a configuration it refuses (a database on an
    older schema, a bad trust file) is one error for the CLI to print, not a server traceback.
    """
    settings = with_default_tls(settings)
    _log_to_stderr(log_level)
    _files_for_connections(settings.max_connections)
    process = open_hub(settings)
    try:
        process.start()
        # The app's shutdown closes the hub (its dispatcher frees the webhook deliveries it
        # holds, its loops stop): after a SIGTERM, uvicorn ends the process once it is done.
        app = create_app(hub=process, close_hub=True)
        config = server_config(app, settings, log_level=log_level)
        # After uvicorn's Config, which sets its loggers up.
        logging.getLogger("uvicorn.access").addFilter(QuietDownloads())
        uvicorn.Server(config).run()
    finally:
        process.close()  # when the server did not start (or stopped without a signal)


def server_config(app: FastAPI, settings: HubSettings, **options: Any) -> uvicorn.Config:
    """uvicorn's configuration for serving ``app`` with ``settings``: its address, TLS, and the
    bounds on every socket (:mod:`cloud_hub.connections`); ``options`` go to uvicorn as they are."""
    return uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(SocketLimits.of(settings)),
        timeout_keep_alive=settings.keep_alive_s,
        ssl_certfile=str(settings.tls_cert) if settings.tls_cert else None,
        ssl_keyfile=str(settings.tls_key) if settings.tls_key else None,
        **options,
    )


#: Descriptors the hub uses besides its clients' sockets: database, blobs, broker, logs.
_OWN_FILES = 256


def _files_for_connections(max_connections: int) -> None:
    """Raise the soft open-file limit so that ``max_connections`` sockets fit (Debian's default
    soft limit is 1024); when the hard limit does not allow it, say so: past it, new
    connections fail at accept() instead of being answered."""
    needed = max_connections + _OWN_FILES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            logging.getLogger("cloud_hub").warning(
                "the open-file limit (%d) is too low for max_connections %d; lower "
                "EDGEPACK_HUB_MAX_CONNECTIONS or raise 'ulimit -n'", hard, max_connections
            )


def _log_to_stderr(level: str) -> None:
    """The hub's own messages (``cloud_hub.*``) at ``level`` on stderr, beside uvicorn's."""
    logger = logging.getLogger("cloud_hub")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())


def copy_hub_blobs(source: HubSettings, target: HubSettings) -> Copied:
    """Copy every blob of the store ``source`` names into the one ``target`` names."""
    return copy_blobs(open_blob_store(source), open_blob_store(target))


def migrate_hub(settings: HubSettings) -> Migration:
    """Bring the hub's database schema to the newest revision (``edgepack hub migrate``)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    return migrate(settings.database_url())
