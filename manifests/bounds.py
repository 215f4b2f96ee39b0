"""Bounded field types for every number and string that crosses a trust boundary.

A contract that takes "any float" or "any string" lets one bad value travel far: ``Infinity``
in a setting could not be signed (500), ``"port": true`` became port 1, a 15 MB description
or a NUL in an environment name reached the devices. These types refuse such values where
the document is parsed, and the JSON Schemas generated from the models state the same limits
(``maximum``, ``maxLength``, ``pattern``) for anyone writing these documents by hand.

- numbers are finite and within a range; integers are strict (no booleans, no strings, no
  floats) and fit in 63 bits, so every database and JSON reader holds them exactly;
- names follow a pattern; free text has a length limit and no control characters.
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AfterValidator, Field

#: The largest integer every store we use (SQLite, PostgreSQL BIGINT, JSON readers that use
#: int64) holds exactly.
MAX_INT63 = (1 << 63) - 1
#: POSIX portable environment variable names.
ENV_NAME_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,254}$"
MAX_ENV_VARS = 256
MAX_ENV_VALUE = 32 * 1024
MAX_TAGS = 64
MAX_TAG_VALUE = 256
MAX_DESCRIPTION = 4096
MAX_REASON = 2000
#: A failed module's last traceback and the tail of its output, as reported (the end is kept).
MAX_TRACEBACK_CHARS = 16 * 1024
MAX_LOG_TAIL_CHARS = 8 * 1024

#: What a terminal may act on instead of printing: C0 controls but tab, DEL, C1 controls (U+0085,
#: U+009B CSI, ...: xterm and others obey them in UTF-8 too), the Unicode line and paragraph
#: separators, and the bidirectional formatting characters ("Trojan Source", CVE-2021-42574),
#: which make a line read differently from what it holds.
TERMINAL_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def escape_controls(text: str) -> str:
    """``text`` with every character of :data:`TERMINAL_CONTROLS` written as a visible escape
    (``\\x1b``, ``\\u202e``): safe to print on a terminal, and what was there stays readable.
    Text without such characters comes back unchanged, so escaping twice is escaping once."""
    return TERMINAL_CONTROLS.sub(_escape, text)


def one_line(text: str, limit: int = MAX_REASON) -> str:
    """``text`` as one line of at most ``limit`` characters: line breaks and tabs become
    spaces, terminal escape sequences are dropped, other controls escaped visibly; a longer
    text is cut with an ellipsis."""
    text = _ANSI.sub("", text)
    text = " ".join(text.split())
    text = escape_controls(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def multiline(text: str, limit: int) -> str:
    """``text`` as lines that may be shown: terminal escape sequences dropped, other controls
    of each line escaped visibly; when longer than ``limit`` its end is kept, from a line
    start where one is near."""
    lines = [escape_controls(_ANSI.sub("", line)).rstrip() for line in text.splitlines()]
    text = "\n".join(lines)
    if len(text) <= limit:
        return text
    text = text[len(text) - limit :]
    start = text.find("\n")
    return text[start + 1 :] if 0 <= start < 200 else text


#: Terminal escape sequences (colours: onnxruntime colours its warnings), which carry nothing a
#: reader of a report needs.
_ANSI = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")


def _no_control(value: str) -> str:
    # Tab and newline are ordinary text; NUL and the other C0 controls are not (a NUL cuts a
    # C string short on the device, an escape sequence rewrites a terminal).
    if any((ord(c) < 0x20 and c not in "\t\n\r") or c == "\x7f" for c in value):
        raise ValueError("must not contain control characters (NUL, escape, ...)")
    return value


def _no_control_line(value: str) -> str:
    if any(ord(c) < 0x20 or c == "\x7f" for c in value):
        raise ValueError("must not contain control characters or line breaks")
    return value


def finite(
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float,
    default: Any = ...,
    alias: str | None = None,
) -> Any:
    """A ``Field`` for a finite float in a range (NaN and infinities refused)."""
    return Field(default, allow_inf_nan=False, ge=ge, gt=gt, le=le, alias=alias)


Count = Annotated[int, Field(strict=True, ge=0, le=MAX_INT63)]
Port = Annotated[int, Field(strict=True, ge=1, le=65535)]
EnvName = Annotated[str, Field(pattern=ENV_NAME_PATTERN)]
EnvValue = Annotated[str, Field(max_length=MAX_ENV_VALUE), AfterValidator(_no_control)]
EnvMap = Annotated[dict[EnvName, EnvValue], Field(max_length=MAX_ENV_VARS)]
Text = Annotated[str, Field(max_length=MAX_DESCRIPTION), AfterValidator(_no_control)]
Reason = Annotated[str, Field(max_length=MAX_REASON), AfterValidator(_no_control)]
#: A module's traceback and the tail of its output (see manifests.reported.FailureDetail).
TracebackText = Annotated[str, Field(max_length=MAX_TRACEBACK_CHARS), AfterValidator(_no_control)]
LogTailText = Annotated[str, Field(max_length=MAX_LOG_TAIL_CHARS), AfterValidator(_no_control)]
TagKey = Annotated[str, Field(min_length=1, max_length=64), AfterValidator(_no_control_line)]
TagValue = Annotated[str, Field(max_length=MAX_TAG_VALUE), AfterValidator(_no_control_line)]
TagMap = Annotated[dict[TagKey, TagValue], Field(max_length=MAX_TAGS)]
