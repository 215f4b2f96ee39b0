"""The agent under systemd: the unit ``edgepack agent install-service`` writes (checked by
``systemd-analyze verify``), the READY/WATCHDOG/STOPPING messages a real agent sends, and
``uninstall-service --purge`` taking a device's modules and state away."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from edge_agent.service_manager import Notifier
from tests.agent.conftest import Fleet, free_port, score
from tests.waiting import wait_for


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "packager", *args]
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)


@contextlib.contextmanager
def notify_socket(folder: Path) -> Iterator[socket.socket]:
    """What systemd listens on for a Type=notify service: a unix datagram socket."""
    path = folder / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    try:
        yield sock
    finally:
        sock.close()


def messages(sock: socket.socket, until: str) -> list[str]:
    seen = []
    while True:
        message = sock.recv(4096).decode()
        seen.append(message)
        if message.startswith(until):
            return seen


def test_the_notifier_pings_the_watchdog_at_half_its_interval_and_says_nothing_outside_systemd(
    tmp_path: Path,
) -> None:
    now = [100.0]
    with notify_socket(tmp_path) as sock:
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "4000000"}
        notifier = Notifier.from_env(env)
        notifier._clock = lambda: now[0]
        notifier.ready("serving 0 service(s)")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving 0 service(s)"
        sent = []
        for _ in range(9):  # 4.5 s of loop turns, 0.5 s apart: pings at 2 s and 4 s
            now[0] += 0.5
            sock.setblocking(False)
            notifier.alive()
            with contextlib.suppress(BlockingIOError):
                sent.append((now[0], sock.recv(4096)))
        assert sent == [(102.0, b"WATCHDOG=1"), (104.0, b"WATCHDOG=1")]
    another_process = Notifier.from_env({**env, "WATCHDOG_PID": "1"})
    assert another_process.active and another_process._every is None
    quiet = Notifier.from_env({})
    assert not quiet.active
    quiet.ready("x")
    quiet.alive()
    quiet.stopping()


def test_a_real_agent_says_ready_pings_the_watchdog_and_says_stopping(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.device("unit-1")
    with notify_socket(tmp_path) as sock:
        agent.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify.sock"), "WATCHDOG_USEC": "2000000"})
        first = sock.recv(4096).decode()
        assert first.startswith("READY=1\nSTATUS=serving 0 service(s)"), first
        pings = messages(sock, until="WATCHDOG=1") + messages(sock, until="WATCHDOG=1")
        assert pings.count("WATCHDOG=1") == 2, pings
        assert agent.stop() == 0
        assert "STOPPING=1" in messages(sock, until="STOPPING=1")


@pytest.fixture
def system_user() -> Iterator[str]:
    """A fresh system user's name (removed afterwards). Making one needs root, as installing a
    service does: CI runs the suite as root, so this is a failure there, never a skip."""
    assert os.geteuid() == 0, "installing a service makes a system user: run the suite as root"
    name = f"ep{uuid.uuid4().hex[:10]}"
    yield name
    with contextlib.suppress(KeyError):
        pwd.getpwnam(name)
        subprocess.run(["userdel", name], check=False, capture_output=True)


def test_install_service_writes_a_unit_systemd_accepts_and_purge_takes_modules_and_state_away(
    fleet: Fleet, tmp_path: Path, system_user: str
) -> None:
    agent = fleet.device("unit-2").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["unit-2"])
    agent.wait_state("demo", "Healthy")
    units = tmp_path / "units"
    done = cli("agent", "install-service", "--config", str(agent.config_path), "--user", system_user,
               "--unit-dir", str(units), "--no-start")  # fmt: skip
    assert done.returncode == 0, done.stderr
    unit = units / "edgepack-agent.service"
    text = unit.read_text()
    for line in (f"User={system_user}", "Type=notify", "KillMode=process", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", f"ReadWritePaths={agent.state_dir}", "Restart=always",
                 f"ExecStart={sys.executable} -m edge_agent --config {agent.config_path.resolve()}",
                 ):  # fmt: skip
        assert line in text.splitlines(), (line, text)
    user = pwd.getpwnam(system_user)
    assert user.pw_shell == "/usr/sbin/nologin"
    assert agent.state_dir.stat().st_uid == user.pw_uid
    assert agent.config.credentials.stat().st_uid == user.pw_uid
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, check=False
    )
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    config = str(agent.config_path)
    purge = ("agent", "uninstall-service", "--unit-dir", str(units), "--purge", "--config", config)
    refused = cli(*purge)
    assert refused.returncode != 0 and "an agent still runs" in refused.stderr, refused.stderr
    assert unit.exists() is False  # the unit went; the state stays while its agent runs
    assert agent.state_dir.is_dir()
    assert agent.stop() == 0
    assert score(port, [1]) == {"result": [2]}, "modules outlive their agent"
    done = cli(*purge)
    assert done.returncode == 0, done.stderr
    assert "stopped 1 module instance(s)" in done.stdout, done.stdout
    assert not agent.state_dir.exists()

    def port_free() -> bool:
        with socket.socket() as s:
            return s.connect_ex(("127.0.0.1", port)) != 0

    wait_for(port_free, what="the module's port closed", timeout=15)


def test_install_service_refuses_clearly(fleet: Fleet, tmp_path: Path) -> None:
    agent = fleet.device("unit-3")
    as_root = cli("agent", "install-service", "--config", str(agent.config_path), "--user", "root",
                  "--unit-dir", str(tmp_path), "--no-start")  # fmt: skip
    assert as_root.returncode != 0 and "does not run as root" in as_root.stderr, as_root.stderr
    nope = str(tmp_path / "nope.toml")
    missing = cli("agent", "install-service", "--config", nope, "--unit-dir", str(tmp_path))
    assert missing.returncode != 0 and "not found" in missing.stderr, missing.stderr
    no_unit = cli("agent", "uninstall-service", "--unit-dir", str(tmp_path))
    assert no_unit.returncode != 0 and "no such unit" in no_unit.stderr, no_unit.stderr
    for result in (as_root, missing, no_unit):
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_systemd_analyze_is_there() -> None:
    assert shutil.which("systemd-analyze"), "scripts/test.sh installs systemd for the unit check"


def test_install_service_gives_the_user_what_an_earlier_agent_left_and_follows_no_link(
    fleet: Fleet, tmp_path: Path, system_user: str
) -> None:
    agent = fleet.device("unit-4")
    # What an agent run as root before leaves: private folders and files, and a link a module
    # could have planted (to a file of the system's).
    cache = agent.state_dir / "cache" / "sha256"
    cache.mkdir(parents=True, mode=0o700)
    record = agent.state_dir / "state.json"
    record.write_text("{}")
    record.chmod(0o600)
    (cache / "blob").write_bytes(b"x")
    victim = tmp_path / "system-file"
    victim.write_text("root's")
    (agent.state_dir / "link").symlink_to(victim)
    done = cli("agent", "install-service", "--config", str(agent.config_path), "--user", system_user,
               "--unit-dir", str(tmp_path / "units"), "--no-start")  # fmt: skip
    assert done.returncode == 0, done.stderr
    user = pwd.getpwnam(system_user)
    for path in (cache.parent, cache, cache / "blob", record):
        # Private to their owner (0700/0600): the service's user must be that owner.
        assert path.stat().st_uid == user.pw_uid, path
    assert victim.stat().st_uid == 0, "a link in the state folder was followed"
    assert (agent.state_dir / "link").lstat().st_uid == user.pw_uid


DOCKER_CHORES = """
import os, sys
run, spool = sys.argv[1], sys.argv[2]
os.chown(run, 10001, 10001)                       # DockerRuntime.launch hands its run folder over
keys = os.path.join(run, "keys.json")
with open(keys, "w") as fh:                       # ... writes the keys file there
    fh.write("{}")
