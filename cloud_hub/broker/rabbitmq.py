"""Device accounts and topic permissions on RabbitMQ's MQTT plugin, through its management API.

For fleets beyond one broker node: a RabbitMQ cluster (``rabbitmq_mqtt`` and
``rabbitmq_management`` enabled). Users and permissions live in RabbitMQ's own (clustered)
database, so the hub sets them once per change through any node's HTTP API, and every node
enforces them. The guarantee is the Mosquitto ACL's: each device is a user named by its id,
whose password the hub knows only as a hash (RabbitMQ's salted SHA-256, stored at enrolment
beside Mosquitto's), and who may

- read (subscribe to) only its own ``desired`` and ``logs-request`` topics and
- write (publish to) only its own ``reported``, ``telemetry``, ``online`` and ``logs-response``
  (``manifests.topics`` lists the channels);

MQTT topics are routing keys on the ``amq.topic`` exchange (``/`` and ``.`` swapped), so these
are *topic permissions* there. Resource permissions let a device use only the queues the MQTT
plugin makes for its own client id (which is its device id), so its credentials open nothing
else over AMQP either. The hub's own user may do anything in the vhost.

The hub owns the users it tags ``edgepack-device``/``edgepack-hub`` and no others: a sync
creates, updates and deletes only those (and closes a deleted device's open connections, so a
revocation takes effect at once). A sync runs under a database lock, so two replicas never
interleave a stale view of the device table with a fresh one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import httpx
from sqlalchemy import select

from cloud_hub.broker.passwords import rabbit_hash
from cloud_hub.db.base import Sessions
from cloud_hub.db.locks import exclusive
from cloud_hub.fleet.tables import Device
from cloud_hub.settings import HubSettings
from manifests.errors import ConfigError, FetchError
from manifests.rotation import broker_username
from manifests.topics import DEVICE_READS, DEVICE_WRITES, device_topic

log = logging.getLogger(__name__)

DEVICE_TAG = "edgepack-device"
HUB_TAG = "edgepack-hub"
HASHING = "rabbit_password_hashing_sha256"
EXCHANGE = "amq.topic"


_SWAP = str.maketrans("/.", "./")


def routing_key(topic: str) -> str:
    """The AMQP routing key RabbitMQ's MQTT plugin uses for an MQTT topic ('/' and '.' swap)."""
    return topic.translate(_SWAP)


@dataclass(frozen=True)
class Permissions:
    """One user's resource permissions (regexes) and topic permissions on ``amq.topic``."""

    configure: str
    write: str
    read: str
    topic_write: str
    topic_read: str


def _one_of(names: Sequence[str]) -> str:
    return "^(" + "|".join(re.escape(n) for n in names) + ")$"


def device_permissions(device_id: str, prefix: str) -> Permissions:
    """What a device may do: its own topics only, its own MQTT queues only. Pure."""
    queues = [f"mqtt-subscription-{device_id}qos{q}" for q in (0, 1)]
    return Permissions(
        configure=_one_of(queues),
        write=_one_of([EXCHANGE, *queues]),
        read=_one_of([EXCHANGE, *queues]),
        topic_write=_one_of([routing_key(device_topic(device_id, c, prefix=prefix)) for c in DEVICE_WRITES]),
        topic_read=_one_of([routing_key(device_topic(device_id, c, prefix=prefix)) for c in DEVICE_READS]),
    )


HUB_PERMISSIONS = Permissions(".*", ".*", ".*", ".*", ".*")


@dataclass(frozen=True)
class RabbitUser:
    name: str
    password_hash: str  # rabbit_hash format
    tag: str
    permissions: Permissions


class ManagementApi:
    """The few calls of RabbitMQ's management HTTP API that account sync needs."""

    def __init__(self, url: str, username: str, password: str, vhost: str = "/") -> None:
        self._http = httpx.Client(base_url=url.rstrip("/"), auth=(username, password), timeout=30)
        self.vhost = vhost
        self._v = quote(vhost, safe="")

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.HTTPError as exc:
            raise FetchError(
                f"RabbitMQ management API unreachable ({exc.__class__.__name__}); check "
                "EDGEPACK_HUB_RABBITMQ_API and that the rabbitmq_management plugin is enabled"
            ) from None
        if response.status_code == 404 and method in ("GET", "DELETE"):
            return None
        if response.status_code >= 400:
            raise FetchError(
                f"RabbitMQ management API refused {method} {path}: {response.status_code} "
                f"{response.text[:200]}; check the API user's 'administrator' tag"
            )
        return response.json() if response.content else None

    def users(self) -> list[dict[str, Any]]:
        return list(self._call("GET", "/api/users") or [])

    def put_user(self, name: str, password_hash: str, tag: str) -> None:
        body = {"password_hash": password_hash, "hashing_algorithm": HASHING, "tags": tag}
        self._call("PUT", f"/api/users/{quote(name, safe='')}", body)

    def delete_user(self, name: str) -> None:
        self._call("DELETE", f"/api/users/{quote(name, safe='')}")

    def permissions(self) -> dict[str, dict[str, Any]]:
        rows = self._call("GET", f"/api/vhosts/{self._v}/permissions") or []
        return {row["user"]: row for row in rows}

    def topic_permissions(self) -> dict[str, dict[str, Any]]:
        rows = self._call("GET", f"/api/vhosts/{self._v}/topic-permissions") or []
        return {row["user"]: row for row in rows if row.get("exchange") == EXCHANGE}

    def put_permissions(self, user: str, p: Permissions) -> None:
        name = quote(user, safe="")
        self._call("PUT", f"/api/permissions/{self._v}/{name}",
                   {"configure": p.configure, "write": p.write, "read": p.read})  # fmt: skip
        self._call("PUT", f"/api/topic-permissions/{self._v}/{name}",
                   {"exchange": EXCHANGE, "write": p.topic_write, "read": p.topic_read})  # fmt: skip

    def close_connections_of(self, user: str) -> None:
        for conn in self._call("GET", f"/api/connections/username/{quote(user, safe='')}") or []:
            self._call("DELETE", f"/api/connections/{quote(conn['name'], safe='')}")


