"""A device whose token the hub refuses: an error that says what to do, asked again only after
an exponential backoff with full jitter (not a retry note every few seconds for ever)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest

from edge_agent.reconcile.step import TOKEN_REFUSED_ERROR
from edge_agent.uplink.http import HubHttp, TokenRefused
from manifests.device import DeviceCredentials
from tests.agent.conftest import Fleet, wait_for

REFUSED = "answered 401 for /api/v1/device/desired"


def wrong_token(token: str) -> str:
    return token[:-1] + ("0" if token[-1] != "0" else "1")


def test_the_backoff_after_a_refusal_grows_and_a_request_inside_it_is_not_sent(
    fleet: Fleet, caplog: pytest.LogCaptureFixture
) -> None:
    agent = fleet.device("edge-1")
    creds = DeviceCredentials.model_validate(
        {**agent.credentials, "token": wrong_token(agent.credentials["token"])}
    )
    now = [1000.0]
    http = HubHttp(
        creds,
        credentials_path=Path("/etc/edgepack/edge-1.json"),
        refused_base_s=10,
        refused_cap_s=25,
        clock=lambda: now[0],
        rand=lambda: 0.5,
    )
    try:
        with caplog.at_level(logging.INFO, logger="edge_agent.uplink.http"):
            with pytest.raises(TokenRefused, match=REFUSED):
                http.desired(None)
            (error,) = [r for r in caplog.records if r.levelno == logging.ERROR]
            said = error.getMessage()
            assert "edgepack device enroll edge-1" in said and "'/etc/edgepack/edge-1.json'" in said
            assert "asking again in 5s" in said  # half (rand) of the base

            now[0] += 4.9  # inside the backoff: refused without a request
            with pytest.raises(TokenRefused, match="not asking again for 0s") as held:
                http.desired(None)
            assert REFUSED not in str(held.value)
            assert len([r for r in caplog.records if r.levelno == logging.ERROR]) == 1

            now[0] += 0.2  # past it: asked again, and the next wait doubles
            with pytest.raises(TokenRefused, match=REFUSED):
                http.desired(None)
            assert "asking again in 10s" in caplog.records[-1].getMessage()
            now[0] += 10.1
            with pytest.raises(TokenRefused, match=REFUSED):
                http.desired(None)
            assert "asking again in 12s" in caplog.records[-1].getMessage()  # capped at 25, half of it

        # The right token again (the device re-enrolled): accepted, and the refusals forgotten.
        http._headers["Authorization"] = f"Bearer {agent.credentials['token']}"
        now[0] += 13
        with caplog.at_level(logging.INFO, logger="edge_agent.uplink.http"):
            http.desired(None)
        assert "accepts device edge-1's token again" in caplog.records[-1].getMessage()
    finally:
        http.close()


def test_an_agent_with_a_wrong_token_logs_an_error_that_says_what_to_do_and_backs_off(fleet: Fleet) -> None:
    # debug: each poll inside the backoff is a debug line (the error says it once)
    agent = fleet.device("edge-1", log_level="debug")
    creds_path = agent.config.credentials
    creds = json.loads(creds_path.read_text())
    creds["token"] = wrong_token(creds["token"])
    creds_path.write_text(json.dumps(creds))
    agent.start()

    wait_for(
        lambda: REFUSED in agent.log() or None, what="the hub's refusal in the agent's log", log=agent.log
    )
    time.sleep(8)
    log = agent.log()
    errors = [line for line in log.splitlines() if " ERROR " in line and REFUSED in line]
    assert errors, log
    assert "edgepack device enroll edge-1" in errors[0] and f"'{creds_path}'" in errors[0], errors[0]
    # One loop line per request the hub got. Without the backoff the loop asks after at most
    # 1, 2 and 4 s (its own jitter): four requests within 8 s. With it the second waits up to
    # 60 s, the third up to 120 s.
    asked = [line for line in log.splitlines() if "desired state over HTTP:" in line and REFUSED in line]
    assert 1 <= len(asked) <= 3, log


def test_a_refused_token_reaches_the_hub_once_as_the_devices_last_error_and_each_poll_is_a_debug_line(
    fleet: Fleet,
) -> None:
    agent = fleet.device("edge-1")
    creds_path = agent.config.credentials
    creds = json.loads(creds_path.read_text())
    creds["token"] = wrong_token(creds["token"])
    creds_path.write_text(json.dumps(creds))
    agent.start()

    # The broker session is not the HTTP token's: the reported state still reaches the hub.
    reported = wait_for(
        lambda: fleet.hub_device("edge-1").get("last_error") == TOKEN_REFUSED_ERROR or None,
        what="the refused token as the device's last error on the hub",
        log=agent.log,
    )
    assert reported
    log = agent.log()
    polls = [line for line in log.splitlines() if "desired state over HTTP:" in line]
    assert not [line for line in polls if " INFO " in line], log
