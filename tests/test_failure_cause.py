"""Why a module failed, readable: a one-line cause from the traceback itself (the frame in the
module's own code, the exception's type and message), the traceback once, the output's tail,
each bounded and free of what a terminal would act on (issue 17, item 5)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edge_agent.scoring.failure import (
    FAILURE_FILE,
    MAX_CAUSE_CHARS,
    MAX_FAILURE_FILE_BYTES,
    describe,
    from_output,
    read_failure,
)
from edge_agent.state.failed_logs import FailedLogs
from manifests.bounds import MAX_LOG_TAIL_CHARS, MAX_TRACEBACK_CHARS, multiline, one_line
from manifests.reported import FailureDetail
from tests.conftest import free_port
from tests.test_scoring_instances import launch, versioned_module

FEATURE_STORE = '''\
import json


def open_store(path):
    print("opening the feature store at", path, flush=True)
    raise RuntimeError("cannot open the feature store")


def init():
    open_store("/nowhere")


def parse():
    return json.loads("{not json")


def run(raw_data):
    return raw_data
'''


def raised(src: Path, script: str, call: str) -> BaseException:
    """The exception ``call`` raises in ``script``, loaded from ``src`` as the scoring server
    loads an entry script (so its frames name the file)."""
    src.mkdir(parents=True, exist_ok=True)
    path = src / "score.py"
    path.write_text(script)
    namespace: dict[str, object] = {}
    try:
        exec(compile(path.read_text(), str(path), "exec"), namespace)
        exec(compile(call, "<edgepack>", "exec"), namespace)
    except Exception as exc:
        return exc
    raise AssertionError(f"{call} did not raise")


def test_the_cause_is_the_deepest_frame_in_the_modules_code_with_type_and_message(tmp_path: Path) -> None:
    exc = raised(tmp_path / "src", FEATURE_STORE, "init()")
    failure = describe(exc, tmp_path / "src")
    assert failure.cause == "score.py:6 RuntimeError: cannot open the feature store"
    assert failure.traceback is not None
    assert failure.traceback.count("Traceback (most recent call last)") == 1
    assert failure.traceback.endswith("RuntimeError: cannot open the feature store")


def test_an_error_raised_inside_a_library_names_the_modules_line_that_called_it(tmp_path: Path) -> None:
    exc = raised(tmp_path / "src", FEATURE_STORE, "parse()")
    cause = describe(exc, tmp_path / "src").cause
    assert cause.startswith("score.py:14 JSONDecodeError: Expecting property name"), cause


def test_a_file_in_a_subfolder_of_the_code_is_named_by_its_path_there(tmp_path: Path) -> None:
    exc = raised(tmp_path / "src" / "lib", FEATURE_STORE, "init()")
    assert describe(exc, tmp_path / "src").cause.startswith("lib/score.py:6 RuntimeError")


def test_a_syntax_error_names_where_the_syntax_is(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "score.py").write_text("def init(:\n    pass\n")
    try:
        compile((src / "score.py").read_text(), str(src / "score.py"), "exec")
    except SyntaxError as exc:
        cause = describe(exc, src).cause
    assert cause.startswith("score.py:1 SyntaxError: "), cause


@pytest.mark.parametrize(
    ("error", "cause"),
    [
        pytest.param(RuntimeError(), "RuntimeError", id="no message: the type alone"),
        pytest.param(ValueError("first line\nsecond line"), "ValueError: first line", id="first line only"),
        pytest.param(KeyError("weights"), "KeyError: 'weights'", id="as str() shows it"),
        pytest.param(OSError("bell\x07 \x1b[31mred\x1b[0m"), "OSError: bell\\x07 red", id="no controls"),
    ],
)  # fmt: skip
def test_a_cause_is_one_line_without_controls(error: BaseException, cause: str) -> None:
    assert describe(error).cause == cause


def test_a_cause_is_bounded(tmp_path: Path) -> None:
    cause = describe(RuntimeError("x" * 10_000)).cause
    assert len(cause) == MAX_CAUSE_CHARS and cause.endswith("…")
    assert one_line("a\n\tb\u2028c") == "a b c"


def test_a_traceback_and_a_log_tail_keep_their_end_within_their_limits() -> None:
    lines = [f"line {i} \x1b[33mwarn\x1b[0m" for i in range(5000)] + ["RuntimeError: last"]
    detail = FailureDetail.of(traceback="\n".join(lines), log_lines=lines)
    assert detail.traceback is not None and detail.log_tail is not None
    assert len(detail.traceback) <= MAX_TRACEBACK_CHARS and len(detail.log_tail) <= MAX_LOG_TAIL_CHARS
    assert detail.traceback.endswith("RuntimeError: last") and detail.log_tail.endswith("RuntimeError: last")
    assert detail.log_tail.startswith("line ") and "\x1b" not in detail.log_tail  # whole lines, no escapes
    assert multiline("nul\x00 here", 100) == "nul\\x00 here"
    assert FailureDetail.of(traceback=None, log_lines=["", ""]) == FailureDetail()


def test_what_an_instance_wrote_of_its_failure_is_read_with_the_same_bounds(tmp_path: Path) -> None:
    assert read_failure(tmp_path) is None
    (tmp_path / FAILURE_FILE).write_text(json.dumps({"cause": "a\nb\x1b[2J" + "c" * 5000, "traceback": 7}))
    written = read_failure(tmp_path)
    assert written is not None and written.traceback is None
    assert written.cause.startswith("a b") and len(written.cause) == MAX_CAUSE_CHARS
    (tmp_path / FAILURE_FILE).write_text("[1, 2]")
    assert read_failure(tmp_path) is None
    huge = {"cause": "x", "traceback": "t" * MAX_FAILURE_FILE_BYTES}
    (tmp_path / FAILURE_FILE).write_text(json.dumps(huge))
    assert read_failure(tmp_path) is None, "larger than a scoring server writes"
    # The instance owns its run folder: a link there is not followed to what it points at.
    secret = tmp_path / "agent-only.json"
    secret.write_text(json.dumps({"cause": "the agent's secret"}))
    (tmp_path / FAILURE_FILE).unlink()
    (tmp_path / FAILURE_FILE).symlink_to(secret)
    assert read_failure(tmp_path) is None


def test_a_kept_failed_log_holds_its_newest_lines_within_its_bound(tmp_path: Path) -> None:
    logs = FailedLogs(tmp_path / "failed-logs", max_bytes=16 * 1024)
    logs.keep("demo", "2", [f"line {i:05d}" for i in range(10_000)])
    kept = logs.read("demo")
    assert kept is not None and kept.version == "2" and kept.truncated
    assert kept.lines[-1] == "line 09999" and sum(len(x) + 1 for x in kept.lines) <= 16 * 1024
    assert (tmp_path / "failed-logs" / "demo.json").stat().st_mode & 0o777 == 0o600
    logs.keep("demo", "3", ["only"])
    assert logs.read("demo") == type(kept)("3", ["only"], False)
    logs.remove("demo")
    assert logs.read("demo") is None
    (tmp_path / "failed-logs" / "demo.json").write_text('{"version": "../x", "lines": []}')
    assert logs.read("demo") is None, "not what keep() writes"


@pytest.mark.parametrize("workers", [1, 2])
def test_an_instance_whose_init_raises_writes_its_cause_beside_its_state_file(
    tmp_path: Path, workers: int
) -> None:
    module = versioned_module(tmp_path / "broken", 1, init_raises=True)
    instance = launch(module, free_port(), workers=workers)
    assert instance.proc.wait(timeout=60) == 5
    written = read_failure(instance.state_file.parent)
    assert written is not None, instance.log_text()
    assert written.cause == "score.py:4 RuntimeError: model could not be loaded"
    assert written.traceback is not None and written.traceback.count("Traceback") == 1
    assert (instance.state_file.parent / FAILURE_FILE).exists() and not instance.state_file.exists()


OLD_SERVER_OUTPUT = """\
connecting to the feature store at /var/features
2026-12-07 15:19:21,048 ERROR edge_agent.scoring [29587] module /m failed to start:
Traceback (most recent call last):
  File "/opt/edgepack/edge_agent/scoring/app.py", line 365, in preload
    entry.init()
  File "/m/src/score.py", line 6, in init
    raise RuntimeError("cannot open the feature store")
RuntimeError: cannot open the feature store

2026-12-07 15:19:21,049 ERROR edge_agent.scoring [29587] worker 0: module in /m failed to start: \
RuntimeError: cannot open the feature store (the traceback is in the log above); fix the entry script
edgepack scoring: worker 0 failed to start the module in /m (exit code 5); the traceback is in the log above
""".splitlines()


def test_a_scoring_server_from_before_failure_files_gets_the_same_cause_from_its_output() -> None:
    """An older runtime image writes no failure.json: its usual traceback gives the cause."""
    written = from_output(OLD_SERVER_OUTPUT, Path("/m/src"))
    assert written is not None
    assert written.cause == "score.py:6 RuntimeError: cannot open the feature store"
    assert written.traceback is not None
    assert written.traceback.startswith("Traceback (most recent call last):")
    assert written.traceback.endswith("RuntimeError: cannot open the feature store")
    assert from_output(["no traceback here"]) is None
    assert from_output(["Traceback (most recent call last):", "  File \"x.py\", line 1"]) is None
