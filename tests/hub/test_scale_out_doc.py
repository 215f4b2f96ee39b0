"""docs/scale-out.md says only what is true: its commands and settings exist as written.

The layout itself runs in test_replicas.py (the same commands, with real processes); this
keeps the page from drifting from the CLI and the settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from cloud_hub.settings import HubSettings

pytestmark = pytest.mark.sql_independent

DOC = Path(__file__).resolve().parents[2] / "docs" / "scale-out.md"


def commands() -> list[list[str]]:
    text = DOC.read_text()
    blocks = re.findall(r"```\n(.*?)```", text, flags=re.S)  # fences inside lists too
    lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    return [line.split() for line in map(str.strip, lines) if line.startswith("edgepack ")]


def test_every_edgepack_command_and_flag_in_the_page_exists() -> None:
    found = commands()
    assert len(found) >= 6
    for words in found:
        path = [w for w in words[1:3] if not w.startswith("-")]
        if path and path[0] != "hub":
            path = path[:1]
        help_text = subprocess.run(
            [sys.executable, "-m", "packager", *path, "--help"],
            capture_output=True, text=True, timeout=60, check=False,
            env={**os.environ, "NO_COLOR": "1", "COLUMNS": "200"},
        )  # fmt: skip
        assert help_text.returncode == 0, (words, help_text.stderr)
        for flag in (w.split("=")[0] for w in words if w.startswith("--")):
            assert flag in help_text.stdout, f"{' '.join(path)} has no {flag}"


def test_every_setting_the_page_names_exists() -> None:
    named = set(re.findall(r"EDGEPACK_HUB_([A-Z_]+)", DOC.read_text()))
    fields = {name.upper() for name in HubSettings.model_fields}
    assert named and named <= fields, named - fields
