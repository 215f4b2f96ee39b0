"""Issue 16, findings 4, 5 and 7: what a device writes must not act on the operator's terminal,
a device's answer to a log request is cut to what was asked, and tags are bounded on every path.

A real hub writes a real Mosquitto's password file and ACL; the hostile device is an MQTT client
logged in with its own credentials (the broker lets it write only its own topics), and the
operator runs the real ``edgepack`` CLI, whose output is checked byte by byte.
"""

from __future__ import annotations

import json
import queue
import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Publisher
from tests.hub.broker_fixtures import Broker, BrokerFactory
from tests.hub.conftest import HubFactory, RunningHub
from tests.hub.fleet_support import deploy, enroll, push
from tests.hub.test_bulk_enrolment import _connect, _secured_hub
from tests.hub.test_fleet_cli import EDGEPACK, env_for, one_line_error, run

#: What a terminal acts on instead of printing: C0 but tab and the newline that ends a line, DEL,
#: C1 (U+009B is a one-character CSI), line/paragraph separators and the bidi controls.
ACTIVE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")

#: (what a module logged, what the operator must see instead)
HOSTILE_LINES = [
    ("\x1b[2J\x1b[3J\x1b[H screen cleared", "\\x1b[2J\\x1b[3J\\x1b[H screen cleared"),
    ("\x1b]0;you have been pwned\x07 title", "\\x1b]0;you have been pwned\\x07 title"),
    ("\x1b[8mhidden text\x1b[28m", "\\x1b[8mhidden text\\x1b[28m"),
    ("\x1b]52;c;cm0gLXJmIH4K\x07 clipboard", "\\x1b]52;c;cm0gLXJmIH4K\\x07 clipboard"),
    ("\x9b2J C1 clear, \x9d0;title\x9c", "\\x9b2J C1 clear, \\x9d0;title\\x9c"),
    ("rate = \u202e0001\u202c per s", "rate = \\u202e0001\\u202c per s"),
    (
        "[bold red]markup[/] [link=http://evil]x[/link] :skull:",
        "[bold red]markup[/] [link=http://evil]x[/link] :skull:",
    ),
    ("ok\rerror: overwritten", "ok\\x0derror: overwritten"),
    ("tab\tkept", "tab\tkept"),
]


@dataclass
class Fleet:
    hub: RunningHub
    broker: Broker
    prefix: str
    device_id: str
    password: str


@pytest.fixture
def fleet(
    hub: HubFactory, publisher: Publisher, broker_factory: BrokerFactory, topic_prefix: str, tmp_path: Path
) -> Fleet:
    """A secured hub and broker, device ``edge-1`` enrolled and running service ``digits``."""
    h, broker = _secured_hub(hub, broker_factory, tmp_path, topic_prefix)
    return _with_service(h, broker, publisher, topic_prefix)


def _with_service(h: RunningHub, broker: Broker, publisher: Publisher, prefix: str) -> Fleet:
    mod = push(h, publisher, "digits", "1")
    with h.client() as http:
        device = enroll(http, "edge-1")
        assert deploy(http, "digits", mod, devices=["edge-1"]).status_code == 201
    return Fleet(h, broker, prefix, "edge-1", device.mqtt_password)


Answer = Callable[[dict[str, Any]], bytes]


def answer_with(lines: list[str], **extra: Any) -> Answer:
    """A device's answer to a log request: these lines, whatever was asked."""

    def build(request: dict[str, Any]) -> bytes:
        return json.dumps(
            {
                "schema": "edgepack.logs-response/v1",
                "request_id": request["request_id"],
                "device_id": "edge-1",
                "service": request["service"],
                "lines": lines,
                **extra,
            }
        ).encode()

    return build


def _say_online(probe: Any, prefix: str, device_id: str, hub: RunningHub) -> None:
    """What an agent does first on connecting: the hub answers log requests only for a device
    it knows to be online."""
    probe.publish(f"{prefix}/devices/{device_id}/online", "true", retain=True)
    deadline = time.monotonic() + 20
    with hub.client() as http:
        while not http.get(f"/api/v1/devices/{device_id}").json()["online"]:
            assert time.monotonic() < deadline, "the hub never saw the device online"
            time.sleep(0.05)


@pytest.fixture
def device(fleet: Fleet) -> Iterator[Callable[[Answer], None]]:
    """The device side, logged in with edge-1's own credentials: answers every log request with
    what the answer set last (``device(answer_with([...]))``)."""
    probe = _connect(fleet.broker, fleet.device_id, fleet.password)
    base = f"{fleet.prefix}/devices/{fleet.device_id}"
    assert probe.subscribe(f"{base}/logs-request") == [1]
    _say_online(probe, fleet.prefix, fleet.device_id, fleet.hub)
    current: list[Answer] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                msg = probe.messages.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg.topic.endswith("/logs-request") and current:
                probe.publish(f"{base}/logs-response", current[-1](json.loads(msg.payload)))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield current.append
    stop.set()
    thread.join(timeout=5)
    probe.close()


