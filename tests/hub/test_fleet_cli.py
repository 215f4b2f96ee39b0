"""The fleet commands of the ``edgepack`` CLI, run as a user runs them, against a real hub."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from manifests.device import parse_credentials
from manifests.reported import ModuleStatus, ReportedState
from manifests.states import ServiceState
from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, MqttProbe
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import desired_over_http, hub_trust, push, verified_state
from tests.waiting import wait_for

EDGEPACK = str(Path(sys.executable).parent / "edgepack")


def env_for(home: Path, hub: RunningHub) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEPACK_")}
    env.update(
        {
            "EDGEPACK_HOME": str(home),
            "COLUMNS": "200",
            "NO_COLOR": "1",
            "EDGEPACK_HUB_URL": hub.url,
            "EDGEPACK_TOKEN": hub.admin_token,
        }
    )
    return env


def run(home: Path, hub: RunningHub, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EDGEPACK, *args],
        env=env_for(home, hub),
        stdin=subprocess.DEVNULL,  # as in a script or CI job: no terminal to answer a question
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error:"), result.stderr
    return result.stderr


def test_enroll_deploy_tag_and_services(hub: HubFactory, publisher: Publisher, tmp_path: Path) -> None:
    h = hub()
    push(h, publisher, "digits", "1")
    home = tmp_path / "home"
    creds_file = tmp_path / "edge-1.json"

    r = run(home, h, "device", "enroll", "edge-1", "--tag", "site=berlin", "--out", str(creds_file))
    assert r.returncode == 0, r.stderr
    assert "shown only once" in r.stdout
    creds = json.loads(creds_file.read_text())
    assert stat.S_IMODE(creds_file.stat().st_mode) == 0o600
    assert creds["token"] in r.stdout and creds["hub_key"]["keyid"] == h.core.hub_key_id
    # What the agent reads: a valid credentials document that names the publishers the hub
    # trusts, so the device can check every module's signature itself.
    document = parse_credentials(creds_file.read_bytes(), source=str(creds_file))
    assert [k.keyid for k in document.publishers.keys] == [k.keyid for k in h.core.trust.keys]
    assert document.publishers.keys and document.device_id == "edge-1"
    enrolled = ok_json(run(home, h, "device", "enroll", "edge-2", "--tag", "site=munich", "--json"))
    assert enrolled["mqtt"]["username"] == "edge-2"

    dc = tmp_path / "deploymentconfig.json"
    dc.write_text(json.dumps({"computeType": "local", "port": 8891}))
    out = ok_json(
        run(
            home,
            h,
            "deploy",
            "-n",
            "digits",
            "-m",
            "digits:1",
            "--dc",
            str(dc),
            "--selector",
            "site=berlin",
            "--json",
        )
    )
    assert out["created"] is True and out["issued"] == {"edge-1": 2}
    assert out["deployment"]["settings"]["port"] == 8891
    state = verified_state(desired_over_http(h, creds["token"]), hub_trust(h), "edge-1")
    assert [m.service for m in state.modules] == ["digits"]

    devices = ok_json(run(home, h, "device", "list", "--json"))
    assert {d["id"]: d["services"] for d in devices} == {"edge-1": ["digits"], "edge-2": []}
    r = run(home, h, "device", "tag", "edge-2", "site=berlin")
    assert r.returncode == 0 and "edge-2 (generation 2)" in r.stdout, r.stdout + r.stderr
    r = run(home, h, "service", "show", "digits")
    assert r.returncode == 0 and "edge-1" in r.stdout and "edge-2" in r.stdout
    assert "not reported" in r.stdout
    services = ok_json(run(home, h, "service", "list", "--json"))
    assert [(s["name"], len(s["devices"])) for s in services] == [("digits", 2)]
    r = run(home, h, "device", "show", "edge-1")
    assert r.returncode == 0 and "digits" in r.stdout and "site=berlin" in r.stdout

    # Bad input: one red line, exit code 2.
    assert "selector" in one_line_error(
        run(home, h, "deploy", "-n", "x", "-m", "digits:1", "--selector", "site="), 2
    )
    assert "digits:9" in one_line_error(
        run(home, h, "deploy", "-n", "x", "-m", "digits:9", "--target", "device:edge-1"), 2
    )
    assert "device:ID" in one_line_error(
        run(home, h, "deploy", "-n", "x", "-m", "digits:1", "--target", "edge-1"), 2
    )
    dc.write_text(json.dumps({"computeType": "local", "prot": 1}))
    assert "did you mean 'port'" in one_line_error(
        run(home, h, "deploy", "-n", "x", "-m", "digits:1", "--dc", str(dc), "--selector", "a=b"), 2
    )

    # -m without a version names a module here (a model only with --ic): say which list.
    missing = one_line_error(
        run(home, h, "deploy", "-n", "x", "-m", "digits", "--target", "device:edge-1"), 2
    )
    assert "digits:VERSION" in missing and "'edgepack module list --name digits'" in missing
    assert "model list" not in missing

    # Without a terminal nobody can answer "are you sure": say --yes, and change nothing.
    for args in (("service", "delete", "digits"), ("device", "revoke", "edge-1")):
        refused = one_line_error(run(home, h, *args), 2)
        assert "--yes" in refused and "Aborted" not in refused
    assert ok_json(run(home, h, "service", "list", "--json"))[0]["name"] == "digits"
    assert run(home, h, "service", "delete", "digits", "--yes").returncode == 0
    assert "digits" in one_line_error(run(home, h, "service", "show", "digits"), 2)
    assert run(home, h, "device", "revoke", "edge-1", "--yes").returncode == 0
    assert [d["id"] for d in ok_json(run(home, h, "device", "list", "--json"))] == ["edge-2"]


def report(
    probe: MqttProbe,
    prefix: str,
    device_id: str,
    digest: str,
    state: ServiceState,
    reason: str | None = None,
    endpoint: str | None = None,
) -> None:
    now = datetime.now(UTC)
    body = ReportedState(
        device_id=device_id,
        reported_at=now,
        agent_version="test-1",
        applied_generation=2,
        modules=[
            ModuleStatus(
                service="digits",
                manifest_digest=digest,
                state=state,
                reason=reason,
                since=now,
                endpoint=endpoint,
            )
        ],
    )
    probe.publish(f"{prefix}/devices/{device_id}/reported", body.model_dump_json(by_alias=True), retain=True)


def test_service_wait_follows_reported_states(
    hub: HubFactory, publisher: Publisher, mosquitto: Broker, topic_prefix: str, tmp_path: Path
) -> None:
    h = hub(mqtt_host=mosquitto.host, mqtt_port=mosquitto.port, topic_prefix=topic_prefix, mqtt_username=None)
    mod = push(h, publisher, "digits", "1")
    home = tmp_path / "home"
    for device_id in ("edge-1", "edge-2"):
        assert run(home, h, "device", "enroll", device_id, "--tag", "site=berlin", "--json").returncode == 0
    assert (
        run(home, h, "deploy", "-n", "digits", "-m", "digits:1", "--selector", "site=berlin").returncode == 0
    )

    # Nobody reports and no agent ever connected: the wait ends after its grace, naming each device.
    refused = one_line_error(run(home, h, "service", "wait", "digits", "--timeout", "60"), 5)
    assert "edge-1 is offline (last seen never); edge-2 is offline (last seen never)" in refused
    # These devices speak only through the probe below, which never says they are online.
    kept = one_line_error(run(home, h, "service", "wait", "digits", "--timeout", "1", "--wait-offline"), 5)
    assert "on edge-1 (offline, last seen never), edge-2 (offline, last seen never)" in kept

    probe = MqttProbe.connect(mosquitto.host, mosquitto.port)
    try:
        # The probe speaks for both devices from here on, as their agents would: online first.
        for device_id in ("edge-1", "edge-2"):
            probe.publish(f"{topic_prefix}/devices/{device_id}/online", "true", retain=True)
        wait_for(
            lambda: all(d["online"] for d in ok_json(run(home, h, "device", "list", "--json"))) or None,
            what="both devices online at the hub",
        )
        waiting = subprocess.Popen(
            [EDGEPACK, "service", "wait", "digits", "--timeout", "60", "--interval", "0.2"],
            env=env_for(home, h),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        # In a pipe each change is a line as it happens (a live table is drawn once, at the end).
        assert waiting.stdout is not None
        assert waiting.stdout.readline().startswith("digits on edge-1: ")
        assert waiting.stdout.readline().startswith("digits on edge-2: ")
        report(probe, topic_prefix, "edge-1", mod.digest, ServiceState.TRANSITIONING)
        assert waiting.stdout.readline() == "digits on edge-1: Transitioning\n"
        report(
            probe, topic_prefix, "edge-2", mod.digest, ServiceState.HEALTHY, endpoint="http://10.0.0.2:8890"
        )
        report(
            probe, topic_prefix, "edge-1", mod.digest, ServiceState.HEALTHY, endpoint="http://10.0.0.1:8890"
        )
        stdout, stderr = waiting.communicate(timeout=90)
        assert waiting.returncode == 0, stderr
        assert "digits on edge-1: Healthy" in stdout and "digits on edge-2: Healthy" in stdout
        assert "Healthy on 2 device(s)" in stdout

        # Where to call it, as Azure's service.scoring_uri / swagger_uri say.
        shown = run(home, h, "service", "show", "digits")
        assert shown.returncode == 0, shown.stderr
        assert "scoring_uri  http://10.0.0.1:8890/score" in shown.stdout
        assert "swagger_uri  http://10.0.0.1:8890/swagger.json" in shown.stdout
        uris = ok_json(run(home, h, "service", "show", "digits", "--json"))
        assert (uris["scoring_uri"], uris["swagger_uri"]) == (
            "http://10.0.0.1:8890/score",
            "http://10.0.0.1:8890/swagger.json",
        )

        report(probe, topic_prefix, "edge-2", mod.digest, ServiceState.FAILED, "init() raised KeyError")
        failed = one_line_error(
            run(home, h, "service", "wait", "digits", "--timeout", "30", "--interval", "0.2"), 5
        )
        assert "edge-2: init() raised KeyError" in failed
    finally:
        probe.close()
