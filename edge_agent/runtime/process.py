"""The ``process`` runtime: the scoring server as a child process of the device.

Each instance runs in a session of its own, so it outlives the agent (a SIGTERM'd agent leaves
its modules serving; the next agent adopts them by pid and start time). Its stdout and stderr
go to ``<run_dir>/module.log``. The environment is a clean one (``PATH``, locale, the
module's own variables), not the agent's.

Resource limits are the docker runtime's job; here a module's CPU and memory are measured and
reported, not enforced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from edge_agent.cache.modules import InstalledModule
from edge_agent.runtime.base import (
    LOG_FILE,
    STATE_FILE,
    LaunchSpec,
    Liveness,
    Progress,
    Usage,
    instance_arguments,
    read_instance_state,
    requirement_names,
    tail_lines,
)
from edge_agent.runtime.endpoint_files import (
    TlsMaterial,
    data_environment,
    endpoint_environment,
    write_keys,
    write_tls,
)
from edge_agent.state.records import InstanceRecord
from manifests.desired import EndpointAuth, ModuleAssignment, RuntimeKind
from manifests.errors import RuntimeFailure

log = logging.getLogger(__name__)

_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")
_KEPT_ENV = ("PATH", "LANG", "LC_ALL", "TZ", "HOME", "TMPDIR")


def process_start_ticks(pid: int) -> int | None:
    """When ``pid`` started (clock ticks since boot), or None when no live process has that
    pid: tells a process from a later one that got the same pid. A zombie (dead, not yet
    reaped by whoever inherited it) counts as gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may contain spaces and parentheses; fields after it don't.
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def installed_distributions() -> set[str]:
    """Normalised names of the distributions installed for this interpreter (by presence,
    not version), read from the ``*.dist-info`` folders on ``sys.path``: what
    ``importlib.metadata`` would find, without the megabytes it costs a long-running agent."""
    names: set[str] = set()
    for entry in sys.path:
        try:
            with os.scandir(entry or ".") as it:
                for item in it:
                    stem, dot, kind = item.name.rpartition(".")
                    if dot and kind in ("dist-info", "egg-info"):
                        names.add(_normalized(stem.split("-", 1)[0]))
        except (FileNotFoundError, NotADirectoryError, PermissionError):
            continue
    return names


def _runs_in(pid: int, run_dir: Path) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return str(run_dir / STATE_FILE).encode() in cmdline