def run_bytes(home: Path, h: RunningHub, *args: str) -> subprocess.CompletedProcess[bytes]:
    """The CLI as an operator runs it, its output kept as the bytes a terminal would get."""
    return subprocess.run([EDGEPACK, *args], env=env_for(home, h), capture_output=True, timeout=120)


def assert_inert(output: bytes) -> str:
    """``output`` holds nothing a terminal would act on (only text, tabs and line ends)."""
    text = output.decode("utf-8")
    found = ACTIVE.findall(text)
    assert not found, f"control characters reached the terminal: {found!r}"
    return text


# --- finding 4: log lines (and every other string a device sends) are text on the terminal ----


def test_escape_sequences_in_a_devices_log_lines_print_as_visible_text(
    fleet: Fleet, device: Callable[[Answer], None], tmp_path: Path
) -> None:
    device(answer_with([logged for logged, _ in HOSTILE_LINES]))
    with fleet.hub.client() as http:
        r = http.get("/api/v1/deployments/digits/logs", params={"device": "edge-1", "tail": 20})
    assert r.status_code == 200, r.text
    # The hub passes on escaped text (the contract, manifests/logs.py), whatever reads it.
    assert r.json()["lines"] == [shown for _, shown in HOSTILE_LINES]

    result = run_bytes(tmp_path / "home", fleet.hub, "service", "logs", "digits", "--device", "edge-1")
    assert result.returncode == 0, result.stderr
    assert_inert(result.stdout)
    # A tab is whitespace on a terminal; rich writes it as spaces to the next tab stop.
    expected = "".join(f"{shown.expandtabs(8)}\n" for _, shown in HOSTILE_LINES)
    assert result.stdout == expected.encode(), result.stdout


def test_a_devices_reported_reason_and_version_print_as_text_in_every_table(
    fleet: Fleet, tmp_path: Path
) -> None:
    reason = "\x9b2J\x9b3J wiped \u202eevil\u202c [bold red]alarm[/] :skull: \r\nerror: fake"
    version = "[/]1.0[link=http://evil]"
    report = {
        "schema": "edgepack.reported/v1",
        "device_id": "edge-1",
        "reported_at": datetime.now(UTC).isoformat(),
        "agent_version": version,
        "applied_generation": 2,
        "last_error": reason,
        "modules": [
            {"service": "digits", "state": "Failed", "since": datetime.now(UTC).isoformat(), "reason": reason}
        ],
    }
    probe = _connect(fleet.broker, fleet.device_id, fleet.password)
    try:
        probe.publish(f"{fleet.prefix}/devices/edge-1/reported", json.dumps(report), retain=True)
    finally:
        probe.close()
    deadline = time.monotonic() + 20
    with fleet.hub.client() as http:
        while http.get("/api/v1/devices/edge-1").json()["agent_version"] != version:
            assert time.monotonic() < deadline, "the hub did not take the report"
            time.sleep(0.1)

    # Markup and emoji codes print as they are; the line break is not a line break.
    shown = "\\x9b2J\\x9b3J wiped \\u202eevil\\u202c [bold red]alarm[/] :skull: \\x0d\\x0aerror: fake"
    home = tmp_path / "home"
    for args, expected in (
        (["device", "show", "edge-1"], [version, f"last error: {shown}", shown]),
        (["device", "list"], [version]),
        (["service", "show", "digits"], [shown]),
    ):
        result = run_bytes(home, fleet.hub, *args)
        assert result.returncode == 0, (args, result.stderr)
        text = assert_inert(result.stdout)
        for part in expected:
            assert part in text, (args, part, text)
        assert not any(line.startswith("error:") for line in text.splitlines()), text


# --- finding 5: the hub passes on at most what it asked for --------------------------------------


