"""``LocalService``: a module served on this machine, as ``edgepack serve`` does, in a ``with``.

The bundle is verified (and refused exactly as ``edgepack verify`` refuses it), unpacked into
the same content-addressed cache a device uses, and served by the same scoring server, as a
child process that runs the entry script's ``init()`` before its port listens: once the
``with`` block begins, the service answers. Leaving the block stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

from edge_agent.cache import InstalledModule, ModuleCache
from edge_agent.scoring.failure import read_failure
from manifests.errors import ConfigError, ModuleStartFailure, RuntimeFailure
from manifests.signing import TrustStore
from packager.home import default_cache_dir, default_trust_path
from packager.inspect import open_verified
from packager.keys import read_trust
from packager.sdk.errors import BadArgument
from packager.sdk.progress import ProgressOption, Tracker, reporting
from packager.sdk.scoring import decode_answer, post_score, request_bytes

#: exit codes of ``python -m edge_agent.scoring`` (see its module docstring)
_EXIT_START_FAILED = 5
_EXIT_PORT_IN_USE = 6


def trust_store(trust: list[Path] | None) -> TrustStore:
    """The given trust (``.pub`` files, trust stores, folders), else the local trust store."""
    if trust:
        return read_trust(trust)
    default = default_trust_path()
    if not default.exists():
        raise ConfigError("no trusted keys: pass --trust PUBLISHER.pub, or add one with 'edgepack trust add'")
    return read_trust([default])


def install_bundle(
    bundle: Path, trust: TrustStore, cache_dir: Path | None = None, *, progress: ProgressOption = None
) -> InstalledModule:
    """Verify ``bundle`` into the module cache and unpack it; refused as ``verify`` refuses."""
    cache = ModuleCache(cache_dir or default_cache_dir())
    with reporting(progress) as report:
        tracker = Tracker(report, "verifying", bundle.stat().st_size if bundle.exists() else None)
        verified = open_verified(bundle, trust, sink=cache.bundle_sink(), progress=tracker.advance)
    return cache.install_verified(verified)


class LocalService:
    """Serve a ``.edgepack`` on this machine: ``with LocalService("dist/digits-1.edgepack") as s:
    s.run(data)``.

    ``port=0`` picks a free port (``.port`` tells which). ``trust`` lists publisher keys or
    trust stores (default: the local trust store); ``cache_dir`` is the module cache
    (default ``$EDGEPACK_HOME/cache``).
    """

    def __init__(
        self,
        module_path: str | Path,
        port: int = 8890,
        *,
        host: str = "127.0.0.1",
        workers: int = 1,
        trust: list[str | Path] | None = None,
        cache_dir: str | Path | None = None,
        start_timeout: float = 120.0,
        progress: ProgressOption = None,
    ) -> None:
        if not isinstance(port, int) or isinstance(port, bool) or not 0 <= port <= 65535:
            raise BadArgument(f"LocalService: port must be 0 (any free one) to 65535, not {port!r}")
        if not isinstance(workers, int) or not 1 <= workers <= 64:
            raise BadArgument(f"LocalService: workers must be 1 to 64, not {workers!r}")
        self.module_path = Path(module_path)
        self.host = host
        self.port = port
        self.workers = workers
        self.trust = [Path(t) for t in trust] if trust else None
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.start_timeout = start_timeout
        self.progress = progress
        self.installed: InstalledModule | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._run_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def scoring_uri(self) -> str:
        """Where the service scores: ``http://HOST:PORT/score``."""
        return f"http://{self.host}:{self.port}/score"

    def start(self) -> LocalService:
        """Verify, unpack and start the service; return once it answers."""
        if self._proc is not None:
            return self
        self.installed = install_bundle(
            self.module_path, trust_store(self.trust), self.cache_dir, progress=self.progress
        )
        self._run_dir = tempfile.TemporaryDirectory(prefix="edgepack-local-")
        run_dir = Path(self._run_dir.name)
        state_file = run_dir / "instance.json"
        log = (run_dir / "module.log").open("wb")
        command = [
            sys.executable, "-m", "edge_agent.scoring", "--module-dir", str(self.installed.dir),
            "--host", self.host, "--port", str(self.port), "--workers", str(self.workers),
            "--log-level", "info", "--preload", "--state-file", str(state_file),
        ]  # fmt: skip
        with log:
            self._proc = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + self.start_timeout
        while not state_file.exists():
            code = self._proc.poll()
            if code is not None:
                self._failed(code, run_dir)
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeFailure(
                    f"{self.installed.manifest.ref} did not start within {self.start_timeout:g}s; "
                    "its init() may hang"
                )
            time.sleep(0.05)
        self.port = int(json.loads(state_file.read_text())["port"])
        return self

    def _failed(self, code: int, run_dir: Path) -> None:
        assert self.installed is not None
        tail = " | ".join((run_dir / "module.log").read_text(errors="replace").strip().splitlines()[-3:])
        written = read_failure(run_dir)  # the cause the scoring server took from the traceback
        self._proc = None
        self._cleanup()
        ref = self.installed.manifest.ref
        if code == _EXIT_PORT_IN_USE:
            raise RuntimeFailure(f"port {self.port} is held by another program; choose another port (or 0)")
        if code == _EXIT_START_FAILED:
            cause = written.cause if written is not None else tail
            raise ModuleStartFailure(
                f"{ref}: the entry script failed to start: {cause}",
                traceback=written.traceback if written is not None else None,
            )
        raise RuntimeFailure(f"{ref}: the scoring server exited with code {code}: {tail}")

    def logs(self) -> str:
        """What the service wrote so far (the entry script's log, the server's errors)."""
        if self._run_dir is None:
            return ""
        return (Path(self._run_dir.name) / "module.log").read_text(errors="replace")

    get_logs = logs

    def run(self, input_data: Any, *, timeout: float = 30.0) -> Any:
        """Score ``input_data`` (a JSON string or a JSON-ready value); the answer's JSON."""
        body = request_bytes(input_data)
        if self._proc is None:
            raise BadArgument("LocalService.run: the service is not started; use it in a 'with' block")
        return decode_answer(post_score(self.scoring_uri, body, timeout=timeout))

    def stop(self) -> None:
        """Stop the service (SIGTERM, then SIGKILL after 15 s)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self._cleanup()

    def _cleanup(self) -> None:
        if self._run_dir is not None:
            self._run_dir.cleanup()
            self._run_dir = None

    delete = stop

    def __enter__(self) -> LocalService:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
