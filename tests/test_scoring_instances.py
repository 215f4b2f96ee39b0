"""The scoring server as the agent runs it: ready before it listens, one private probe port per
instance, two versions sharing the public port, and a drain that loses no request."""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port
from tests.load import Load

START_TIMEOUT_S = 30.0


def versioned_module(root: Path, answer: int, *, init_s: float = 0.0, init_raises: bool = False) -> Path:
    """A module whose run() answers ``{"v": answer}`` and whose init() takes ``init_s``."""
    (root / "src").mkdir(parents=True)
    (root / "model").mkdir()
    body = 'raise RuntimeError("model could not be loaded")' if init_raises else f"time.sleep({init_s})"
    (root / "src" / "score.py").write_text(
        f"import time\n\ndef init():\n    {body}\n\ndef run(raw_data):\n    return {{'v': {answer}}}\n"
    )
    (root / "model" / "m.txt").write_text("model")
    signed = {"name": root.name, "version": str(answer), "entry_script": "src/score.py"}
    (root / "module.json").write_text(json.dumps({"signed": signed, "signatures": []}))
    return root


@dataclass
class Instance:
    proc: subprocess.Popen[bytes]
    state_file: Path
    log: Path

    def state(self) -> dict[str, int]:
        data: dict[str, int] = json.loads(self.state_file.read_text())
        return data

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def launch(
    module_dir: Path, port: int, *, workers: int = 1, drain_s: float = 5.0, extra: tuple[str, ...] = ()
) -> Instance:
    state = module_dir.parent / f"{module_dir.name}.state.json"
    log = module_dir.parent / f"{module_dir.name}.log"
    argv = [
        sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(module_dir),
        "--port", str(port), "--workers", str(workers), "--preload", "--reuse-port",
        "--probe-port", "0", "--state-file", str(state), "--drain-s", str(drain_s), *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=log.open("wb"))
    return Instance(proc, state, log)


def wait_listening(instance: Instance) -> dict[str, int]:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if instance.state_file.exists():
            return instance.state()
        if instance.proc.poll() is not None:
            raise AssertionError(f"instance exited with {instance.proc.returncode}:\n{instance.log_text()}")
        time.sleep(0.01)
    instance.proc.kill()
    raise AssertionError(f"instance did not listen within {START_TIMEOUT_S}s:\n{instance.log_text()}")


def stop(instance: Instance) -> int:
    if instance.proc.poll() is None:
        instance.proc.send_signal(signal.SIGTERM)
    try:
        return instance.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        instance.proc.kill()
        raise AssertionError(f"instance ignored SIGTERM:\n{instance.log_text()}") from None


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except ConnectionRefusedError:
        return True


def versioned_load(port: int, *, fresh_connections: bool) -> Load:
    """Four clients; each answer says which version gave it."""
    return Load(port, b"{}", lambda body: int(body["v"]), clients=4, fresh_connections=fresh_connections)


def test_a_preloaded_instance_does_not_listen_before_init_succeeded(tmp_path: Path) -> None:
    port = free_port()
    instance = launch(versioned_module(tmp_path / "slow", 1, init_s=1.0), port)
    try:
        time.sleep(0.5)
        assert not instance.state_file.exists()
        assert refused(port), "a version still in init() must not take requests"
        state = wait_listening(instance)
        assert state["port"] == port and state["pid"] == instance.proc.pid
        assert httpx.post(f"http://127.0.0.1:{port}/score", content=b"{}").json() == {"v": 1}
        # The private probe port answers for this instance alone.
        probe = f"http://127.0.0.1:{state['probe_port']}"
        assert state["probe_port"] != port
        assert httpx.get(probe + "/healthz").status_code == 200
        assert httpx.post(probe + "/score", content=b"{}").json() == {"v": 1}
    finally:
        assert stop(instance) == 0


@pytest.mark.parametrize(
    ("workers", "fresh_connections"),
    [(1, False), (1, True), (2, False)],
    ids=["keepalive", "fresh", "2-workers"],
)
def test_two_versions_hand_over_the_port_under_load_without_a_failed_request(
    tmp_path: Path, workers: int, fresh_connections: bool
) -> None:
    port = free_port()
    old = launch(versioned_module(tmp_path / "v1", 1), port, workers=workers, drain_s=30)
    wait_listening(old)
    new = None
    try:
        with versioned_load(port, fresh_connections=fresh_connections) as load:
            time.sleep(0.3)
            new = launch(versioned_module(tmp_path / "v2", 2, init_s=0.3), port, workers=workers)
            wait_listening(new)
            time.sleep(0.2)
            started = time.monotonic()
            assert stop(old) == 0, old.log_text()
            drained_s = time.monotonic() - started
            time.sleep(0.3)
        assert load.failures == [], load.failures[:3]
        assert load.answers[1] > 0 and load.answers[2] > 0, load.answers
        assert set(load.last) == {2}, "after the switch only the new version answers"
        assert drained_s < 15, "the old version leaves once its connections are done, not at the deadline"
    finally:
        stop(old)
        if new is not None:
            assert stop(new) == 0, new.log_text()


def test_a_port_held_by_another_program_ends_the_instance_at_once_with_exit_6(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))  # no SO_REUSEPORT: not shareable
        holder.listen()
        port = holder.getsockname()[1]
        instance = launch(versioned_module(tmp_path / "blocked", 1, init_s=30), port)
        assert instance.proc.wait(timeout=10) == 6
    assert "cannot listen" in instance.log_text()


def test_a_failing_init_ends_a_preloaded_instance_with_exit_5_and_never_listens(tmp_path: Path) -> None:
    port = free_port()
    instance = launch(versioned_module(tmp_path / "broken", 1, init_raises=True), port)
    assert instance.proc.wait(timeout=30) == 5
    assert "model could not be loaded" in instance.log_text()
    assert "Traceback" in instance.log_text()
    assert not instance.state_file.exists()
    assert refused(port)


@pytest.mark.parametrize("workers", [1, 2])
def test_a_dead_worker_ends_a_supervised_instance_with_its_exit_code(tmp_path: Path, workers: int) -> None:
    """With --exit-on-crash (as the agent runs instances) a dead worker is not replaced in
    place: the instance ends, so the agent's restart policy and crash-loop count apply."""
    module = versioned_module(tmp_path / "crashy", 1)
    (module / "src" / "score.py").write_text(
        "import os\n\ndef init():\n    pass\n\ndef run(raw_data):\n    os._exit(3)\n"
    )
    port = free_port()
    extra = ("--exit-on-crash", "--run-timeout-s", "30")  # a run timeout: workers are supervised
    instance = launch(module, port, workers=workers, extra=extra)
    wait_listening(instance)
    with contextlib.suppress(httpx.HTTPError):
        httpx.post(f"http://127.0.0.1:{port}/score", content=b"{}", timeout=5)
    assert instance.proc.wait(timeout=30) == 3
    assert "exited with code 3" in instance.log_text()
