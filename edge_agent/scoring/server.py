"""Running the scoring app: uvicorn (httptools + uvloop) in one or several worker processes.

``edgepack serve`` answers on its port at once and runs ``init()`` in the background. An
instance run by the agent is started with :class:`InstanceOptions` instead, so that two
versions of a service can share its port during an update (``docs/architecture.md``):

- ``preload``: ``init()`` runs *before* the public port listens, so a version that is not
  ready never receives a request;
- ``reuse_port``: the public socket is bound with ``SO_REUSEPORT``, so the new version joins
  the old one's port and the kernel spreads connections over both;
- ``probe_port``: a private loopback socket on which the agent probes *this* instance (the
  public port may answer from either version);
- ``state_file``: written atomically once the instance listens (pid, ports);
- ``drain_s``: on SIGTERM the public listener closes first (with ``net.ipv4.tcp_migrate_req``
  the kernel hands its queued connections to the other version), requests still arriving on
  open connections are answered with ``Connection: close``, and the process exits when its
  connections are gone or ``drain_s`` has passed.

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

import asyncio
import contextlib
import errno
import json
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import uvicorn

from edge_agent.scoring.app import create_app
from edge_agent.scoring.auth import EndpointKeys
from edge_agent.scoring.endpoint import EndpointOptions, ReloadingTLS
from edge_agent.scoring.exit_codes import EXIT_PORT_IN_USE, EXIT_STUCK
from edge_agent.scoring.failure import FAILURE_FILE, StartFailure, write_failure
from edge_agent.scoring.limits import RunWatchdog, guarded_protocol
from edge_agent.scoring.metrics import MetricsBoard
from manifests.durable import write_durable
from manifests.errors import ConfigError, ModuleStartFailure, RuntimeFailure

log = logging.getLogger("edge_agent.scoring")

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")
_STOP_GRACE_S = 10


class PortInUse(RuntimeFailure):
    """The public port is bound by a program that does not share it."""


@dataclass(frozen=True)
class InstanceOptions:
    """How an instance that the agent manages serves; the defaults are ``edgepack serve``'s."""

    preload: bool = False
    reuse_port: bool = False
    probe_host: str = "127.0.0.1"
    probe_port: int | None = None  # None: no private probe socket; 0: any free port
    state_file: Path | None = None
    drain_s: float = 0.0
    # A worker that dies ends the whole instance (its exit code passed on), instead of being
    # replaced in place: the agent restarts the instance with its backoff and sees a crash loop.
    exit_on_crash: bool = False


