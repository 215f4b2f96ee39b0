"""The pure parts of issue 16's findings 4, 5 and 7: escaping what devices write, the hub's cut
of a log answer, and the one tag bound. (The same paths against a real hub and broker:
``tests/hub/test_device_strings.py``.)"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console
from rich.table import Table

from manifests.bounds import escape_controls
from manifests.desired import MAX_DEVICE_TAGS, check_tag_count
from manifests.errors import ConfigError
from manifests.logs import LogLimits, LogResponse, bound_response
from packager.display import safe_text
from packager.sdk.device_file import parse_device_file
from packager.sdk.errors import BadArgument
from tests.factory import Forge

REQUEST = "0123456789abcdef"


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        ("\x1b[2J", "\\x1b[2J"),  # C0: escape
        ("\x00\x07\x08\x0b\x0c", "\\x00\\x07\\x08\\x0b\\x0c"),
        ("a\nb\rc", "a\\x0ab\\x0dc"),  # line breaks are not line breaks in one line
        ("\x7f", "\\x7f"),  # DEL
        ("\x9b2J\x9d0;t\x9c\x85", "\\x9b2J\\x9d0;t\\x9c\\x85"),  # C1, U+009B is a CSI on its own
        ("\u202eabc\u202c \u2066x\u2069 \u200f\u061c", "\\u202eabc\\u202c \\u2066x\\u2069 \\u200f\\u061c"),
        ("\u2028\u2029", "\\u2028\\u2029"),
        ("tab\tstays", "tab\tstays"),
        ("café 中文 🙂 [bold] \\x1b", "café 中文 🙂 [bold] \\x1b"),  # text is left alone
    ],
)
def test_escape_controls_makes_every_terminal_control_visible_text(raw: str, shown: str) -> None:
    assert escape_controls(raw) == shown
    assert escape_controls(shown) == shown  # escaping twice is escaping once


def test_a_log_response_escapes_its_lines_and_error_when_parsed_and_when_built() -> None:
    wire = json.dumps(
        {
            "request_id": REQUEST,
            "device_id": "edge-1",
            "service": "digits",
            "lines": ["\x1b]52;c;cm0K\x07", "ok"],
            "error": "\x9b2J",
        }
    )
    parsed = LogResponse.model_validate_json(wire)
    assert parsed.lines == ["\\x1b]52;c;cm0K\\x07", "ok"] and parsed.error == "\\x9b2J"
    built = LogResponse(request_id=REQUEST, device_id="edge-1", service="digits", lines=["\x1b[8m"])
    assert built.lines == ["\\x1b[8m"]


def _answer(lines: list[str], truncated: bool = False) -> LogResponse:
    return LogResponse(
        request_id=REQUEST, device_id="edge-1", service="digits", lines=lines, truncated=truncated
    )


def test_the_hub_keeps_only_the_tail_it_asked_for() -> None:
    cut = bound_response(_answer([str(n) for n in range(10_000)]), tail=3, limits=LogLimits())
    assert cut.lines == ["9997", "9998", "9999"] and cut.truncated
    whole = bound_response(_answer(["a", "b"]), tail=3, limits=LogLimits())
    assert whole.lines == ["a", "b"] and not whole.truncated
    # The device's own flag survives.
    assert bound_response(_answer(["a"], truncated=True), tail=3, limits=LogLimits()).truncated
    with pytest.raises(ValueError, match="tail"):
        bound_response(_answer(["a"]), tail=0, limits=LogLimits())


def test_the_hub_cuts_long_lines_with_a_marker_and_bounds_the_whole_answer() -> None:
    limits = LogLimits(line_chars=100, answer_bytes=2048)
    [line] = bound_response(_answer(["x" * 100_000]), tail=1, limits=limits).lines
    assert line == "x" * 100 + " [... 99,900 more characters cut]"
    # Multi-byte text counts as the bytes it takes: 3 per character here.
    cut = bound_response(_answer(["中" * 99 + str(n % 10) for n in range(100)]), tail=100, limits=limits)
    assert sum(len(x.encode()) + 1 for x in cut.lines) <= 2048 and cut.truncated
    assert len(cut.lines) == 2048 // 299 and cut.lines[-1].endswith("9")  # the newest kept


def test_log_limits_refuse_values_that_would_cut_everything() -> None:
    with pytest.raises(ValueError, match="at least"):
        LogLimits(line_chars=0)
    with pytest.raises(ValueError, match="at least"):
        LogLimits(answer_bytes=10)


def test_safe_text_prints_markup_and_escapes_as_they_are() -> None:
    out = io.StringIO()
    console = Console(file=out, force_terminal=True, color_system=None, width=200)
    hostile = "[bold red]x[/] [link=http://evil]y[/link] :skull: \x1b]0;title\x07 \x9b2J"
    table = Table("reason")
    table.add_row(safe_text(hostile))
    console.print(safe_text(hostile), soft_wrap=True)
    console.print(table)
    shown = "[bold red]x[/] [link=http://evil]y[/link] :skull: \\x1b]0;title\\x07 \\x9b2J"
    assert out.getvalue().count(shown) == 2, out.getvalue()
    assert "\x1b" not in out.getvalue() and "\x9b" not in out.getvalue()


def test_one_tag_bound_for_every_path() -> None:
    check_tag_count(MAX_DEVICE_TAGS)
    with pytest.raises(ConfigError, match=r"^65 tags; a device carries at most 64 tags$"):
        check_tag_count(65)
    rows = "id,tags\nedge-1," + ";".join(f"k{i}=v" for i in range(65)) + "\n"
    with pytest.raises(BadArgument, match=r"devices\.csv row 2: 65 tags; a device carries at most 64"):
        parse_device_file(rows)
    rows = "id,tags\nedge-1," + ";".join(f"k{i}=v" for i in range(64)) + "\n"
    assert len(parse_device_file(rows)[0].tags) == 64


def test_inspecting_a_strangers_bundle_prints_its_text_without_obeying_it(tmp_path: Path) -> None:
    # Anyone's bundle can be inspected before it is trusted: its description and requirements
    # are text (C1 controls, bidi overrides and markup pass the manifest's bounds).
    description = "\x9b2J\x9d0;pwned\x9c \u202eevil\u202c [/] [link=http://evil]x[/link] :skull:"
    bundle = tmp_path / "stranger.edgepack"
    bundle.write_bytes(Forge().bundle(description=description))
    result = subprocess.run(
        [sys.executable, "-m", "packager", "inspect", str(bundle)],
        capture_output=True,
        env={**os.environ, "COLUMNS": "200", "NO_COLOR": "1"},
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode()
    assert "\\x9b2J\\x9d0;pwned\\x9c \\u202eevil\\u202c [/] [link=http://evil]x[/link] :skull:" in text
    assert not any(0x80 <= ord(c) <= 0x9F or 0x202A <= ord(c) <= 0x202E for c in text)
