"""The contracts: module manifest rules, desired-state checks, reported state, topics, states."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from pydantic import ValidationError

from manifests.desired import (
    MAX_MODULE_SIGNERS,
    DesiredRefusal,
    DesiredStateRefused,
    ModuleAssignment,
    check_desired,
    check_module_signers,
    verify_desired,
)
from manifests.errors import TrustError
from manifests.module import check_relative_path, model_tags, tagged_models
from manifests.reported import ModuleStatus, ReportedState
from manifests.signing import key_id
from manifests.states import ServiceState
from manifests.topics import device_topic, parse_device_topic
from tests.factory import DesiredDefect, Forge

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def forge() -> Forge:
    return Forge()


# --- module manifest ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "src/../../x", "src/./x", "src//x", "src/x/", "src\\x", "a\x00b"],
)
def test_unsafe_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="unsafe path"):
        check_relative_path(path)


@pytest.mark.parametrize("path", ["src/score.py", "model/a/b.onnx", "model/.hidden", "src/..x"])
def test_ordinary_paths_pass(path: str) -> None:
    assert check_relative_path(path) == path


def payload_with(forge: Forge, **changes: Any) -> dict[str, Any]:
    return {**forge.manifest().payload(), **changes}


def test_manifest_round_trips_by_alias(forge: Forge) -> None:
    manifest = forge.manifest(name="digits", version="1.2.0")
    payload = manifest.payload()
    assert payload["schema"] == "edgepack.module/v1"
    assert type(manifest).model_validate(payload) == manifest
    assert manifest.ref == "digits:1.2.0"
    assert manifest.total_size() == sum(f.size for f in manifest.files)


@pytest.mark.parametrize(
    ("files", "reason"),
    [
        ({"src/score.py": b"x", "etc/passwd": b"y", "model/m": b"z"}, "must lie under src/"),
        ({"src/other.py": b"x", "model/m": b"z"}, "is not among files"),
    ],
)
def test_manifest_file_rules(forge: Forge, files: dict[str, bytes], reason: str) -> None:
    with pytest.raises(ValidationError, match=reason):
        forge.manifest(files=files)


def test_manifest_refuses_unsorted_or_repeated_files(forge: Forge) -> None:
    payload = forge.manifest().payload()
    with pytest.raises(ValidationError, match="sorted"):
        type(forge.manifest()).model_validate({**payload, "files": payload["files"][::-1]})
    with pytest.raises(ValidationError, match="twice"):
        type(forge.manifest()).model_validate({**payload, "files": payload["files"][:1] * 2})


def test_manifest_entry_script_must_be_under_src(forge: Forge) -> None:
    with pytest.raises(ValidationError, match="under src/"):
        forge.manifest(
            files={"model/score.py": b"x", "model/m": b"y"}, entry_script="model/score.py"
        )


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", "Digits"), ("name", "-x"), ("version", ""), ("version", "1 0"), ("extra", 1)],
)
def test_manifest_refuses_bad_names_versions_and_unknown_fields(
    forge: Forge, field: str, value: object
) -> None:
    with pytest.raises(ValidationError):
        type(forge.manifest()).model_validate(payload_with(forge, **{field: value}))


# --- desired state --------------------------------------------------------------------------


def test_desired_state_signed_by_the_hub_verifies_and_passes_checks(forge: Forge) -> None:
    parts = forge.module()
    state = forge.desired_state("dev-7", 3, [forge.assignment(parts)], issued=NOW)
    received = verify_desired(
        forge.desired_bytes(state), hub_trust=forge.hub_trust, device_id="dev-7",
        applied_generation=2, now=NOW,
    )  # fmt: skip
    assert received == state


def test_desired_state_for_another_device_is_refused(forge: Forge) -> None:
    state = forge.desired_state("dev-b", 5, issued=NOW)
    with pytest.raises(TrustError, match="for device 'dev-b', not 'dev-a'"):
        check_desired(state, device_id="dev-a", applied_generation=0, now=NOW)


@pytest.mark.parametrize("applied", [5, 6, 100])
def test_replayed_or_rolled_back_generation_is_refused(forge: Forge, applied: int) -> None:
    state = forge.desired_state("dev-a", 5, issued=NOW)
    with pytest.raises(TrustError, match=r"not newer .* replay or rollback"):
        check_desired(state, device_id="dev-a", applied_generation=applied, now=NOW)


def test_expired_desired_state_is_refused(forge: Forge) -> None:
    state = forge.desired_state(
        "dev-a", 9, issued=NOW - timedelta(hours=2), expires_in=timedelta(hours=1)
    )
    with pytest.raises(TrustError, match="expired"):
        check_desired(state, device_id="dev-a", applied_generation=1, now=NOW)
    # One second before its expiry it was still good.
    check_desired(
        state, device_id="dev-a", applied_generation=1, now=NOW - timedelta(hours=1, seconds=1)
    )


def test_desired_state_signed_by_a_stranger_or_tampered_is_refused(forge: Forge) -> None:
    state = forge.desired_state("dev-a", 2, issued=NOW)
    for data, reason in [
        (forge.desired_bytes(state, key=forge.stranger), "untrusted key"),
        (forge.desired_bytes(state, tamper=True), "does not match the content"),
    ]:
        with pytest.raises(DesiredStateRefused, match=reason) as refused:
            verify_desired(data, hub_trust=forge.hub_trust, device_id="dev-a", applied_generation=0, now=NOW)
        assert refused.value.reason is DesiredRefusal.HUB_SIGNATURE


# --- who may sign a module: the delegation each assignment carries ----------------------------


def test_a_module_signed_by_a_key_its_assignment_does_not_allow_is_refused(forge: Forge) -> None:
    parts = forge.module(name="digits", version="2", keys=[forge.stranger])
    owner = key_id(forge.publisher.public_key())
    stranger = key_id(forge.stranger.public_key())
    assignment = forge.assignment(parts, signers=[owner])
    with pytest.raises(TrustError) as refused:
        check_module_signers(assignment, [stranger])
    message = str(refused.value)
    assert stranger[:16] in message and owner[:16] in message
    assert "edgepack module grant digits KEYID" in message and "\n" not in message


def test_a_module_signed_by_an_allowed_key_passes(forge: Forge) -> None:
    owner, other = key_id(forge.publisher.public_key()), key_id(forge.stranger.public_key())
    parts = forge.module()
    check_module_signers(forge.assignment(parts), [owner])  # the default: its own signer
    check_module_signers(forge.assignment(parts, signers=[other, owner]), [owner])
    check_module_signers(forge.assignment(parts, signers=[owner]), [other, owner])  # one of them suffices


def test_a_state_of_an_older_hub_leaves_the_check_to_the_publisher_keys(forge: Forge) -> None:
    legacy = forge.assignment(forge.module()).model_copy(update={"signers": None})
    check_module_signers(legacy, [key_id(forge.stranger.public_key())])


@pytest.mark.parametrize(
    ("signers", "error"),
    [
        ([], "at least 1"),
        (["a" * 64] * 2, "listed twice"),
        (["x" * 64], "pattern"),
        ([f"{i:064x}" for i in range(MAX_MODULE_SIGNERS + 1)], f"at most {MAX_MODULE_SIGNERS}"),
    ],
)
def test_the_signers_of_an_assignment_are_bounded(forge: Forge, signers: list[str], error: str) -> None:
    payload = forge.assignment(forge.module()).model_dump(mode="json")
    with pytest.raises(ValidationError, match=error):
        ModuleAssignment.model_validate({**payload, "signers": signers})


def test_desired_state_refuses_two_modules_on_one_port(forge: Forge) -> None:
    a = forge.assignment(forge.module(name="a"), port=9000)
    b = forge.assignment(forge.module(name="b"), port=9000)
    with pytest.raises(ValidationError, match="same port"):
        forge.desired_state("dev-a", 1, [a, b], issued=NOW)


def test_desired_state_refuses_a_service_twice(forge: Forge) -> None:
    a = forge.assignment(forge.module(), service="svc", port=9000)
    b = forge.assignment(forge.module(), service="svc", port=9001)
    with pytest.raises(ValidationError, match="service is listed twice"):
        forge.desired_state("dev-a", 1, [a, b], issued=NOW)


def test_desired_state_must_expire_after_it_was_issued(forge: Forge) -> None:
    with pytest.raises(ValidationError, match="expires must be after issued"):
        forge.desired_state("dev-a", 1, issued=NOW, expires_in=timedelta(0))


@pytest.mark.parametrize("device_id", ["", "../etc", "dev/1", "dev 1"])
def test_desired_state_refuses_unsafe_device_ids(forge: Forge, device_id: str) -> None:
    with pytest.raises(ValidationError):
        forge.desired_state(device_id, 1, issued=NOW)


# --- reported state, states, topics ---------------------------------------------------------


def test_reported_state_round_trips() -> None:
    status = ModuleStatus(service="digits", state=ServiceState.HEALTHY, since=NOW, port=8890)
    report = ReportedState(
        device_id="dev-a",
        reported_at=NOW,
        agent_version="0.1.0",
        applied_generation=4,
        modules=[status],
    )
    data = report.model_dump(mode="json", by_alias=True)
    assert data["schema"] == "edgepack.reported/v1"
    assert data["modules"][0]["state"] == "Healthy"
    assert ReportedState.model_validate(data) == report


def test_the_five_service_states_and_which_are_final() -> None:
    assert [s.value for s in ServiceState] == [
        "Transitioning",
        "Unhealthy",
        "Unschedulable",
        "Failed",
        "Healthy",
    ]
    assert {s for s in ServiceState if s.final} == {ServiceState.FAILED, ServiceState.HEALTHY}


def test_topics_round_trip_and_reject_strangers() -> None:
    topic = device_topic("dev-a", "desired", prefix="t-123/edgepack")
    assert topic == "t-123/edgepack/devices/dev-a/desired"
    assert parse_device_topic(topic, prefix="t-123/edgepack") == ("dev-a", "desired")
    assert parse_device_topic("edgepack/devices/dev-a/desired") == ("dev-a", "desired")
    assert parse_device_topic("edgepack/devices/dev-a/secrets") is None
    assert parse_device_topic("edgepack/devices/dev-a/x/reported") is None
    assert parse_device_topic("other/devices/dev-a/reported") is None
    with pytest.raises(ValueError):
        device_topic("dev-a", "secrets")


@pytest.mark.parametrize("defect", list(DesiredDefect), ids=str)
def test_every_forged_desired_state_defect_is_refused_naming_the_reason(
    forge: Forge, defect: DesiredDefect
) -> None:
    data = forge.bad_desired(defect, device_id="dev-a", applied_generation=4, now=NOW)
    with pytest.raises(DesiredStateRefused, match=defect.reason) as refused:
        verify_desired(data, hub_trust=forge.hub_trust, device_id="dev-a", applied_generation=4, now=NOW)
    assert refused.value.reason is defect.refusal
    assert isinstance(refused.value, TrustError) and not refused.value.temporary


def test_the_sound_state_the_forge_starts_from_is_accepted(forge: Forge) -> None:
    state = forge.desired_state("dev-a", 5, [forge.assignment(forge.module())], issued=NOW)
    got = verify_desired(
        forge.desired_bytes(state), hub_trust=forge.hub_trust, device_id="dev-a",
        applied_generation=4, now=NOW,
    )  # fmt: skip
    assert got.generation == 5


def test_model_tags_keep_the_order_models_were_given_in() -> None:
    refs = [f"m{i}:{i}" for i in range(12, 0, -1)]  # more than 9: "10" must not sort before "2"
    tags = {"team": "vision", **model_tags(refs), "edgepack.model.x": "not a numbered tag"}
    assert tagged_models(tags) == refs
    assert tagged_models({"team": "vision"}) == []
