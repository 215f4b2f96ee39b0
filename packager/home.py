"""Where edgepack keeps its files on this machine: ``$EDGEPACK_HOME`` (default ``~/.edgepack``).

The CLI and the SDK read the same places, so a key made with ``edgepack keygen`` signs what
``Model.deploy`` builds and a ``edgepack login`` is the hub ``Hub.from_config()`` finds. Kept
apart from the CLI's Typer app so that ``import edgepack`` does not load the CLI.
"""

from __future__ import annotations

import os
from pathlib import Path


def edgepack_home() -> Path:
    """Where keys, the trust store, the module cache and the hub login live (``EDGEPACK_HOME``)."""
    return Path(os.environ.get("EDGEPACK_HOME", Path.home() / ".edgepack"))


def default_key_path() -> Path:
    """The signing key ``edgepack keygen`` writes by default."""
    return edgepack_home() / "keys" / "publisher.key"


def default_trust_path() -> Path:
    """The local trust store of publisher keys (``edgepack trust add``)."""
    return edgepack_home() / "trust.json"


def default_cache_dir() -> Path:
    """The module cache ``edgepack serve`` and ``LocalService`` unpack verified modules into."""
    return edgepack_home() / "cache"


def hub_config_path() -> Path:
    """Where ``edgepack login`` saves the hub's address and token."""
    return edgepack_home() / "config.json"