class WorkerCrashed(RuntimeFailure):
    """A worker died after it was ready, and the instance exits with its code."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class _Server(uvicorn.Server):
    def __init__(
        self,
        config: uvicorn.Config,
        *,
        public_count: int = 1,
        drain_s: float = 0.0,
        on_started: Callable[[], None] | None = None,
        on_drain: Callable[[], None] | None = None,
    ) -> None:
        super().__init__(config)
        self._public_count = public_count
        self._drain_s = drain_s
        self._on_started = on_started
        self._on_drain = on_drain

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a captured SIGINT/SIGTERM after its graceful shutdown, which would
        # kill the caller; serve_module promises to return normally instead.
        with super().capture_signals():
            try:
                yield
            finally:
                self._captured_signals.clear()

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        if self._drain_s > 0 and not self.force_exit:
            await self._drain()
        await super().shutdown(sockets)

    async def _drain(self) -> None:
        """Stop taking connections on the public port, then let open ones finish: uvicorn's
        own shutdown closes idle keep-alive connections at once, and a client that sends on
        one at that moment sees a reset."""
        for server in self.servers[: self._public_count]:
            server.close()
        if self._on_drain is not None:
            self._on_drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._drain_s
        while self.server_state.connections and loop.time() < deadline and not self.force_exit:
            await asyncio.sleep(0.05)


def bind_socket(host: str, port: int, *, reuse_port: bool = False, listen: bool = True) -> socket.socket:
    """A TCP socket bound to ``host:port`` (``port`` 0 picks a free one), listening unless
    ``listen`` is false. Raises :class:`PortInUse` when another program holds the port."""
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
        error = PortInUse if exc.errno == errno.EADDRINUSE else RuntimeFailure
        raise error(
            f"cannot listen on {host}:{port} ({exc.strerror}); "
            "stop whatever uses the port or choose another with --port"
        ) from None
    return sock


def write_state_file(path: Path, state: dict[str, object]) -> None:
    """Write the instance's state file durably (the agent reads it to find the probe port)."""
    write_durable(path, json.dumps(state).encode())


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
    sock: socket.socket | None,
    *,
    board: MetricsBoard,
    worker: int = 0,
    log_level: str = "warning",
    options: InstanceOptions = InstanceOptions(),
    address: tuple[str, int] | None = None,
    probe: socket.socket | None = None,
    on_started: Callable[[], None] | None = None,
    endpoint: EndpointOptions = EndpointOptions(),
) -> None:
    """Serve on ``sock`` (and the private ``probe`` socket) in this process until SIGINT or
    SIGTERM. With ``options.preload`` the entry script is loaded and ``init()`` runs first;
    then ``sock`` may be None and the public socket is bound at ``address`` only once ready.

    Raises :class:`RuntimeFailure` when the module cannot be loaded or its ``init()`` fails.
    """
    failures: list[BaseException] = []
    server: _Server | None = None

    def fatal(exc: BaseException) -> None:
        failures.append(exc)
        if server is not None:
            server.should_exit = True

    # TLS material is checked before init() runs: a bad certificate fails at once.
    tls = None
    if endpoint.tls_cert is not None and endpoint.tls_key is not None:
        tls = ReloadingTLS(endpoint.tls_cert, endpoint.tls_key)
    limits = endpoint.limits
    app = create_app(
        module_dir,
        board=board,
        worker=worker,
        on_fatal=fatal,
        limits=limits,
        keys=EndpointKeys(endpoint.keys_file) if endpoint.keys_file is not None else None,
        watchdog=RunWatchdog(limits.run_timeout_s) if limits.run_timeout_s is not None else None,
    )
    if options.preload:
        try:
            app.preload()
        except ModuleStartFailure as start_failure:
            if options.state_file is not None:
                # Beside the state file, for whoever supervises the instance (the agent).
                written = StartFailure(str(start_failure), start_failure.traceback)
                write_failure(options.state_file.with_name(FAILURE_FILE), written)
            raise
        if sock is None:
            assert address is not None
            sock = bind_socket(*address, reuse_port=options.reuse_port)
    assert sock is not None
    sockets = [sock] if probe is None else [sock, probe]

    background: list[asyncio.Task[None]] = []

    def started() -> None:
        if options.preload:
            board.set_ready(worker, True)
        if tls is not None:
            background.append(asyncio.get_running_loop().create_task(tls.watch()))
        if on_started is not None:
            on_started()

    config = uvicorn.Config(
        app,
        loop="uvloop",
        http=guarded_protocol(limits),
        interface="asgi3",
        lifespan="on",
        access_log=False,
        log_level=log_level,
        proxy_headers=False,
        server_header=False,
        timeout_graceful_shutdown=_STOP_GRACE_S,
    )
    if tls is not None:
        config.load()
        config.ssl = tls.context
    server = _Server(
        config,
        drain_s=options.drain_s,
        on_started=started,
        on_drain=app.start_draining,
    )
    server.run(sockets=sockets)
    if failures:
        exc = failures[0]
        raise RuntimeFailure(
            f"module in {module_dir} failed to start: {type(exc).__name__}: {exc} "
            "(the traceback is in the log above); fix the entry script or its model"
        )


def _worker_main(
    module_dir: Path,
    address: tuple[str, int],
    board: MetricsBoard,
    worker: int,
    log_level: str,
    options: InstanceOptions,
    probe_address: tuple[str, int] | None,
    endpoint: EndpointOptions,
) -> None:
    # The parent's handlers only set its own flag; a worker stops the way uvicorn does.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        probe = bind_socket(*probe_address, reuse_port=True) if probe_address else None
        sock = None if options.preload else bind_socket(*address, reuse_port=True)
        serve_worker(
            module_dir,
            sock,
            board=board,
            worker=worker,
            log_level=log_level,
            options=options,
            address=address,
            probe=probe,
            endpoint=endpoint,
        )
    except PortInUse as exc:
        log.error("worker %d: %s", worker, exc)
        sys.exit(EXIT_PORT_IN_USE)
    except RuntimeFailure as exc:
        log.error("worker %d: %s", worker, exc)
        sys.exit(exc.exit_code)


