"""Why a module failed to start, as its supervisor reports it: a one-line cause taken from the
exception's traceback (the frame in the module's own code, the exception's type and message)
and the traceback itself, once.

An instance the agent runs writes both to ``failure.json`` beside its state file when its
entry script cannot be loaded or its ``init()`` raises; the agent reads them from the run
folder, so the cause never has to be parsed back out of a log. Kept apart from the server so
that the agent reads them without importing a web stack.
"""

from __future__ import annotations

import json
import os
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

from manifests.bounds import MAX_TRACEBACK_CHARS, multiline, one_line
from manifests.durable import write_durable

#: beside the instance's state file (STATE_FILE) in its run folder
FAILURE_FILE = "failure.json"
#: a cause is one line of at most this many characters
MAX_CAUSE_CHARS = 300
#: the most a failure file may hold: its traceback with every character escaped by JSON
MAX_FAILURE_FILE_BYTES = 8 * MAX_TRACEBACK_CHARS


@dataclass(frozen=True)
class StartFailure:
    cause: str  # e.g. "score.py:18 RuntimeError: cannot open the feature store"
    traceback: str | None = None


def _location(exc: BaseException, code_dir: Path | None) -> str | None:
    """``file:line`` of the deepest frame in the module's own code (``code_dir``, the module's
    ``src/``), else of the deepest frame at all; for a syntax error, where the syntax is."""
    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_shown(Path(exc.filename), code_dir)}:{exc.lineno or '?'}"
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    ours = [f for f in frames if code_dir is not None and _inside(Path(f.filename), code_dir)]
    frame = (ours or frames)[-1]
    return f"{_shown(Path(frame.filename), code_dir)}:{frame.lineno}"


def _inside(path: Path, folder: Path) -> bool:
    try:
        return path.resolve().is_relative_to(folder.resolve())
    except OSError:
        return False


def _shown(path: Path, code_dir: Path | None) -> str:
    if code_dir is not None and _inside(path, code_dir):
        return str(path.resolve().relative_to(code_dir.resolve()))
    return path.name


def describe(exc: BaseException, code_dir: Path | None = None) -> StartFailure:
    """The cause and traceback of ``exc``, which ended a module's start."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    message = lines[0] if lines else ""
    if isinstance(exc, SyntaxError):
        message = exc.msg or message
    what = f"{type(exc).__name__}: {message}" if message else type(exc).__name__
    where = _location(exc, code_dir)
    cause = one_line(f"{where} {what}" if where else what, MAX_CAUSE_CHARS)
    text = "".join(traceback.format_exception(exc)).rstrip("\n")
    return StartFailure(cause, multiline(text, MAX_TRACEBACK_CHARS) or None)


_TRACEBACK_HEAD = "Traceback (most recent call last):"
_FRAME = re.compile(r'^\s+File "(?P<file>[^"]+)", line (?P<line>\d+)')


def from_output(lines: list[str], code_dir: Path | None = None) -> StartFailure | None:
    """The cause and traceback of the last traceback in an instance's output, for a scoring
    server from before ``failure.json`` (an older runtime image): the same cause as
    :func:`describe` gives when the output holds Python's usual traceback, else None."""
    starts = [i for i, line in enumerate(lines) if line.rstrip().endswith(_TRACEBACK_HEAD)]
    if not starts:
        return None
    body: list[str] = []
    what = None
    for line in lines[starts[-1] + 1 :]:
        if line[:1].isspace():
            body.append(line)
            continue
        what = line.strip()
        break
    if not what:
        return None
    frames = [(Path(m["file"]), m["line"]) for m in map(_FRAME.match, body) if m]
    ours = [f for f in frames if code_dir is not None and _inside(f[0], code_dir)]
    where = (ours or frames)[-1] if frames else None
    cause = f"{_shown(where[0], code_dir)}:{where[1]} {what}" if where else what
    text = "\n".join([lines[starts[-1]].strip(), *body, what])
    return StartFailure(one_line(cause, MAX_CAUSE_CHARS), multiline(text, MAX_TRACEBACK_CHARS))


def write_failure(path: Path, failure: StartFailure) -> None:
    write_durable(path, json.dumps({"cause": failure.cause, "traceback": failure.traceback}).encode())


def read_failure(run_dir: Path) -> StartFailure | None:
    """What an instance wrote of its failure to start, or None (it wrote nothing, or the file
    is not what it writes: the module runs as another user, and is not trusted)."""
    try:
        # Not followed if a link (the instance could point it at a file only the agent may
        # read), and read only up to what the scoring server writes at most.
        fd = os.open(run_dir / FAILURE_FILE, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(MAX_FAILURE_FILE_BYTES + 1)
        if len(raw) > MAX_FAILURE_FILE_BYTES:
            return None
        data = json.loads(raw)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or not isinstance(data.get("cause"), str):
        return None
    trace = data.get("traceback")
    return StartFailure(
        one_line(data["cause"], MAX_CAUSE_CHARS) or "init() failed",
        multiline(trace, MAX_TRACEBACK_CHARS) or None if isinstance(trace, str) else None,
    )
