"""The fleet's pure decisions as tables: selectors, targets, plans, port conflicts."""

from __future__ import annotations

from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cloud_hub.fleet.plan import (
    DeploymentView,
    DeviceView,
    Staged,
    assignments_digest,
    changed_devices,
    desired_payload,
    desired_payloads,
    devices_running,
    plan_digests,
    plan_fleet,
    port_conflicts,
)
from cloud_hub.fleet.targeting import (
    Target,
    format_selector,
    parse_selector,
    parse_tags,
    parse_target,
    selector_matches,
)
from manifests.desired import DeploymentSettings, DesiredState
from manifests.errors import ConfigError

pytestmark = pytest.mark.sql_independent  # pure logic: no database

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("site=berlin", {"site": "berlin"}),
        ("site=berlin,tier=gpu", {"site": "berlin", "tier": "gpu"}),
        (" site = berlin , tier=gpu ", {"site": "berlin", "tier": "gpu"}),
        ("site=berlin,site=berlin", {"site": "berlin"}),
        ("k8s.io/zone=eu-1", {"k8s.io/zone": "eu-1"}),
        ("fw=1.2.3", {"fw": "1.2.3"}),
    ],
)
def test_selector_parses(text: str, expected: dict[str, str]) -> None:
    assert parse_selector(text) == expected


@pytest.mark.parametrize(
    ("text", "complaint"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ("site", "expected key=value"),
        ("site=", "value ''"),
        ("=berlin", "key ''"),
        ("site=berlin,", "stray comma"),
        (",site=berlin", "stray comma"),
        ("site=berlin,,tier=gpu", "stray comma"),
        ("site==berlin", "value '=berlin'"),
        ("site=ber lin", "value 'ber lin'"),
        ("si te=berlin", "key 'si te'"),
        ("site=berlin,site=munich", "given twice"),
        ("site=berlin;tier=gpu", "value 'berlin;tier=gpu'"),
        ("-site=x", "key '-site'"),
    ],
)
def test_malformed_selector_is_a_config_error(text: str, complaint: str) -> None:
    with pytest.raises(ConfigError, match="selector") as info:
        parse_selector(text)
    assert complaint in str(info.value)


@pytest.mark.parametrize(
    ("selector", "tags", "matches"),
    [
        ({"site": "berlin"}, {"site": "berlin"}, True),
        ({"site": "berlin"}, {"site": "berlin", "tier": "gpu"}, True),
        ({"site": "berlin", "tier": "gpu"}, {"site": "berlin"}, False),
        ({"site": "berlin"}, {"site": "Berlin"}, False),
        ({"site": "berlin"}, {}, False),
        ({"site": "berlin", "tier": "gpu"}, {"tier": "gpu", "site": "berlin"}, True),
    ],
)
def test_selector_matching(selector: dict[str, str], tags: dict[str, str], matches: bool) -> None:
    assert selector_matches(selector, tags) is matches


def test_format_selector_round_trips() -> None:
    assert parse_selector(format_selector({"tier": "gpu", "site": "berlin"})) == {
        "site": "berlin",
        "tier": "gpu",
    }


def test_tags_given_twice_with_different_values_are_refused() -> None:
    assert parse_tags(["a=1", "b=2", "a=1"]) == {"a": "1", "b": "2"}
    with pytest.raises(ConfigError, match="given twice"):
        parse_tags(["a=1", "a=2"])


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"devices": ["a", "b", "a"]}, Target(devices=("a", "b"))),
        ({"selector": "site=berlin"}, Target(selector={"site": "berlin"})),
        ({"selector": {"site": "berlin"}}, Target(selector={"site": "berlin"})),
    ],
)
def test_target_parses(raw: Any, expected: Target) -> None:
    assert parse_target(raw) == expected


@pytest.mark.parametrize(
    ("raw", "complaint"),
    [
        ("site=berlin", "must be an object"),
        ({}, "exactly one"),
        ({"devices": ["a"], "selector": "x=y"}, "exactly one"),
        ({"devices": []}, "non-empty list"),
        ({"devices": "a"}, "non-empty list"),
        ({"devices": ["../etc"]}, "device id"),
        ({"selector": ""}, "empty"),
        ({"selector": 3}, "must be a string"),
        ({"selecter": "x=y"}, "unknown field 'selecter'"),
    ],
)
def test_bad_target_is_a_config_error(raw: Any, complaint: str) -> None:
    with pytest.raises(ConfigError, match=complaint):
        parse_target(raw)