def _process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (the scoring server's workers)."""
    out = [pid]
    i = 0
    while i < len(out):
        try:
            children = Path(f"/proc/{out[i]}/task/{out[i]}/children").read_text().split()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            children = []
        out.extend(int(c) for c in children)
        i += 1
    return out


def _usage_of(pids: list[int]) -> Usage | None:
    cpu_ticks = 0
    rss_pages = 0
    found = False
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            statm = Path(f"/proc/{pid}/statm").read_text().split()
        except (FileNotFoundError, ProcessLookupError, PermissionError, IndexError):
            continue
        found = True
        cpu_ticks += int(fields[11]) + int(fields[12])  # utime + stime
        rss_pages += int(statm[1])
    if not found:
        return None
    return Usage(cpu_s=cpu_ticks / _TICKS, memory_mb=rss_pages * _PAGE / 2**20)


class ProcessRuntime:
    kind = RuntimeKind.PROCESS

    def __init__(
        self,
        runs_root: Path,
        *,
        python: Path | None = None,
        extra_env: dict[str, str] | None = None,
        max_log_bytes: int = 8 << 20,
    ) -> None:
        self.runs_root = runs_root
        self.max_log_bytes = max_log_bytes
        self.python = str(python or sys.executable)
        self._extra_env = dict(extra_env or {})
        # Launches, stops and liveness checks come from several threads (operations, prober).
        self._lock = threading.RLock()
        self._children: dict[int, subprocess.Popen[bytes]] = {}
        self._exit_codes: dict[int, int] = {}

    # --- checks ------------------------------------------------------------------------------

    def unschedulable(self, module: InstalledModule, assignment: ModuleAssignment) -> str | None:
        """The module's pip requirements must be installed for the interpreter that runs it
        (checked when that is the agent's own; another interpreter is trusted as configured)."""
        if self.python != sys.executable:
            return None
        installed = installed_distributions()
        missing = [
            name
            for name in requirement_names(module.manifest.runtime.python.requirements)
            if _normalized(name) not in installed
        ]
        if missing:
            return (
                f"the process runtime lacks the module's Python requirements {', '.join(missing)}; "
                f"install them for {self.python} or deploy with the docker runtime"
            )
        return None

    def prepare(
        self, spec: LaunchSpec, progress: Progress, cancelled: Callable[[], bool], deadline: float
    ) -> None:
        return None

    # --- lifecycle ---------------------------------------------------------------------------

    def launch(self, spec: LaunchSpec) -> InstanceRecord:
        settings = spec.assignment.settings
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            (spec.run_dir / STATE_FILE).unlink()
        argv = [
            self.python, "-m", "edge_agent.scoring", "--module-dir", str(spec.module.dir),
            *instance_arguments(spec, str(spec.run_dir / STATE_FILE)),
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if k in _KEPT_ENV}
        env.update(self._extra_env)
        env.update(settings.env)
        env.update(endpoint_environment(spec.assignment, str(spec.run_dir)))
        if spec.data_dir is not None:
            spec.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            env.update(data_environment(spec.assignment, str(spec.data_dir)))
        write_keys(spec.run_dir, settings.auth, spec.agent_key)
        if spec.tls is not None:
            write_tls(spec.run_dir, spec.tls)
        env["PYTHONUNBUFFERED"] = "1"
        env["PYTHONDONTWRITEBYTECODE"] = "1"  # the module folder is read-only anyway
        with (spec.run_dir / LOG_FILE).open("ab") as out:
            try:
                proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    cwd=spec.run_dir,
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as exc:
                raise RuntimeFailure(f"cannot start {self.python} for {spec.service}: {exc}") from None
        with self._lock:
            self._children[proc.pid] = proc
        return InstanceRecord(
            id=spec.instance_id,
            assignment=spec.assignment,
            key=spec.key,
            runtime=self.kind,
            run_dir=str(spec.run_dir),
            started_at=datetime.now(UTC),
            pid=proc.pid,
            pid_start=process_start_ticks(proc.pid),
            agent_key=spec.agent_key,
        )

    def liveness(self, instance: InstanceRecord) -> Liveness:
        with self._lock:
            return self._liveness(instance)

    def _liveness(self, instance: InstanceRecord) -> Liveness:
        pid = instance.pid
        if pid is None:
            return Liveness(False)
        if pid in self._exit_codes:
            return Liveness(False, self._exit_codes[pid])
        child = self._children.get(pid)
        if child is not None:
            code = child.poll()
            if code is None:
                return Liveness(True)
            self._exit_codes[pid] = code
            del self._children[pid]
            return Liveness(False, code)
        # A process an earlier agent started: alive when the pid is there with its start time.
        started = process_start_ticks(pid)
        return Liveness(started is not None and started == instance.pid_start)

    def stop(self, instance: InstanceRecord, *, grace_s: float) -> None:
        pid = instance.pid
        if pid is None or not self.liveness(instance).alive:
            self._forget(pid)
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and self.liveness(instance).alive:
            time.sleep(0.02)
        if self.liveness(instance).alive:
            log.warning("instance %s did not stop within %.0fs; killing it", instance.id, grace_s)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            with self._lock:
                child = self._children.get(pid)
            if child is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.wait(timeout=10)
        else:
            # Its workers share its process group; none may outlive it.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        self._forget(pid)

    def _forget(self, pid: int | None) -> None:
        if pid is None:
            return
        with self._lock:
            child = self._children.pop(pid, None)
            self._exit_codes.pop(pid, None)
        if child is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=5)

    def log_tail(self, instance: InstanceRecord, lines: int) -> list[str]:
        run_dir = Path(instance.run_dir)
        recent = tail_lines(run_dir / LOG_FILE, lines)
        if len(recent) < lines:  # just rotated: the rest is in the previous file
            recent = tail_lines(run_dir / (LOG_FILE + ".1"), lines - len(recent)) + recent
        return recent

    def usage(self, instance: InstanceRecord) -> Usage | None:
        if instance.pid is None or not self.liveness(instance).alive:
            return None
        return _usage_of(_process_tree(instance.pid))

    def update_endpoint(
        self, instance: InstanceRecord, auth: EndpointAuth | None, tls: TlsMaterial | None
    ) -> None:
        write_keys(Path(instance.run_dir), auth, instance.agent_key)
        if tls is not None:
            write_tls(Path(instance.run_dir), tls)

    def maintain(self, instance: InstanceRecord) -> None:
        """Rotate the module's log once it passes ``max_log_bytes``: the newest half moves to
        ``module.log.1`` and the file is truncated in place (the module appends to it)."""
        path = Path(instance.run_dir) / LOG_FILE
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return
        if size <= self.max_log_bytes:
            return
        keep = self.max_log_bytes // 2
        with path.open("rb") as fh:
            fh.seek(size - keep)
            tail = fh.read(keep)
        (path.parent / (LOG_FILE + ".1")).write_bytes(tail)
        os.truncate(path, 0)

    def reap_orphans(self, known: set[str]) -> list[str]:
        """Instances are found through their run folders: ``<runs_root>/<service>/<id>/``
        holds the state file with the pid; a live pid whose command line names that folder
        is one of ours."""
        stopped: list[str] = []
        for state_file in sorted(self.runs_root.glob(f"*/*/{STATE_FILE}")):
            run_dir = state_file.parent
            if run_dir.name in known:
                continue
            state = read_instance_state(run_dir)
            pid = state.get("pid") if state else None
            if not isinstance(pid, int) or not _runs_in(pid, run_dir):
                continue
            log.warning("stopping instance %s left running by an earlier agent", run_dir.name)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGTERM)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and process_start_ticks(pid) is not None:
                time.sleep(0.05)
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            stopped.append(run_dir.name)
        return stopped
