"""Running the scoring app: uvicorn (httptools + uvloop) in one or several worker processes.

With ``workers > 1`` the parent reserves the port, forks the workers (each imports the entry
script and runs ``init()`` itself, as gunicorn does for Azure's server without preload), and
supervises them: a worker that crashes after it became ready is replaced; a worker whose
start-up fails stops the whole server with :class:`RuntimeFailure`, since every other worker
would fail the same way.

Each worker listens on its own ``SO_REUSEPORT`` socket, so the kernel spreads connections
evenly. With one shared listening socket, whichever worker wakes first accepts a burst of
keep-alive connections and keeps them: measured with 2 workers and 16 connections, one
worker did three times the work of the other and throughput was 15% lower.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.connection
import signal
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import uvicorn

from edge_agent.scoring.app import create_app
from edge_agent.scoring.metrics import MetricsBoard
from manifests.errors import ConfigError, RuntimeFailure

log = logging.getLogger("edge_agent.scoring")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_STOP_GRACE_S = 10


class _Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured SIGINT/SIGTERM after its graceful shutdown, which would
        # kill the caller; serve_module promises to return normally instead.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0 picks a free one), listening unless
    ``listen`` is false."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise RuntimeFailure(
            f"cannot listen on {host}:{port} ({exc.strerror}); "
            "stop whatever uses the port or choose another with --port"
        ) from None
    return sock


def _configure_logging(log_level: str) -> None:
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log level {log_level!r} is not one of {', '.join(LOG_LEVELS)}")
    # The root logger also carries what entry scripts log, as on Azure ML.
    logging.basicConfig(
        level=log_level.upper(),
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s [%(process)d] %(message)s",
    )


def serve_worker(
    module_dir: Path,
    sock: socket.socket,
    *,
    board: MetricsBoard,
    worker: int = 0,
    log_level: str = "warning",
) -> None:
    """Serve on ``sock`` in this process until SIGINT/SIGTERM.

    Raises :class:`RuntimeFailure` when the module cannot be loaded or its ``init()`` fails.
    """
    failures: list[BaseException] = []
    server: _Server | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    app = create_app(module_dir, board=board, worker=worker, on_fatal=fatal)
    config = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        interface="asgi3",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=_STOP_GRACE_S,
    )
    server = _Server(config)
    server.run(sockets=[sock])
    if failures:
        exc = failures[0]
        raise RuntimeFailure(
            f"module in {module_dir} failed to start: {type(exc).__name__}: {exc} "
            "(the traceback is in the log above); fix the entry script or its model"
        )


def _worker_main(
    module_dir: Path, address: tuple[str, int], board: MetricsBoard, worker: int, log_level: str
) -> None:
    # The parent's handlers only set its own flag; a worker stops the way uvicorn does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        sock = bind_socket(*address, reuse_port=True)
        serve_worker(module_dir, sock, board=board, worker=worker, log_level=log_level)
    except RuntimeFailure as exc:
        log.error("worker %d: %s", worker, exc)
        sys.exit(exc.exit_code)


def _supervise(
    module_dir: Path,
    address: tuple[str, int],
    board: MetricsBoard,
    workers: int,
    log_level: str,
) -> None:
    ctx = multiprocessing.get_context("fork")
    stopping = False

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    def start(index: int) -> multiprocessing.process.BaseProcess:
        board.set_ready(index, False)
        proc = ctx.Process(
            target=_worker_main,
            args=(module_dir, address, board, index, log_level),
            name=f"edgepack-worker-{index}",
        )
        proc.start()
        return proc

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs = {i: start(i) for i in range(workers)}
    try:
        while not stopping:
            multiprocessing.connection.wait([p.sentinel for p in procs.values()], timeout=0.5)
            for index, proc in list(procs.items()):
                code = proc.exitcode
                if code is None or stopping:
                    continue
                if code == RuntimeFailure.exit_code or not board.is_ready(index):
                    raise RuntimeFailure(
                        f"worker {index} failed to start the module in {module_dir} "
                        f"(exit code {code}); the traceback is in the log above"
                    )
                log.warning("worker %d exited with code %s; starting a new one", index, code)
                procs[index] = start(index)
    finally:
        for proc in procs.values():
            if proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + _STOP_GRACE_S + 2
        for proc in procs.values():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.exitcode is None:
                proc.kill()
                proc.join()
        for s, handler in previous.items():
            signal.signal(s, handler)


def serve_module(
    module_dir: Path,
    *,
    host: str = "127.0.0.1",
    port: int = 8890,
    workers: int = 1,
    log_level: str = "warning",
) -> None:
    """Serve the unpacked module in ``module_dir`` until SIGINT or SIGTERM, then return.

    Raises :class:`RuntimeFailure` when the port cannot be bound or the module fails to start
    (its traceback is logged first), :class:`ConfigError` for bad arguments.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    _configure_logging(log_level)
    board = MetricsBoard(workers)
    if workers == 1:
        sock = bind_socket(host, port)
        try:
            serve_worker(module_dir, sock, board=board, log_level=log_level)
        finally:
            sock.close()
        return
    # Bound but not listening: it holds the port (and resolves port 0) for the workers'
    # SO_REUSEPORT sockets without taking a share of the connections itself.
    reserved = bind_socket(host, port, reuse_port=True, listen=False)
    try:
        address = (host, reserved.getsockname()[1])
        _supervise(module_dir, address, board, workers, log_level)
    finally:
        reserved.close()