def dep(name: str, target: Target, port: int = 8890) -> DeploymentView:
    return DeploymentView(
        name=name,
        module="digits",
        version="1",
        manifest_digest=DIGEST,
        settings=DeploymentSettings(port=port),
        target=target,
    )


BERLIN = DeviceView("b1", {"site": "berlin", "tier": "gpu"})
BERLIN_CPU = DeviceView("b2", {"site": "berlin", "tier": "cpu"})
MUNICH = DeviceView("m1", {"site": "munich"})
FLEET = [BERLIN, BERLIN_CPU, MUNICH]


@pytest.mark.parametrize(
    ("deployments", "expected"),
    [
        ([], {"b1": [], "b2": [], "m1": []}),
        ([dep("svc", Target(selector={"site": "berlin"}))], {"b1": ["svc"], "b2": ["svc"], "m1": []}),
        (
            [dep("svc", Target(selector={"site": "berlin", "tier": "gpu"}))],
            {"b1": ["svc"], "b2": [], "m1": []},
        ),
        ([dep("svc", Target(devices=("m1", "ghost")))], {"b1": [], "b2": [], "m1": ["svc"]}),
        (
            [
                dep("zeta", Target(selector={"site": "berlin"}), port=9000),
                dep("alpha", Target(devices=("b1",)), port=9001),
            ],
            {"b1": ["alpha", "zeta"], "b2": ["zeta"], "m1": []},
        ),
    ],
)
def test_plan_assigns_each_device_its_services(
    deployments: list[DeploymentView], expected: dict[str, list[str]]
) -> None:
    plan = plan_fleet(FLEET, deployments)
    assert {d: [a.service for a in mods] for d, mods in plan.items()} == expected


def test_port_conflicts_name_device_port_and_both_services() -> None:
    plan = plan_fleet(
        FLEET,
        [
            dep("a", Target(selector={"site": "berlin"}), port=8890),
            dep("b", Target(devices=("b2",)), port=8890),
            dep("c", Target(devices=("b1",)), port=8891),
        ],
    )
    conflicts = port_conflicts(plan)
    assert [(c.device_id, c.port, c.services) for c in conflicts] == [("b2", 8890, ("a", "b"))]
    assert "port 8890 on device 'b2'" in conflicts[0].message()
    assert "'a' and 'b'" in conflicts[0].message()


def test_no_port_conflict_on_different_devices_or_ports() -> None:
    plan = plan_fleet(
        FLEET,
        [
            dep("a", Target(devices=("b1",)), port=8890),
            dep("b", Target(devices=("b2",)), port=8890),
            dep("c", Target(devices=("b1",)), port=8891),
        ],
    )
    assert port_conflicts(plan) == []


def test_changed_devices_are_those_whose_assignments_differ_from_what_was_issued() -> None:
    svc = dep("svc", Target(selector={"site": "berlin"}))
    before = plan_fleet(FLEET, [svc])
    issued = {d: assignments_digest(mods) for d, mods in before.items()}
    assert changed_devices(issued, before) == []
    assert changed_devices({}, before) == ["b1", "b2", "m1"]
    assert changed_devices({**issued, "m1": None}, before) == ["m1"]
    retagged = [
        DeviceView("b1", {"site": "munich"}),
        BERLIN_CPU,
        MUNICH,
        DeviceView("new", {"site": "berlin"}),
    ]
    after = plan_fleet(retagged, [svc])
    assert changed_devices(issued, after) == ["b1", "new"]
    assert devices_running(after, "svc") == ["b2", "new"]
    moved = plan_fleet(FLEET, [dep("svc", Target(selector={"site": "berlin"}), port=9999)])
    assert changed_devices(issued, moved) == ["b1", "b2"]
    renamed = plan_fleet(FLEET, [dep("svc2", Target(selector={"site": "berlin"}))])
    assert changed_devices(issued, renamed) == ["b1", "b2"]


