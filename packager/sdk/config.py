"""Where the hub is and how to sign in: arguments, then the environment, then ``edgepack login``.

``EDGEPACK_HUB_URL`` / ``EDGEPACK_TOKEN`` / ``EDGEPACK_HUB_CA`` override the file
``$EDGEPACK_HOME/config.json`` that ``edgepack login`` writes; explicit arguments override both.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from manifests.errors import ConfigError
from packager.files import atomic_output
from packager.home import hub_config_path


@dataclass(frozen=True)
class HubConfig:
    """A hub's URL, the admin token, and the CA that signed an HTTPS hub's certificate."""

    url: str
    token: str | None = None
    ca: str | None = None  # PEM file; None: the system's CAs

    @classmethod
    def resolve(
        cls,
        url: str | None = None,
        token: str | None = None,
        *,
        ca: str | None = None,
        path: Path | None = None,
    ) -> HubConfig:
        """The hub to talk to; a :class:`ConfigError` saying how to name one when none is."""
        if path is not None and not path.is_file():
            # A file the caller named is never "no login": say which one is missing.
            why = "is a folder, not a file" if path.is_dir() else "file not found"
            raise ConfigError(f"{path}: {why}; name the config.json that 'edgepack login' wrote")
        saved = read_saved(path or hub_config_path())
        url = url or os.environ.get("EDGEPACK_HUB_URL") or saved.get("hub_url")
        token = token or os.environ.get("EDGEPACK_TOKEN") or saved.get("token")
        ca = ca or os.environ.get("EDGEPACK_HUB_CA") or saved.get("ca")
        if not url:
            raise ConfigError(
                "no hub configured: run 'edgepack login --hub URL --token TOKEN' "
                "or set EDGEPACK_HUB_URL and EDGEPACK_TOKEN"
            )
        return cls(url=str(url).rstrip("/"), token=token, ca=ca)

    def save(self, path: Path | None = None) -> Path:
        """Write this login where :meth:`resolve` finds it (mode 0600: it holds the token)."""
        target = path or hub_config_path()
        with atomic_output(target, mode=0o600) as fh:
            doc = {"hub_url": self.url, "token": self.token, "ca": self.ca}
            fh.write(json.dumps(doc, indent=2).encode())
        return target


def read_saved(path: Path) -> dict[str, Any]:
    """The saved login at ``path``, or nothing when there is none."""
    if not path.exists():
        return {}
    try:
        saved = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: invalid JSON ({exc.msg}); run 'edgepack login' again") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"{path}: expected a JSON object; run 'edgepack login' again")
    return saved
