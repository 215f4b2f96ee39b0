"""The hub's composition root: the one place that builds the running parts and wires them.

:class:`~cloud_hub.core.HubCore` is what the hub *is* (settings, database, blobs, keys,
trust). :func:`wire_hub` builds what it *runs* around it, each part given only what it needs:

- the ingest worker (device messages → database), fed by
- the MQTT link (broker session), which also carries
- the desired-state publisher, used by
- the effect executor (publishes, broker accounts), used by
- fleet changes (decide in the database, then apply), and
- fleet upkeep (renewals, republishing when the broker connection comes back),
- the alert loop (rules evaluated into alert.fired / alert.resolved events),
- the webhook dispatcher (the outbox's deliveries → subscribers' URLs),
- the rollout loop (each running rollout's waves: bake, gates, promote or halt),
- collected production data (batches from devices → the data store; retention in upkeep), and
- the Prometheus metrics of this process (read at scrape, filled by the API's middleware).

No part holds the hub or reaches back into it; :class:`HubProcess` only owns their lifecycle.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

from cloud_hub.alerts.evaluate import Transition
from cloud_hub.alerts.loop import AlertLoop
from cloud_hub.alerts.store import Window
from cloud_hub.broker.mosquitto import MosquittoAccounts, hub_mqtt_password
from cloud_hub.broker.rabbitmq import RabbitMqAccounts
from cloud_hub.core import HubCore
from cloud_hub.data.intake import CollectedData
from cloud_hub.data.store import open_data_store
from cloud_hub.fleet.changes import FleetChanges
from cloud_hub.fleet.desired import DesiredSigner
from cloud_hub.fleet.executor import AccountSync, EffectExecutor
from cloud_hub.fleet.grant_source import DatabaseGrants, GrantWarmer
from cloud_hub.fleet.grants import DownloadGrants
from cloud_hub.fleet.joins import JoinQueue
from cloud_hub.fleet.maintenance import FleetMaintenance
from cloud_hub.fleet.publish import DesiredPublisher
from cloud_hub.fleet.rotation import CredentialExpiry
from cloud_hub.ingest.worker import IngestWorker, ingest_policy
from cloud_hub.login_throttle import LoginThrottle, ThrottlePolicy
from cloud_hub.metrics import HubMetrics
from cloud_hub.mqtt.link import MqttLink
from cloud_hub.rollouts.loop import RolloutLoop
from cloud_hub.settings import HubSettings
from cloud_hub.webhooks.dispatcher import DispatchPolicy, WebhookDispatcher
from manifests.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class HubProcess:
    """Everything one hub process runs, built by :func:`wire_hub`."""

    core: HubCore
    fleet: FleetChanges
    executor: EffectExecutor
    upkeep: FleetMaintenance
    #: who may download what, remembered for a bounded time (cloud_hub.fleet.grants)
    grants: DownloadGrants
    link: MqttLink | None = None
    ingest: IngestWorker | None = None
    publisher: DesiredPublisher | None = None
    accounts: AccountSync | None = None
    alerts: AlertLoop | None = None
    metrics: HubMetrics = field(default_factory=HubMetrics)
    webhooks: WebhookDispatcher | None = None
    #: collected production data: receiving, serving, retention (None only in bare tests)
    data: CollectedData | None = None
    #: progressive rollouts: each running one's next step (cloud_hub.rollouts)
    rollouts: RolloutLoop | None = None
    #: wrong dashboard sign-ins per client address (this process's own; see login_throttle)
    login_throttle: LoginThrottle = field(default_factory=lambda: LoginThrottle(ThrottlePolicy()))
    #: devices joining with a provisioning token, committed in batches (None only in bare tests)
    joins: JoinQueue | None = None
    _started: bool = False

    def start(self) -> None:
        """Start the background work: upkeep, then broker accounts, ingest and the MQTT link.

        A hub that manages the broker's accounts makes sure, before it connects, that the
        broker knows its own user and exactly the devices in the database (restored backups,
        devices enrolled while the broker was down).
        """
        if self._started:
            return
        self._started = True
        self.upkeep.start()
        if self.alerts is not None:
            self.alerts.start()
        if self.webhooks is not None:
            self.webhooks.start()
        if self.rollouts is not None:
            self.rollouts.start()
        if self.link is not None:
            self.executor.sync_accounts()
            if self.ingest is not None:
                self.ingest.start()
            self.link.start()

    def close(self) -> None:
        """Stop what runs (upkeep, link, ingest) and close the core; safe to call twice."""
        if self._started:
            self._started = False
            self.upkeep.stop()
            if self.joins is not None:
                self.joins.stop()
            if self.alerts is not None:
                self.alerts.stop()
            if self.webhooks is not None:
                self.webhooks.stop()
            if self.rollouts is not None:
                self.rollouts.stop()
            if self.link is not None:
                with contextlib.suppress(Exception):
                    self.link.stop()
            if self.ingest is not None:
                self.ingest.stop()
        self.core.close()


def wire_hub(core: HubCore) -> HubProcess:
    """Build the running parts of a hub around ``core`` (nothing starts until ``start()``)."""
    settings = core.settings
    link, ingest, publisher = _broker_parts(core)
    data = CollectedData(
        core.sessions, open_data_store(core.blobs, settings.data_dir), settings, settings.data_dir
    )
    accounts = _account_sync(core)
    grants = DownloadGrants(
        ttl_s=settings.download_grant_ttl_s,
        max_devices=settings.download_cache_devices,
        max_modules=settings.download_cache_modules,
    )
    executor = EffectExecutor(
        core.sessions,
        publisher=publisher,
        accounts=accounts,
        on_issued=GrantWarmer(grants, DatabaseGrants(core.sessions)),
    )
    fleet = FleetChanges(core.sessions, DesiredSigner(core.hub_key, settings.desired_ttl_s), executor)
    expiry = CredentialExpiry(core.sessions, settings.credentials_max_age_days)
    upkeep = FleetMaintenance(
        renew=fleet.renew_expiring,
        republish=publisher.republish_all if publisher is not None else None,
        pending=publisher.publish_pending if publisher is not None else None,
        interval_s=settings.upkeep_interval_s,
        chores=[data.prune_if_due, expiry.run_if_due],
    )
    if link is not None:
        link.on_connected = upkeep.request_republish
    metrics = HubMetrics()
    metrics.watch_fleet(core.sessions, ingest=lambda: ingest, link=lambda: link)

    def count_transitions(moved: list[Transition]) -> None:
        for t in moved:
            metrics.alert_transitions.labels(t.kind).inc()

    alerts = AlertLoop(
        core.sessions,
        Window(settings.alert_window_s, settings.alert_max_samples, settings.alert_max_subjects),
        interval_s=settings.alert_interval_s,
        on_round=count_transitions,
    )
    # Wrong admin tokens at sign-in and wrong joins are throttled per address alike (each
    # process its own table of each).
    wrong_tokens = ThrottlePolicy(
        free_failures=settings.login_free_failures,
        base_delay_s=settings.login_delay_s,
        max_delay_s=settings.login_max_delay_s,
        forget_after_s=settings.login_forget_s,
        max_clients=settings.login_throttle_clients,
    )
    return HubProcess(
        core=core,
        fleet=fleet,
        executor=executor,
        upkeep=upkeep,
        link=link,
        ingest=ingest,
        publisher=publisher,
        accounts=accounts,
        alerts=alerts,
        metrics=metrics,
        data=data,
        grants=grants,
        rollouts=RolloutLoop(
            core.sessions,
            fleet,
            interval_s=settings.rollout_interval_s,
            max_samples=settings.rollout_max_samples,
        ),
        webhooks=WebhookDispatcher(
            core.sessions,
            DispatchPolicy.from_settings(settings),
            on_attempt=lambda delivered: metrics.webhook_delivery(delivered=delivered),
        ),
        joins=JoinQueue(
            fleet, core.sessions, reserved=settings.mqtt_username, max_batch=settings.join_batch,
            rate_per_s=settings.join_per_s, burst=settings.join_burst, throttle=wrong_tokens,
        ),
        login_throttle=LoginThrottle(wrong_tokens),
    )


def open_hub(settings: HubSettings) -> HubProcess:
    """Open the core for ``settings`` and wire a hub around it."""
    return wire_hub(HubCore.open(settings))


def _account_sync(core: HubCore) -> AccountSync | None:
    """Who keeps the broker's accounts: Mosquitto's files, RabbitMQ's API, or nobody."""
    settings = core.settings
    if settings.broker_dir is not None and settings.rabbitmq_api is not None:
        raise ConfigError("give either a Mosquitto broker dir or a RabbitMQ management API, not both")
    if settings.rabbitmq_api is not None:
        return RabbitMqAccounts(core.sessions, settings, hub_mqtt_password(settings))
    if settings.broker_dir is not None:
        return MosquittoAccounts(core.sessions, settings)
    return None


def _broker_parts(core: HubCore) -> tuple[MqttLink | None, IngestWorker | None, DesiredPublisher | None]:
    settings = core.settings
    if settings.mqtt_host is None:
        return None, None, None
    limits, retention = ingest_policy(settings)
    ingest = IngestWorker(
        core.sessions,
        prefix=settings.topic_prefix,
        telemetry_keep=settings.telemetry_keep,
        limits=limits,
        retention=retention,
    )
    link = MqttLink(
        host=settings.mqtt_host,
        port=settings.mqtt_port,
        prefix=settings.topic_prefix,
        username=settings.mqtt_username,
        password=hub_mqtt_password(settings),
        tls_ca=str(settings.mqtt_tls_ca) if settings.mqtt_tls_ca else None,
        sink=ingest.submit,
        share_group=settings.mqtt_share_group,
        log_limits=settings.log_limits(),
    )
    return link, ingest, DesiredPublisher(core.sessions, link)