def apply_accounts(api: ManagementApi, wanted: Sequence[RabbitUser]) -> int:
    """Make the hub-owned users exactly ``wanted``; returns how many calls changed something."""
    users = {u["name"]: u for u in api.users()}
    perms, topics = api.permissions(), api.topic_permissions()
    by_name = {u.name: u for u in wanted}
    changes = 0
    for user in wanted:
        have = users.get(user.name)
        if have is not None and not ({DEVICE_TAG, HUB_TAG} & set(_tags(have))):
            log.warning("RabbitMQ user %r exists and is not the hub's; left alone", user.name)
            continue
        if have is None or have.get("password_hash") != user.password_hash or _tags(have) != [user.tag]:
            api.put_user(user.name, user.password_hash, user.tag)
            changes += 1
        p, got, got_topic = user.permissions, perms.get(user.name), topics.get(user.name)
        if (
            got is None
            or (got["configure"], got["write"], got["read"]) != (p.configure, p.write, p.read)
            or got_topic is None
            or (got_topic["write"], got_topic["read"]) != (p.topic_write, p.topic_read)
        ):
            api.put_permissions(user.name, p)
            changes += 1
    for name, have in users.items():
        if name not in by_name and DEVICE_TAG in _tags(have):
            api.delete_user(name)
            api.close_connections_of(name)  # a revoked device is cut off now, not at reconnect
            changes += 1
    return changes


def _tags(user: dict[str, Any]) -> list[str]:
    tags = user.get("tags", [])
    return [t for t in (tags.split(",") if isinstance(tags, str) else tags) if t]


class RabbitMqAccounts:
    """Keeps RabbitMQ's device users and permissions equal to the device table (an ``AccountSync``)."""

    def __init__(self, sessions: Sessions, settings: HubSettings, hub_password: str | None) -> None:
        if settings.rabbitmq_api is None:
            raise ConfigError("no RabbitMQ management API: set EDGEPACK_HUB_RABBITMQ_API")
        if settings.mqtt_username is None or hub_password is None:
            raise ConfigError("the hub manages RabbitMQ's users but has no broker user of its own")
        self._sessions = sessions
        self._settings = settings
        self._hub = RabbitUser(settings.mqtt_username, rabbit_hash(hub_password), HUB_TAG, HUB_PERMISSIONS)

    @contextmanager
    def _api(self) -> Iterator[ManagementApi]:
        s = self._settings
        assert s.rabbitmq_api is not None
        password = s.rabbitmq_api_password.get_secret_value() if s.rabbitmq_api_password else "guest"
        api = ManagementApi(s.rabbitmq_api, s.rabbitmq_api_username, password, s.rabbitmq_vhost)
        try:
            yield api
        finally:
            api.close()

    def sync(self) -> None:
        with exclusive(self._sessions, "broker-accounts") as session, self._api() as api:
            rows = session.execute(
                select(
                    Device.id, Device.credentials_generation, Device.rabbitmq_password_hash,
                    Device.next_rabbitmq_password_hash,
                ).where(Device.revoked.is_(False))
            )  # fmt: skip
            devices, missing = [], []
            for device_id, generation, pw_hash, next_hash in rows:
                if pw_hash is None:
                    missing.append(device_id)
                    continue
                # A rotated device's user is not its id, its topics and client id still are.
                perms = device_permissions(device_id, self._settings.topic_prefix)
                devices.append(RabbitUser(broker_username(device_id, generation), pw_hash, DEVICE_TAG, perms))
                if next_hash is not None:
                    name = broker_username(device_id, generation + 1)
                    devices.append(RabbitUser(name, next_hash, DEVICE_TAG, perms))
            if missing:
                log.warning(
                    "%d device(s) enrolled before RabbitMQ support have no RabbitMQ password and "
                    "were left out (first: %s); revoke and enroll them again",
                    len(missing), missing[0],
                )  # fmt: skip
            changes = apply_accounts(api, [self._hub, *devices])
            if changes:
                log.info("RabbitMQ accounts updated (%d changes)", changes)
