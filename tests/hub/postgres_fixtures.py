"""A real PostgreSQL server for the hub tests (star-imported by ``tests/hub/conftest.py``).

``postgres``: one throwaway server per test session (per xdist worker), initialised in a temp
dir, listening on an ephemeral loopback port with trust authentication; its value is the
SQLAlchemy URL of its ``postgres`` database. Give a hub its own database with
``hub(postgres=postgres)`` (the ``hub`` factory creates it and drops it afterwards).

The server is Debian's ``postgresql`` package; without it these tests fail (they are part of
CI, not optional). initdb refuses to run as root, so as root the server runs as the
``postgres`` system user the package creates.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest

from tests.engines import ENGINE_START_ATTEMPTS, EngineFailed, start_on_free_ports

__all__ = ["PostgresServer", "find_postgres_bin", "postgres", "start_postgres"]

POSTGRES_ROOT = Path("/usr/lib/postgresql")
SERVICE_USER = "postgres"
INSTALL_HINT = "install Debian's 'postgresql' package (apt-get install postgresql, as scripts/test.sh does)"


def find_postgres_bin() -> Path:
    """The bin dir of the newest installed PostgreSQL, or a failure saying what to install."""
    candidates = sorted(
        (p for p in POSTGRES_ROOT.glob("*/bin") if (p / "initdb").is_file() and (p / "postgres").is_file()),
        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0,
    )
    if not candidates:
        pytest.fail(f"no PostgreSQL server under {POSTGRES_ROOT}/*/bin: {INSTALL_HINT}", pytrace=False)
    return candidates[-1]


def _run_as() -> dict[str, Any]:
    """Popen arguments that drop root for the PostgreSQL processes (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    try:
        pwd.getpwnam(SERVICE_USER)
    except KeyError:
        pytest.fail(f"running as root but there is no {SERVICE_USER!r} user: {INSTALL_HINT}", pytrace=False)
    return {"user": SERVICE_USER, "group": SERVICE_USER, "extra_groups": []}


@dataclass
class PostgresServer:
    """A running postmaster; ``url`` names its ``postgres`` database (for CREATE DATABASE)."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    root: Path
    log: Path
    args: list[str] | None = None
    run_as: dict[str, Any] | None = None

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def restart(self, *, down_s: float = 0.0) -> None:
        """Stop the server (fast shutdown) and start it again on the same port and data."""
        assert self.args is not None
        self._shutdown()
        time.sleep(down_s)
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                self.args, stdout=out, stderr=subprocess.STDOUT, cwd=self.root, **(self.run_as or {})
            )
        if not _ready(self.url.replace("+psycopg", ""), self.process, timeout=30):
            raise RuntimeError(f"postgres did not come back:\n{self.log_text()[-2000:]}")

    def _shutdown(self) -> None:
        if self.process.poll() is None:
            # SIGINT is PostgreSQL's "fast" shutdown: it ends open sessions instead of waiting.
            self.process.send_signal(2)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def stop(self) -> None:
        self._shutdown()
        shutil.rmtree(self.root, ignore_errors=True)


def _ready(url: str, process: subprocess.Popen[bytes], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        with contextlib.suppress(psycopg.OperationalError), psycopg.connect(url, connect_timeout=2):
            return True
        time.sleep(0.05)
    return False


def start_postgres(bin_dir: Path, *, attempts: int = ENGINE_START_ATTEMPTS) -> PostgresServer:
    """initdb a fresh cluster in a temp dir and start it on a free loopback port."""
    run_as = _run_as()
    # Not under pytest's tmp dir: that is private to root, and the server may run as 'postgres'.
    root = Path(tempfile.mkdtemp(prefix="edgepack-pg-"))
    data = root / "data"
    data.mkdir()
    if run_as:
        shutil.chown(root, run_as["user"], run_as["group"])
        shutil.chown(data, run_as["user"], run_as["group"])
    log = root / "postgres.log"
    try:
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
             "--encoding=UTF8", "--locale=C", "--no-sync"],
            capture_output=True, cwd=root, check=False, **run_as,
        )  # fmt: skip
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed:\n{initdb.stdout.decode()}{initdb.stderr.decode()}")

        def launch(ports: list[int]) -> PostgresServer:
            port = ports[0]
            args = [str(bin_dir / "postgres"), "-D", str(data),
                    "-c", "listen_addresses=127.0.0.1", "-c", f"port={port}",
                    "-c", f"unix_socket_directories={root}",
                    # A throwaway cluster: durability only costs time here.
                    "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                    "-c", "max_connections=200"]  # fmt: skip
            with log.open("wb") as out:
                process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=root, **run_as)
            url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
            if _ready(url, process, timeout=30):
                return PostgresServer(
                    f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres", port, process, root, log,
                    args, run_as,
                )
            if process.poll() is None:
                process.kill()
            process.wait(timeout=10)
            raise EngineFailed(log.read_text(errors="replace"))

        return start_on_free_ports("postgres", 1, launch, attempts=attempts)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise


@pytest.fixture(scope="session")
def postgres() -> Iterator[str]:
    """The SQLAlchemy URL of a throwaway PostgreSQL server (its ``postgres`` database)."""
    server = start_postgres(find_postgres_bin())
    try:
        yield server.url
    finally:
        server.stop()
