"""The device's own contracts: credentials, agent.toml, log requests, the error tree, topics."""

from __future__ import annotations

import json
from pathlib import Path, PurePath

import pytest
from pydantic import ValidationError

from manifests import errors
from manifests.desired import RuntimeKind
from manifests.device import (
    AgentConfig,
    DeviceCredentials,
    parse_agent_config,
    parse_credentials,
    render_agent_config,
)
from manifests.logs import LogRequest, LogResponse
from manifests.topics import DEVICE_READS, DEVICE_WRITES, device_topic, parse_device_topic
from tests.conftest import REPO

EXAMPLES = REPO / "manifests" / "examples"


def example_credentials() -> dict[str, object]:
    data: dict[str, object] = json.loads((EXAMPLES / "device-credentials.json").read_text())
    return data


def test_credentials_carry_the_hub_key_and_the_publisher_keys() -> None:
    creds = parse_credentials(json.dumps(example_credentials()).encode(), source="edge.json")
    assert creds.hub_trust().keys == [creds.hub_key]
    assert creds.publishers.keys, "a device must know which publishers may sign its modules"


def test_credentials_without_publisher_keys_are_refused_with_what_to_do() -> None:
    data = example_credentials()
    del data["publishers"]
    with pytest.raises(errors.ConfigError, match=r"edge.json: missing required field 'publishers'.*enroll"):
        parse_credentials(json.dumps(data).encode(), source="edge.json")


def test_a_misspelt_credentials_field_gets_a_did_you_mean() -> None:
    data = example_credentials()
    data["hub_ulr"] = data.pop("hub_url")
    with pytest.raises(errors.ConfigError, match="did you mean 'hub_url'"):
        parse_credentials(json.dumps(data).encode(), source="edge.json")


@pytest.mark.parametrize("url", ["ftp://hub", "hub:8800", "http://", "http://a b"])
def test_credentials_refuse_a_hub_url_that_is_not_http(url: str) -> None:
    with pytest.raises(errors.ConfigError, match="hub_url"):
        parse_credentials(json.dumps({**example_credentials(), "hub_url": url}).encode(), source="e")


def test_credentials_that_are_not_json_say_so() -> None:
    with pytest.raises(errors.ConfigError, match="not valid JSON"):
        parse_credentials(b"{nope", source="edge.json")


def test_agent_config_round_trips_through_its_toml_rendering(tmp_path: Path) -> None:
    config = AgentConfig(
        credentials=tmp_path / "edge-1.json",
        state_dir=tmp_path / "state",
        runtimes=[RuntimeKind.PROCESS, RuntimeKind.DOCKER],
        service_host="127.0.0.1",
        telemetry_interval_s=2.5,
    )
    text = render_agent_config(config)
    assert parse_agent_config(text.encode(), source="agent.toml", base_dir=tmp_path) == config


def test_agent_config_resolves_relative_paths_against_its_folder() -> None:
    text = b'credentials = "edge-1.json"\nstate_dir = "state"\nruntimes = ["process"]\n'
    config = parse_agent_config(text, source="agent.toml", base_dir=PurePath("/etc/edgepack"))
    assert config.credentials == Path("/etc/edgepack/edge-1.json")
    assert config.state_dir == Path("/etc/edgepack/state")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'credentials = "c"\nstate_dir = "s"\nruntimes = ["kubernetes"]\n', "runtimes.0"),
        (b'credentials = "c"\nstate_dir = "s"\nruntimes = []\n', "runtimes"),
        (b'credentials = "c"\nstate_dir = "s"\nruntimes = ["process", "process"]\n', "listed twice"),
        (b'credentials = "c"\nstate_dir = "s"\nruntimes = ["process"]\ntelemetry_intervall_s = 5\n',
         "did you mean 'telemetry_interval_s'"),
        (b'credentials = "c"\nstate_dir = "s"\nruntimes = ["process"]\ntelemetry_interval_s = 0\n',
         "telemetry_interval_s"),
        (b"state_dir = [", "not valid TOML"),
    ],
)  # fmt: skip
def test_bad_agent_config_is_one_clear_line(text: bytes, message: str) -> None:
    with pytest.raises(errors.ConfigError, match=message) as caught:
        parse_agent_config(text, source="agent.toml", base_dir=PurePath("/x"))
    assert str(caught.value).startswith("agent.toml")
    assert "\n" not in str(caught.value)


def test_log_requests_are_bounded() -> None:
    LogRequest(request_id="ab" * 8, service="digits", tail=10_000)
    for bad in [{"tail": 0}, {"tail": 10_001}, {"request_id": "short"}, {"service": "../x"}]:
        with pytest.raises(ValidationError):
            LogRequest.model_validate({"request_id": "ab" * 8, "service": "digits", **bad})
    with pytest.raises(ValidationError):
        LogResponse(request_id="ab" * 8, device_id="d", service="s", lines=["x"] * 10_001)


def test_errors_say_whether_a_retry_can_help() -> None:
    temporary = [errors.FetchError, errors.HubUnavailable, errors.BrokerUnavailable,
                 errors.RegistryUnavailable, errors.Unschedulable]  # fmt: skip
    permanent = [errors.TrustError, errors.ConfigError, errors.RuntimeFailure,
                 errors.ModuleStartFailure, errors.ImageUnavailable, errors.NotFoundError]  # fmt: skip
    assert all(cls("x").temporary for cls in temporary)
    assert not any(cls("x").temporary for cls in permanent)
    assert errors.FetchError("x", retry_after_s=3).retry_after_s == 3
    assert issubclass(errors.NotFoundError, errors.FetchError)


def test_a_device_reads_and_writes_disjoint_channels_of_its_own_topics() -> None:
    assert set(DEVICE_READS).isdisjoint(DEVICE_WRITES)
    for channel in (*DEVICE_READS, *DEVICE_WRITES):
        topic = device_topic("dev-a", channel, prefix="p")
        assert parse_device_topic(topic, prefix="p") == ("dev-a", channel)


def test_the_credentials_example_is_a_valid_document() -> None:
    DeviceCredentials.model_validate(example_credentials())