def test_a_device_answering_more_than_asked_gets_only_the_tail_and_cut_lines_through(
    fleet: Fleet, device: Callable[[Answer], None], tmp_path: Path
) -> None:
    # 10,000 lines (the most a contract answer holds), the newest 100,000 characters long.
    flood = [f"line {n}" for n in range(9_999)] + ["x" * 100_000]
    device(answer_with(flood))
    with fleet.hub.client() as http:
        r = http.get("/api/v1/deployments/digits/logs", params={"device": "edge-1", "tail": 3})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["truncated"] is True
    assert body["lines"][:2] == ["line 9997", "line 9998"]
    assert body["lines"][2] == "x" * 4096 + " [... 95,904 more characters cut]"

    result = run_bytes(
        tmp_path / "home", fleet.hub, "service", "logs", "digits", "--device", "edge-1", "--tail", "3"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == body["lines"]  # the lines alone, for a pipe
    assert b"older lines left out" in result.stderr


def test_the_hub_bounds_the_whole_answer_and_refuses_an_oversized_message(
    hub: HubFactory, publisher: Publisher, broker_factory: BrokerFactory, topic_prefix: str, tmp_path: Path
) -> None:
    h, broker = _secured_hub(
        hub,
        broker_factory,
        tmp_path,
        topic_prefix,
        log_payload_max_bytes=256 * 1024,
        log_answer_max_bytes=64 * 1024,
    )
    fleet = _with_service(h, broker, publisher, topic_prefix)
    probe = _connect(broker, fleet.device_id, fleet.password)
    answers: queue.Queue[Answer] = queue.Queue()

    def serve(_client: Any, _userdata: Any, msg: Any) -> None:
        request = json.loads(msg.payload)
        probe.client.publish(f"{topic_prefix}/devices/edge-1/logs-response", answers.get()(request), qos=1)

    assert probe.subscribe(f"{topic_prefix}/devices/edge-1/logs-request") == [1]
    probe.client.on_message = serve
    _say_online(probe, topic_prefix, fleet.device_id, h)
    try:
        with h.client() as http:
            # 2,000 lines of 100 characters (about 210 KB): the newest that fit in 64 KiB.
            answers.put(answer_with([f"{n:05d}" + "y" * 95 for n in range(2000)]))
            r = http.get("/api/v1/deployments/digits/logs", params={"device": "edge-1", "tail": 10_000})
            assert r.status_code == 200, r.text
            lines = r.json()["lines"]
            assert r.json()["truncated"] is True
            assert sum(len(line.encode()) + 1 for line in lines) <= 64 * 1024
            assert len(lines) == (64 * 1024) // 101 and lines[-1].startswith("01999")

            # 300 KB in one message: refused before parsing, and said so at once (no 10 s wait).
            answers.put(answer_with(["z" * 1000] * 300))
            start = time.monotonic()
            r = http.get("/api/v1/deployments/digits/logs", params={"device": "edge-1", "tail": 10})
            assert time.monotonic() - start < 5
            assert r.status_code == 502, r.text
            error = r.json()["error"]
            assert error["type"] == "FetchError"
            assert "262,144" in error["message"] and "EDGEPACK_HUB_LOG_PAYLOAD_MAX_BYTES" in error["message"]
    finally:
        probe.close()


# --- finding 7: at most 64 tags, whichever way they come ------------------------------------------


def _tags(n: int) -> dict[str, str]:
    return {f"k{i}": "v" for i in range(n)}


def _refused(r: Any, *phrases: str) -> None:
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "ConfigError", error
    for phrase in phrases:
        assert phrase in error["message"], error


def test_65_tags_are_refused_by_single_and_bulk_enrolment_and_by_a_change_of_tags(hub: HubFactory) -> None:
    h = hub()
    with h.client() as http:
        _refused(
            http.post("/api/v1/devices", json={"id": "many", "tags": _tags(65)}), "65 tags", "at most 64"
        )
        _refused(http.post("/api/v1/devices", json={"id": "lots", "tags": _tags(5000)}), "5,000 tags")
        _refused(
            http.post(
                "/api/v1/devices/bulk",
                json={"devices": [{"id": "b1", "tags": _tags(3)}, {"id": "b2", "tags": _tags(65)}]},
            ),
            "entry 2: 65 tags",
            "at most 64",
        )
        assert http.get("/api/v1/devices").json()["devices"] == []  # all or none

        assert http.post("/api/v1/devices", json={"id": "full", "tags": _tags(64)}).status_code == 201
        _refused(http.patch("/api/v1/devices/full", json={"set": {"one": "more"}}), "65 tags", "at most 64")
        _refused(http.patch("/api/v1/devices/full", json={"set": _tags(200), "replace": True}), "200 tags")
        assert http.get("/api/v1/devices/full").json()["tags"] == _tags(64)
        # Replacing one tag by another keeps the count: allowed.
        r = http.patch("/api/v1/devices/full", json={"set": {"new": "v"}, "remove": ["k0"]})
        assert r.status_code == 200, r.text

        selector = ",".join(f"k{i}=v" for i in range(65))
        _refused(http.get("/api/v1/devices", params={"selector": selector}), "65 items in the selector")


def test_65_tags_in_a_device_file_or_on_the_command_line_are_one_line_errors(
    hub: HubFactory, tmp_path: Path
) -> None:
    h = hub()
    home = tmp_path / "home"
    csv = tmp_path / "devices.csv"
    many = ";".join(f"k{i}=v" for i in range(200))
    csv.write_text(f"id,tags\nok-1,site=berlin\nbig-1,{many}\n")
    error = one_line_error(
        run(home, h, "device", "enroll", "--from-file", str(csv), "--out-dir", str(tmp_path / "c")), 2
    )
    assert "devices.csv row 3: 200 tags; a device carries at most 64 tags" in error
    assert not (tmp_path / "c").exists()

    args = [arg for i in range(65) for arg in ("--tag", f"k{i}=v")]
    error = one_line_error(run(home, h, "device", "enroll", "edge-1", *args), 2)
    assert "65 tags; a device carries at most 64 tags" in error
    with h.client() as http:
        assert http.get("/api/v1/devices").json()["devices"] == []
