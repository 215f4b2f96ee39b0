"""Which events become which CloudEvents, for whom, and how long retries wait: pure tables."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest
from standardwebhooks import Webhook

from cloud_hub.webhooks.catalog import check_types, envelope, event_type, subject_of, wanted
from cloud_hub.webhooks.dispatcher import signed_headers
from cloud_hub.webhooks.queue import Job, RetryPolicy
from cloud_hub.webhooks.subscriptions import new_secret
from manifests.errors import ConfigError

pytestmark = pytest.mark.sql_independent


@pytest.mark.parametrize(
    ("kind", "type_"),
    [
        ("model_registered", "edgepack.model.registered"),
        ("module_pushed", "edgepack.module.pushed"),
        ("deploy", "edgepack.deployment.created"),
        ("redeploy", "edgepack.deployment.updated"),
        ("undeploy", "edgepack.deployment.deleted"),
        ("failed", "edgepack.service.state-changed"),
        ("offline", "edgepack.device.offline"),
        ("alert.fired", "edgepack.alert.fired"),
        ("throttled", None),
        ("blob-corrupt", None),
    ],
)
def test_event_kinds_map_to_cloudevents_types(kind: str, type_: str | None) -> None:
    assert event_type(kind) == type_


@pytest.mark.parametrize(
    ("device", "service", "subject"),
    [
        ("edge-1", "svc", "services/svc/devices/edge-1"),
        (None, "svc", "services/svc"),
        ("edge-1", None, "devices/edge-1"),
        (None, None, "models"),
    ],
)
def test_subjects(device: str | None, service: str | None, subject: str) -> None:
    assert subject_of("model_registered", device, service) == subject


def test_types_and_filters_select_events() -> None:
    assert wanted([], {}, "edgepack.device.online", "edge-1", None)
    assert not wanted(["edgepack.model.registered"], {}, "edgepack.device.online", "edge-1", None)
    assert wanted([], {"service": "digits"}, "edgepack.service.state-changed", "edge-1", "digits")
    assert not wanted([], {"service": "digits"}, "edgepack.service.state-changed", "edge-1", "other")
    assert not wanted([], {"device": "edge-2"}, "edgepack.device.online", "edge-1", None)


def test_short_type_names_are_completed_and_unknown_ones_refused() -> None:
    assert check_types(["model.registered", "edgepack.model.registered"]) == ["edgepack.model.registered"]
    with pytest.raises(ConfigError, match="unknown event type"):
        check_types(["model.exploded"])


def test_an_envelope_is_cloudevents_json_that_verifies_with_the_secret() -> None:
    env = envelope(
        event_id=7,
        kind="enrolled",
        type_="edgepack.device.enrolled",
        message="m",
        at=datetime.now(UTC),
        device_id="edge-1",
        service=None,
    )
    secret = new_secret()
    job = Job(1, "wh_x", "http://r", secret, env.message_id, env.body, 0, datetime.now(UTC))
    headers = signed_headers(job, datetime.now(UTC))
    assert json.loads(Webhook(secret).verify(env.body, headers) and env.body)["specversion"] == "1.0"
    assert headers["webhook-id"] == json.loads(env.body)["id"]


def test_backoff_grows_with_jitter_up_to_its_cap() -> None:
    policy = RetryPolicy(base_s=1, max_s=60, max_age_s=86400)
    for attempts, cap in [(1, 1), (2, 2), (5, 16), (30, 60)]:
        waits = [policy.delay_s(attempts) for _ in range(200)]
        assert max(waits) <= cap and min(waits) >= cap / 10
        assert len(set(waits)) > 1  # jitter: replicas retrying together spread out
