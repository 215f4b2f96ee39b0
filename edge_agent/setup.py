"""Reading a device's set-up: ``agent.toml`` and the credentials it names (one-line errors)."""

from __future__ import annotations

from pathlib import Path

from manifests.device import AgentConfig, DeviceCredentials, parse_agent_config, parse_credentials
from manifests.errors import ConfigError


def load_setup(config_path: Path) -> tuple[AgentConfig, DeviceCredentials]:
    """``agent.toml`` (relative paths taken from its folder) and the device's credentials."""
    try:
        data = config_path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: not found; write one with 'edgepack agent init'") from None
    config = parse_agent_config(data, source=str(config_path), base_dir=config_path.resolve().parent)
    try:
        creds = config.credentials.read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{config.credentials}: credentials not found (named by {config_path}); write them with "
            "'edgepack device enroll ID --out FILE'"
        ) from None
    return config, parse_credentials(creds, source=str(config.credentials))