def _supervise(
    module_dir: Path,
    address: tuple[str, int],
    board: MetricsBoard,
    workers: int,
    log_level: str,
    options: InstanceOptions = InstanceOptions(),
    probe_address: tuple[str, int] | None = None,
    on_all_ready: Callable[[], None] | None = None,
    endpoint: EndpointOptions = EndpointOptions(),
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
            args=(module_dir, address, board, index, log_level, options, probe_address, endpoint),
            name=f"edgepack-worker-{index}",
        )
        proc.start()
        return proc

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    procs = {i: start(i) for i in range(workers)}
    announced = on_all_ready is None
    try:
        while not stopping:
            multiprocessing.connection.wait(
                [p.sentinel for p in procs.values()], timeout=0.5 if announced else 0.02
            )
            if not announced and all(board.is_ready(i) for i in procs):
                announced = True
                assert on_all_ready is not None
                on_all_ready()
            for index, proc in list(procs.items()):
                code = proc.exitcode
                if code is None or stopping:
                    continue
                if code == EXIT_PORT_IN_USE:
                    raise PortInUse(f"worker {index}: the port {address[1]} is held by another program")
                if code == RuntimeFailure.exit_code or not board.is_ready(index):
                    raise RuntimeFailure(
                        f"worker {index} failed to start the module in {module_dir} "
                        f"(exit code {code}); the traceback is in the log above"
                    )
                if code == EXIT_STUCK:
                    log.warning("worker %d was stuck in run(); starting a new one", index)
                elif options.exit_on_crash:
                    # A signal's death becomes 128 + signal, as a shell reports it.
                    passed_on = code if code > 0 else 128 - code
                    message = f"worker {index} exited with code {code}; the instance ends"
                    raise WorkerCrashed(message, passed_on)
                else:
                    log.warning("worker %d exited with code %s; starting a new one", index, code)
                procs[index] = start(index)
    finally:
        for proc in procs.values():
            if proc.exitcode is None:
                proc.terminate()
        deadline = time.monotonic() + options.drain_s + _STOP_GRACE_S + 2
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
    options: InstanceOptions = InstanceOptions(),
    endpoint: EndpointOptions = EndpointOptions(),
) -> None:
    """Serve the unpacked module in ``module_dir`` until SIGINT or SIGTERM, then return.

    With a run() timeout the workers are supervised even when there is one, so that a worker
    the watchdog ended is replaced.

    Raises :class:`PortInUse` / :class:`RuntimeFailure` when the port cannot be bound or the
    module fails to start (its traceback is logged first), :class:`ConfigError` for bad
    arguments.
    """
    if workers < 1:
        raise ConfigError(f"workers must be at least 1, not {workers}")
    if options.drain_s < 0:
        raise ConfigError(f"drain time must not be negative, not {options.drain_s}")
    _configure_logging(log_level)
    board = MetricsBoard(workers)
    supervised = workers > 1 or endpoint.limits.run_timeout_s is not None
    reuse = options.reuse_port or supervised
    # Bound but not listening: holds the port (and resolves port 0) before init() runs, so a
    # port held by another program is known at once, without taking connections yet.
    reserved = bind_socket(host, port, reuse_port=reuse, listen=False)
    probe_reserved = (
        bind_socket(options.probe_host, options.probe_port, reuse_port=supervised, listen=False)
        if options.probe_port is not None
        else None
    )
    address = (host, reserved.getsockname()[1])
    probe_address = (options.probe_host, probe_reserved.getsockname()[1]) if probe_reserved else None

    def announce() -> None:
        if options.state_file is not None:
            probe_port = probe_address[1] if probe_address else None
            write_state_file(
                options.state_file, {"pid": os.getpid(), "port": address[1], "probe_port": probe_port}
            )

    try:
        if not supervised:
            if not reuse:
                # edgepack serve: the reserved socket itself listens, as before.
                reserved.listen(2048)
                sock: socket.socket | None = reserved
            else:
                sock = None if options.preload else bind_socket(*address, reuse_port=True)
            probe = None
            if probe_reserved is not None:
                probe_reserved.listen(2048)
                probe = probe_reserved
            serve_worker(
                module_dir,
                sock,
                board=board,
                log_level=log_level,
                options=options,
                address=address,
                probe=probe,
                on_started=announce,
                endpoint=endpoint,
            )
            if sock is not None and sock is not reserved:
                sock.close()
            return
        _supervise(
            module_dir,
            address,
            board,
            workers,
            log_level,
            options,
            probe_address,
            on_all_ready=announce,
            endpoint=endpoint,
        )
    finally:
        reserved.close()
        if probe_reserved is not None:
            probe_reserved.close()
