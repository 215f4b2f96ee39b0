"""Reading a device's set-up: ``agent.toml`` and the credentials it names (one-line errors)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from edge_agent.runtime.base import CONTAINER_UID
from manifests.device import AgentConfig, DeviceCredentials, parse_agent_config, parse_credentials
from manifests.errors import ConfigError
from manifests.rotation import ROTATED_FILE, effective_credentials


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


def current_credentials(
    config: AgentConfig, configured: DeviceCredentials
) -> tuple[DeviceCredentials, bytes]:
    """The credentials the agent uses (a rotation's, in the state folder, when they replace the
    configured file as it is now; see ``manifests.rotation``) and the configured file's bytes."""
    configured_bytes = config.credentials.read_bytes()
    try:
        rotated: bytes | None = (config.state_dir / ROTATED_FILE).read_bytes()
    except FileNotFoundError:
        rotated = None
    return effective_credentials(configured, configured_bytes, rotated), configured_bytes


def check_credentials_private(path: Path, *, allow_open: bool = False) -> str | None:
    """Refuse credentials that other users may read (they hold the device's HTTP token and its
    broker password: whoever reads them can act as the device). With ``allow_open`` they are
    used, and the warning to log is returned; ``None`` when they are private."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        raise ConfigError(f"{path}: {exc.strerror}") from None
    if not mode & 0o077:
        return None
    who = " and ".join(w for w, bits in (("its group", 0o070), ("other users", 0o007)) if mode & bits)
    problem = f"{path} is open to {who} (mode {mode:04o}) and holds the device's token and broker password"
    if allow_open:
        return f"{problem}; used anyway (--allow-open-credentials): run 'chmod 600 {path}'"
    raise ConfigError(f"{problem}: run 'chmod 600 {path}' (or pass --allow-open-credentials)")


def tighten_state_dir(state_dir: Path) -> str | None:
    """Create the state folder 0700, or make an existing one 0700 whoever created it (it holds
    the desired state, the modules and their TLS keys); returns what was changed, to log."""
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    try:
        mode = stat.S_IMODE(state_dir.stat().st_mode)
        if mode == 0o700:
            return None
        os.chmod(state_dir, 0o700)
    except OSError as exc:
        problem = f"cannot make the state folder private (0700): {exc.strerror}"
        raise ConfigError(f"{state_dir}: {problem}") from None
    return f"state folder {state_dir} was mode {mode:04o}; made it 0700"


def hand_over_state(state_dir: Path, uid: int, gid: int) -> None:
    """Make the whole state folder the agent user's: an agent that ran before (as root, with
    'agent run') left its cache, records and logs there, 0600/0700, which the service's user
    could not read. Links are changed themselves, never followed: a module could have left one
    to a system file. A container's spool (owned by the docker runtime's user) stays its own."""
    def give(path: str) -> None:
        try:
            if os.lstat(path).st_uid != CONTAINER_UID:
                os.chown(path, uid, gid, follow_symlinks=False)
        except FileNotFoundError:
            pass  # removed meanwhile (a module still running rotated its log)

    give(str(state_dir))
    for folder, dirs, files in os.walk(state_dir):
        for name in (*dirs, *files):
            give(os.path.join(folder, name))
