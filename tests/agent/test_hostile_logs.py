"""Issue 16, finding 4, with a real agent: a module that writes escape sequences into its log
(the agent answers a log request with them) does not write them into the operator's terminal.
The same with a bare MQTT client as the device: ``tests/hub/test_device_strings.py``."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.agent.conftest import Fleet, free_port, score
from tests.agent.modules import files
from tests.factory import SCORE_PY
from tests.hub.test_fleet_cli import env_for

NOISY = SCORE_PY + b"""

_plain_run = run


def run(raw_data):
    print("\\x1b[2J\\x1b]0;pwned\\x07\\x1b]52;c;cm0K\\x07 \\u009b2J \\u202eevil [bold]x[/]", flush=True)
    return _plain_run(raw_data)
"""


def test_a_modules_escape_sequences_reach_the_operator_as_text(fleet: Fleet, tmp_path: Path) -> None:
    fleet.device("edge-1").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1", files=files(NOISY)), port=port, devices=["edge-1"])
    fleet.wait_rollup("demo", "Healthy")
    score(port, [1])
    result = subprocess.run(
        [sys.executable, "-m", "packager", "service", "logs", "demo", "--device", "edge-1", "--tail", "5"],
        env=env_for(tmp_path / "home", fleet.hub),
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "\\x1b[2J\\x1b]0;pwned\\x07\\x1b]52;c;cm0K\\x07 \\x9b2J \\u202eevil [bold]x[/]" in text, text
    assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", text), text
