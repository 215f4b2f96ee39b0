"""Zero-touch enrolment: provisioning tokens (admin) and a device joining by itself.

The admin makes a token (:meth:`ProvisioningTokens.create`, ``edgepack device token create``)
and bakes it into the device image. On the device, :func:`join` (``edgepack agent join``)
makes the device's own Ed25519 key, derives its HTTP token and broker password from it, sends
the hub only a signed join request (:mod:`manifests.join`), and writes the credentials
document, the key and an ``agent.toml`` into the device's folder. The key and the two secrets
never leave the device.
"""

from __future__ import annotations

import builtins
import os
import random
import re
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import httpx
from pydantic import ValidationError

from manifests.desired import RuntimeKind
from manifests.device import AgentConfig, DeviceCredentials, render_agent_config
from manifests.errors import ConfigError, HubUnavailable
from manifests.join import JoinAnswer, credentials_from_answer, derive_secrets, make_join_request
from manifests.signing import generate_private_key, load_private_key, private_key_pem
from packager.files import atomic_output
from packager.sdk.device import save_credentials
from packager.sdk.errors import BadArgument, raise_for_hub_error
from packager.sdk.hub import Hub
from packager.sdk.model import string_map
from packager.sdk.targets import check_device_id

KEY_FILE = "device-key.pem"
CREDENTIALS_FILE = "credentials.json"
CONFIG_FILE = "agent.toml"
MACHINE_ID = Path("/etc/machine-id")
#: Joins refused 429 (the hub's join rate) are sent again this many times, waiting as the hub
#: says (at most MAX_JOIN_WAIT_S, with jitter so a fleet does not come back in lockstep).
MAX_JOIN_ATTEMPTS = 20
MAX_JOIN_WAIT_S = 30.0
#: How often a join waiting for approval asks again (with jitter).
APPROVAL_POLL_S = 5.0
#: Where a device's provisioning token may come from without being on a command line, which
#: every local user reads in ``ps`` (security.md §19): a file (``-``: stdin) or this variable.
JOIN_TOKEN_ENV = "EDGEPACK_JOIN_TOKEN"
#: The most read of a token file or stdin (a provisioning token is 51 characters).
MAX_TOKEN_FILE_BYTES = 4096
_DURATION = re.compile(r"^(\d{1,6})([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(text: str) -> int:
    """``90s``, ``30m``, ``12h``, ``7d`` as seconds."""
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise BadArgument(f"duration {text!r}: use a number and s, m, h or d (e.g. 7d)")
    return int(match.group(1)) * _UNIT_S[match.group(2)]


@dataclass(frozen=True)
class ProvisioningToken:
    id: str
    tags: dict[str, str]
    uses: int
    used: int
    expires: str
    revoked: bool
    approval: bool = False
    token: str | None = None  # only in the answer that made it

    @classmethod
    def of(cls, raw: dict[str, Any]) -> ProvisioningToken:
        return cls(
            id=raw["id"], tags=dict(raw["tags"]), uses=raw["uses"], used=raw["used"], expires=raw["expires"],
            revoked=raw["revoked"], approval=bool(raw.get("approval")), token=raw.get("token"),
        )  # fmt: skip


class ProvisioningTokens:
    """The hub's provisioning tokens (admin)."""

    def __init__(self, workspace: Hub) -> None:
        self.workspace = workspace

    def create(
        self, *, tags: dict[str, str] | None = None, uses: int, expires_in_s: int, approval: bool = False
    ) -> ProvisioningToken:
        """A new token (its secret in ``.token``, shown this once); with ``approval`` each join
        waits for :meth:`approve`."""
        body = {"tags": string_map(tags, "tags"), "uses": uses, "expires_in_s": expires_in_s}
        body["approval"] = approval
        return ProvisioningToken.of(
            self.workspace.transport.send("POST", "/api/v1/provisioning-tokens", body)
        )

    def list(self) -> list[ProvisioningToken]:
        answer = self.workspace.transport.get("/api/v1/provisioning-tokens")
        return [ProvisioningToken.of(t) for t in answer["tokens"]]

    def pending(self) -> builtins.list[dict[str, Any]]:
        """Joins waiting for approval (and those rejected): device_id, token_id, rejected, asked_at."""
        return list(self.workspace.transport.get("/api/v1/joins/pending")["pending"])

    def approve(self, device_id: str) -> dict[str, Any]:
        return dict(self.workspace.transport.send("POST", f"/api/v1/joins/pending/{device_id}/approve"))

    def reject(self, device_id: str) -> dict[str, Any]:
        return dict(self.workspace.transport.send("POST", f"/api/v1/joins/pending/{device_id}/reject"))

    def revoke(self, token_id: str) -> ProvisioningToken:
        path = f"/api/v1/provisioning-tokens/{token_id}/revoke"
        return ProvisioningToken.of(self.workspace.transport.send("POST", path))


def device_id_from(source: str) -> str:
    """The device id ``--id-from`` names: ``hostname``, ``machine-id`` or the id itself."""
    if source == "hostname":
        name = socket.gethostname().split(".")[0]
        try:
            return check_device_id(name)
        except BadArgument:
            raise BadArgument(
                f"this host's name {name!r} is not a valid device id; pass --id-from ID"
            ) from None
    if source == "machine-id":
        try:
            return check_device_id(MACHINE_ID.read_text().strip())
        except OSError as exc:
            raise ConfigError(f"{MACHINE_ID}: cannot read it ({exc.strerror}); pass --id-from ID") from None
    return check_device_id(source)


def join_token(
    *, token: str | None, token_file: str | None, environ: Mapping[str, str], stdin: IO[bytes]
) -> str:
    """The provisioning token from ``--token-file`` (``-``: ``stdin``), ``--token`` (kept for
    compatibility: it shows in the process list) or ``EDGEPACK_JOIN_TOKEN``, in that order;
    :class:`BadArgument` when none or both options are given, :class:`ConfigError` when what
    was given holds no token."""
    if token is not None and token_file is not None:
        raise BadArgument("give --token-file FILE or --token T, not both")
    if token_file is not None:
        where = "stdin" if token_file == "-" else token_file
        try:
            if token_file == "-":
                data = stdin.read(MAX_TOKEN_FILE_BYTES + 1)
            else:
                with open(token_file, "rb") as fh:
                    data = fh.read(MAX_TOKEN_FILE_BYTES + 1)
        except OSError as exc:
            raise ConfigError(f"{where}: cannot read it ({exc.strerror})") from None
        if len(data) > MAX_TOKEN_FILE_BYTES:
            raise ConfigError(f"{where}: larger than {MAX_TOKEN_FILE_BYTES} bytes, not a provisioning token")
        text = data.decode("utf-8", "replace").strip()
    elif token is not None:
        where, text = "--token", token.strip()
    else:
        where, text = JOIN_TOKEN_ENV, environ.get(JOIN_TOKEN_ENV, "").strip()
        if not text:
            raise BadArgument(
                f"give the provisioning token with --token-file FILE (- reads stdin) or in {JOIN_TOKEN_ENV}"
            )
    if not text or not text.isprintable() or any(c.isspace() for c in text):
        raise ConfigError(f"{where}: holds no provisioning token (one word on one line)")
    return text


@dataclass(frozen=True)
class Joined:
    credentials: DeviceCredentials
    tags: dict[str, str]
    config: Path


def join(
    url: str, token: str, *, device_id: str, folder: Path, ca: str | Path | None = None,
    runtimes: list[RuntimeKind] | None = None,
    wait_s: float = 600.0,
) -> Joined:  # fmt: skip
    """Join the hub at ``url`` with provisioning token ``token`` as ``device_id``; the device's
    key, credentials and ``agent.toml`` go into ``folder`` (made 0700)."""
    credentials_path, key_path, config_path = (
        folder / CREDENTIALS_FILE,
        folder / KEY_FILE,
        folder / CONFIG_FILE,
    )
    if credentials_path.exists():
        raise ConfigError(f"{credentials_path} exists: this device has joined already")
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(folder, 0o700)
    if key_path.exists():
        # A join that did not go through (hub unreachable, token refused) keeps its key: the
        # hub never accepted it, so it may be sent again.
        key = load_private_key(key_path.read_bytes(), source=str(key_path))
    else:
        key = generate_private_key()
        with atomic_output(key_path, mode=0o600) as fh:
            fh.write(private_key_pem(key))
    # The provisioning token goes with the join alone (it is no admin token).
    with Hub(url, None, ca=ca) as hub:
        hub_keyid = hub.transport.get("/api/v1/hub/key")["keyid"]
        headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
        asked = time.monotonic()
        attempt = 0
        while True:
            attempt += 1
            # A new request each time (its own nonce and time): the hub refuses a request it
            # has seen, and answers a newer one of a device that joined (a lost answer) again.
            request = make_join_request(
                key,
                device_id=device_id,
                hub_keyid=hub_keyid,
                nonce=os.urandom(16).hex(),
                now=datetime.now(UTC),
            )
            try:
                response = hub.transport.http.post("/api/v1/join", content=request, headers=headers)
            except httpx.TransportError as exc:
                raise hub.transport.unreachable(exc) from None
            if response.status_code == 202:
                # Waiting for the admin's approval: ask again (a newer request) until then.
                if time.monotonic() - asked > wait_s:
                    raise HubUnavailable(
                        f"the join of {device_id} waits for the admin's approval ('edgepack device approve "
                        f"{device_id}'); run this again once approved"
                    )
                time.sleep(APPROVAL_POLL_S * (0.5 + random.random()))
                continue
            if response.status_code != 429 or attempt == MAX_JOIN_ATTEMPTS:
                break
            # The hub bounds joins a second (a fleet booting at once): wait as it says.
            wait = float(response.headers.get("retry-after", "1") or 1)
            time.sleep(min(MAX_JOIN_WAIT_S, max(0.5, wait)) * (0.5 + random.random()))
        raise_for_hub_error(response)
        raw = response.json()
    try:
        answer = JoinAnswer.model_validate(raw)
    except ValidationError as exc:
        raise HubUnavailable(
            f"the hub's answer to the join is not valid ({exc.errors()[0]['msg']})"
        ) from None
    if answer.device_id != device_id or answer.hub_key.keyid != hub_keyid:
        raise HubUnavailable("the hub answered the join for another device or with another key")
    credentials = credentials_from_answer(answer, derive_secrets(key))
    save_credentials(credentials, credentials_path)
    config = AgentConfig.model_validate(
        {
            "credentials": credentials_path.resolve(),
            "state_dir": (folder / "state").resolve(),
            "runtimes": runtimes or [RuntimeKind.PROCESS],
        }
    )
    with atomic_output(config_path, mode=0o644) as fh:
        fh.write(render_agent_config(config).encode())
    return Joined(credentials, answer.tags, config_path)
