"""The hub's Prometheus metrics: one registry per hub process, served at ``GET /metrics``.

Fleet numbers (devices by state, online devices, the publish backlog, firing alerts) are
computed from the database at scrape time, so every replica reports the same fleet and a
scrape costs a few bounded queries. Process numbers (ingest counters and lag, this process's
API request latencies, webhook deliveries) are this replica's own: sum them over replicas.

API latencies are labelled with the route's template (``/api/v1/devices/{device_id}``), never
the raw path, so an attacker's URLs cannot grow the label set.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cloud_hub.alerts.tables import AlertRule, AlertState
from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.fleet.publish import unpublished
from cloud_hub.fleet.tables import Deployment
from cloud_hub.overview.queries import fleet_counts, rollout
from manifests.states import ServiceState

if TYPE_CHECKING:
    from cloud_hub.ingest.worker import IngestWorker
    from cloud_hub.mqtt.link import MqttLink

#: Services whose roll-up a scrape computes (one query each; a hub has tens, as the dashboard's
#: summary assumes).
MAX_SERVICES = 200
#: Latency buckets of the hub's API, seconds (a dashboard poll is milliseconds, an upload minutes).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class _FleetCollector(Collector):
    def __init__(
        self,
        sessions: Sessions,
        ingest: Callable[[], IngestWorker | None],
        link: Callable[[], MqttLink | None],
    ) -> None:
        self._sessions = sessions
        self._ingest = ingest
        self._link = link

    def collect(self) -> Iterator[Metric]:
        with self._sessions.snapshot() as s:
            counts = fleet_counts(s)
            backlog = len(unpublished(s))
            deployments = s.scalars(select(Deployment).order_by(Deployment.name).limit(MAX_SERVICES)).all()
            services = collections.Counter(rollout(s, d).state.value for d in deployments)
            firing = s.execute(
                select(AlertRule.severity, func.count())
                .join(AlertState, AlertState.rule == AlertRule.name)
                .where(AlertState.firing.is_(True))
                .group_by(AlertRule.severity)
            ).all()
        devices = GaugeMetricFamily(
            "edgepack_hub_devices", "Enrolled (not revoked) devices by state", labels=["state"]
        )
        for state, n in sorted(counts.by_state.items()):
            devices.add_metric([state], n)
        yield devices
        by_service_state = GaugeMetricFamily(
            "edgepack_hub_services",
            f"Services by roll-up state (the first {MAX_SERVICES} by name)",
            labels=["state"],
        )
        for state in ServiceState:
            by_service_state.add_metric([state.value], services.get(state.value, 0))
        yield by_service_state
        yield GaugeMetricFamily(
            "edgepack_hub_devices_online", "Devices whose agent is connected", value=counts.online
        )
        yield GaugeMetricFamily(
            "edgepack_hub_publish_backlog", "Devices whose desired state is not published yet", value=backlog
        )
        alerts = GaugeMetricFamily(
            "edgepack_hub_alerts_firing", "Alerts firing, by severity", labels=["severity"]
        )
        by_severity = {"info": 0, "warning": 0, "critical": 0} | {str(k): int(v) for k, v in firing}
        for severity, n in sorted(by_severity.items()):
            alerts.add_metric([severity], n)
        yield alerts
        link = self._link()
        yield GaugeMetricFamily(
            "edgepack_hub_mqtt_connected", "1 when this replica is connected to the broker",
            value=1 if link is not None and link.connected else 0,
        )  # fmt: skip
        worker = self._ingest()
        if worker is None:
            return
        messages = CounterMetricFamily(
            "edgepack_hub_ingest_messages",
            "Device messages this replica handled, by outcome",
            labels=["outcome"],
        )
        for outcome, n in asdict(worker.stats).items():
            messages.add_metric([outcome], n)
        yield messages
        yield GaugeMetricFamily(
            "edgepack_hub_ingest_pending", "Device messages waiting to be applied", value=worker.pending()
        )
        oldest = worker.oldest_pending_at()
        lag = 0.0 if oldest is None else max(0.0, (utcnow() - oldest).total_seconds())
        yield GaugeMetricFamily(
            "edgepack_hub_ingest_lag_seconds",
            "Age of the oldest device message waiting to be applied",
            value=lag,
        )


class HubMetrics:
    """This process's registry and the instruments other parts of the hub fill."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Histogram(
            "edgepack_hub_http_request_duration_seconds",
            "Time the hub's API took to answer, by route template",
            ["method", "route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        # Filled by the webhook sender through webhook_delivery(); zero until it exists.
        self.webhooks = Counter(
            "edgepack_hub_webhook_deliveries",
            "Webhook deliveries this replica attempted, by outcome",
            ["outcome"],
            registry=self.registry,
        )
        for outcome in ("delivered", "failed"):
            self.webhooks.labels(outcome)
        self.alert_transitions = Counter(
            "edgepack_hub_alert_transitions",
            "Alerts this replica fired or resolved",
            ["kind"],
            registry=self.registry,
        )
        for kind in ("alert.fired", "alert.resolved"):
            self.alert_transitions.labels(kind)

    def watch_fleet(
        self,
        sessions: Sessions,
        *,
        ingest: Callable[[], IngestWorker | None],
        link: Callable[[], MqttLink | None],
    ) -> None:
        self.registry.register(_FleetCollector(sessions, ingest, link))

    def webhook_delivery(self, *, delivered: bool) -> None:
        """The webhook sender's hook: count one delivery attempt."""
        self.webhooks.labels("delivered" if delivered else "failed").inc()


#: Methods the latency histogram names; any other is "other" (a client picks the method).
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def _route_of(scope: Scope) -> str:
    route: Any = scope.get("route")
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else "unmatched"


class RequestTimer:
    """ASGI middleware: each HTTP request's duration into the hub's latency histogram."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def timed_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, timed_send)
        finally:
            hub = getattr(scope["app"].state, "hub", None)
            if hub is not None:
                method = scope["method"] if scope["method"] in METHODS else "other"
                hub.metrics.requests.labels(method, _route_of(scope), f"{status // 100}xx").observe(
                    time.perf_counter() - started
                )
