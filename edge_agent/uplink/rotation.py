"""Rotating the device's credentials when the hub asks (``manifests.rotation``).

One thread, woken when the hub's answer for the desired state carries the rotation header
(:attr:`HubHttp.rotation_asked`), or at start when a rotation was under way. Each step can
be interrupted by a crash and resumed, because every step is repeatable and the old
credentials keep working until the last one:

1. the NEW key is made once and written (``rotation-key.pem``, 0600) before anything is sent,
   so a rotation resumed after a crash asks for the same credentials again;
2. the signed request goes out with the CURRENT token; the hub keeps the new credentials
   beside the old ones;
3. the new credentials are written atomically into the state folder
   (``rotated-credentials.json``, 0600), which the agent reads at start in place of the
   configured file they replace (that file may be read-only to the agent);
4. the HTTP client and the broker session switch to them;
5. the device confirms with the new token, and the hub retires the old credentials; the key
   file is removed (the new secrets are in ``rotated-credentials.json``).

An agent that starts with the key's secrets already in use (it crashed after step 3) goes
straight to step 4.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_agent.backoff import full_jitter
from edge_agent.uplink.http import HubHttp
from manifests.device import DeviceCredentials
from manifests.durable import write_durable
from manifests.errors import HubRefused, HubUnavailable
from manifests.join import derive_secrets
from manifests.rotation import ROTATED_FILE, make_rotation_request, rotated_credentials, rotated_file_bytes

log = logging.getLogger(__name__)

KEY_FILE = "rotation-key.pem"
#: How long the new broker session may take to come up before the switch is retried.
SWITCH_TIMEOUT_S = 30.0


def load_or_make_key(path: Path) -> Ed25519PrivateKey:
    """The rotation's key: the one written before (a resumed rotation), else a new one,
    written durably before it is used."""
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError):
            key = None  # unreadable: nothing was confirmed with it, a new one will do
        if isinstance(key, Ed25519PrivateKey):
            return key
        log.warning("%s is not an Ed25519 key; making a new one", path)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_durable(path, pem, mode=0o600)
    return key


class Rotator:
    """Carries out a credentials rotation the hub asked for (see the module's text)."""

    def __init__(
        self,
        credentials: DeviceCredentials,
        *,
        configured: bytes,
        state_dir: Path,
        hub: HubHttp,
        switch_broker: Callable[[DeviceCredentials], bool] | None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.credentials = credentials
        self._configured = configured
        self._path = state_dir / ROTATED_FILE
        self._key_path = state_dir / KEY_FILE
        self._hub = hub
        self._switch_broker = switch_broker
        self._rand = rand
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # When the rotation last carried out was asked (the hub's header), so that answers that
        # still said "rotate" while it ran do not start another.
        self._completed: str | None = None

    def start(self) -> None:
        if self._key_path.exists():
            self._hub.rotation_asked.set()  # a rotation was under way: resume it
        self._thread = threading.Thread(target=self._run, name="edgepack-rotate", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._hub.rotation_asked.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            self._hub.rotation_asked.wait()
            if self._stop.is_set():
                return
            self._hub.rotation_asked.clear()
            asked = self._hub.rotation_requested
            if asked is not None and asked == self._completed and not self._key_path.exists():
                # An answer from before the hub took the confirmation: that rotation is done.
                continue
            try:
                self.rotate()
                self._completed = asked
                failures = 0
            except HubRefused as exc:
                # Asking again gets the same answer (no rotation asked any more, a key refused):
                # start over with a new key if the hub asks again.
                log.error("credentials rotation refused: %s", exc)
                with contextlib.suppress(FileNotFoundError):
                    self._key_path.unlink()
            except Exception as exc:  # the thread must outlive any failure: retried later
                delay = full_jitter(failures, self._rand(), base_s=1.0, cap_s=300.0)
                failures += 1
                log.warning("credentials rotation not done (%s); trying again in %.1fs", exc, delay)
                if not self._stop.wait(delay):
                    self._hub.rotation_asked.set()

    def rotate(self) -> None:
        """Carry out (or resume) the rotation; raises what stopped it."""
        key = load_or_make_key(self._key_path)
        secrets = derive_secrets(key)
        current = self.credentials
        if current.token != secrets.token:
            body = make_rotation_request(
                key, device_id=current.device_id, hub_keyid=current.hub_key.keyid,
                nonce=os.urandom(16).hex(), now=datetime.now(UTC),
            )  # fmt: skip
            answer = self._hub.request_rotation(body)
            new = rotated_credentials(current, secrets, answer)
            write_durable(self._path, rotated_file_bytes(self._configured, new), mode=0o600)
            self.credentials = new
            log.info("new credentials written (broker user %s)", new.mqtt.username)
        self._hub.use_token(self.credentials.token)
        if self._switch_broker is not None and not self._switch_broker(self.credentials):
            raise HubUnavailable(
                f"the broker session did not come up with the new credentials in {SWITCH_TIMEOUT_S:g}s"
            )
        self._hub.confirm_rotation()
        with contextlib.suppress(FileNotFoundError):
            self._key_path.unlink()
        log.info("credentials rotated; the old ones are retired")