def test_desired_payload_is_a_valid_desired_state() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    plan = plan_fleet(FLEET, [dep("svc", Target(devices=("b1",)))])
    payload = desired_payload("b1", 7, plan["b1"], issued=now, expires=now + timedelta(days=1))
    state = DesiredState.model_validate(payload)
    assert payload["schema"] == "edgepack.desired/v1"
    assert (state.device_id, state.generation) == ("b1", 7)
    assert [m.service for m in state.modules] == ["svc"]


def test_devices_with_the_same_services_share_one_assignment_list() -> None:
    # What lets a fleet-wide change render and digest each distinct list once, not per device.
    plan = plan_fleet(
        FLEET,
        [dep("svc", Target(selector={"site": "berlin"})), dep("gpu", Target(devices=("b1",)), port=9001)],
    )
    assert plan["b2"] is not plan["b1"]
    berlin = plan_fleet(
        [*FLEET, DeviceView("b3", {"site": "berlin"})], [dep("svc", Target(selector={"site": "berlin"}))]
    )
    assert berlin["b2"] is berlin["b3"]
    assert berlin["b2"][0] is berlin["b1"][0]


def test_plan_digests_match_each_devices_own_digest() -> None:
    plan = plan_fleet(
        [*FLEET, DeviceView("b3", {"site": "berlin"})],
        [dep("svc", Target(selector={"site": "berlin"})), dep("one", Target(devices=("b1",)), port=9001)],
    )
    assert plan_digests(plan) == {d: assignments_digest(mods) for d, mods in plan.items()}
    assert len(set(plan_digests(plan).values())) == 3  # b1; b2 and b3; m1


def test_desired_payloads_are_each_devices_own_payload() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    later = now + timedelta(days=1)
    plan = plan_fleet(
        [*FLEET, DeviceView("b3", {"site": "berlin"})],
        [dep("svc", Target(selector={"site": "berlin"})), dep("one", Target(devices=("b1",)), port=9001)],
    )
    generations = {"b1": 3, "b2": 1, "b3": 9, "m1": 2, "gone": 4}
    payloads = desired_payloads(plan, generations, issued=now, expires=later)
    assert payloads == {
        d: desired_payload(d, g, plan.get(d, []), issued=now, expires=later) for d, g in generations.items()
    }


@pytest.mark.parametrize(("device_id", "generation"), [("bad id!", 1), ("b2", 0)])
def test_desired_payloads_refuse_what_the_model_refuses(device_id: str, generation: int) -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    fleet = [*FLEET, DeviceView(device_id, {"site": "berlin"})]
    plan = plan_fleet(fleet, [dep("svc", Target(selector={"site": "berlin"}))])
    with pytest.raises(ValueError, match=r"device_id|generation"):
        desired_payloads(plan, {"b1": 1, device_id: generation}, issued=now, expires=now + timedelta(days=1))


def test_under_a_rollout_each_device_gets_the_version_its_wave_gives_and_lists_stay_shared() -> None:
    # Waves 50 % then 100 %, the first released: about half of 200 devices run version 2, the
    # rest keep version 1; the plan's shared lists must not hand one wave's list to the other.
    staged = Staged(
        rollout_id="r-1",
        wave=0,
        waves=(50.0, 100.0),
        thresholds={},
        spread_by=None,
        module="digits",
        version="1",
        manifest_digest="sha256:" + "1" * 64,
    )
    svc = replace(dep("svc", Target(selector={"fleet": "f"})), version="2", staged=staged)
    fleet = [DeviceView(f"d{i:03d}", {"fleet": "f"}) for i in range(200)]
    plan = plan_fleet(fleet, [svc])
    for device in fleet:
        expected = svc.assignment(device)  # the one-device answer the plan must agree with
        assert plan[device.id] == [expected], device.id
    versions = Counter(plan[d.id][0].version for d in fleet)
    assert set(versions) == {"1", "2"} and 60 <= versions["2"] <= 140, versions
    kept = [plan[d.id] for d in fleet if plan[d.id][0].version == "1"]
    assert all(lst is kept[0] for lst in kept)