os.chown(keys, 10001, 10001)
os.chmod(keys, 0o600)
segment = os.path.join(spool, os.listdir(spool)[0])
with open(segment, "rb") as fh:                   # the uploader reads what the container spooled
    fh.read()
os.unlink(segment)                                # ... and deletes it once the hub has it
"""


def test_a_docker_devices_unit_keeps_what_the_docker_runtime_needs_of_root(
    tmp_path: Path, system_user: str
) -> None:
    # Debian's own: setpriv (util-linux) and python3, which the unit's user may run.
    assert shutil.which("setpriv") and os.path.exists("/usr/bin/python3")
    from packager.systemd_unit import UnitSpec, render_unit

    subprocess.run(["useradd", "--system", "--user-group", "--no-create-home", "--shell",
                    "/usr/sbin/nologin", system_user], check=True)  # fmt: skip
    user = pwd.getpwnam(system_user)
    base = Path(tempfile.mkdtemp(prefix="unit-"))  # reachable by that user, unlike tmp_path
    try:
        base.chmod(0o755)
        state = base / "state"
        run, spool = state / "run" / "svc", state / "data" / "svc"
        run.mkdir(parents=True)
        spool.mkdir(parents=True, mode=0o700)
        (spool / "segment.jsonl.gz").write_bytes(b"x")
        (spool / "segment.jsonl.gz").chmod(0o600)
        for path in (state, state / "run", run, state / "data"):
            os.chown(path, user.pw_uid, user.pw_gid)
        state.chmod(0o700)
        for path in (spool, spool / "segment.jsonl.gz"):  # as a container leaves them
            os.chown(path, 10001, 10001)
        spec = UnitSpec(python=Path(sys.executable), config=base / "agent.toml", state_dir=state,
                        device_id="edge-1", user=system_user, docker=True)  # fmt: skip
        lines = dict(line.split("=", 1) for line in render_unit(spec).splitlines() if "=" in line)
        assert lines["CapabilityBoundingSet"] == lines["AmbientCapabilities"]
        kept = [f"+{c.lower().removeprefix('cap_')}" for c in lines["AmbientCapabilities"].split()]
        caps = ",".join(["-all", *kept])
        done = subprocess.run(
            ["setpriv", "--reuid", str(user.pw_uid), "--regid", str(user.pw_gid), "--clear-groups",
             "--bounding-set", caps, "--inh-caps", caps, "--ambient-caps", caps,
             "/usr/bin/python3", "-c", DOCKER_CHORES, str(run), str(spool)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert run.stat().st_uid == 10001 and not (spool / "segment.jsonl.gz").exists()
    finally:
        shutil.rmtree(base)
