"""The agent process: reads its configuration, wires the parts together once, runs the loop.

This is the composition root: nothing else builds runtimes, links or the loop, and each part
gets only what it needs.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

from edge_agent import __version__, logfmt, memory
from edge_agent.data.uploader import Uploader, quotas_of
from edge_agent.reconcile.loop import ReconcileLoop, Stop
from edge_agent.report.sampler import Sampler
from edge_agent.runtime.base import Runtime
from edge_agent.runtime.process import ProcessRuntime
from edge_agent.service_manager import Notifier
from edge_agent.setup import check_credentials_private, current_credentials, load_setup, tighten_state_dir
from edge_agent.status import LOCK_FILE
from edge_agent.uplink.http import HubHttp
from edge_agent.uplink.mqtt import MqttSession
from edge_agent.uplink.rotation import SWITCH_TIMEOUT_S, Rotator
from manifests.desired import RuntimeKind
from manifests.device import AgentConfig
from manifests.errors import ConfigError
from manifests.extras import missing_extra_message

log = logging.getLogger("edge_agent")

MIGRATE_SYSCTL = Path("/proc/sys/net/ipv4/tcp_migrate_req")


def agent_version() -> str:
    return __version__


def build_runtimes(config: AgentConfig, device_id: str) -> dict[RuntimeKind, Runtime]:
    runtimes: dict[RuntimeKind, Runtime] = {}
    runs = config.state_dir / "run"
    for kind in config.runtimes:
        if kind is RuntimeKind.PROCESS:
            runtimes[kind] = ProcessRuntime(
                runs, python=config.process.python, max_log_bytes=config.max_log_bytes
            )
        elif kind is RuntimeKind.DOCKER:
            try:
                from edge_agent.runtime.docker import DockerRuntime  # the docker SDK only when used
            except ModuleNotFoundError as exc:
                message = missing_extra_message(exc.name)
                if message is None:
                    raise
                raise ConfigError(f"runtime 'docker' in agent.toml: {message}") from None

            runtimes[kind] = DockerRuntime.connect(config, runs, device_id)
    return runtimes


def enable_port_handover() -> None:
    """Ask the kernel to hand connections queued at a closing listener to the other listener of
    the same port (Linux 5.14+), so a version that steps down during an update drops none."""
    try:
        if MIGRATE_SYSCTL.read_text().strip() != "1":
            MIGRATE_SYSCTL.write_text("1\n")
    except OSError as exc:
        log.warning(
            "cannot enable net.ipv4.tcp_migrate_req (%s); during an update, connections queued "
            "at the old version's listener in the instant it closes may be reset",
            exc.strerror,
        )


@contextlib.contextmanager
def single_agent(state_dir: Path) -> Iterator[None]:
    """One agent per state folder: a second one would fight the first over every module."""
    tightened = tighten_state_dir(state_dir)
    if tightened is not None:
        log.warning("%s", tightened)
    fd = os.open(state_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(
                f"another agent already runs on {state_dir}; stop it first (or give this one "
                "another state_dir)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)


def run_agent(config_path: Path, *, stop_modules: bool = False, allow_open_credentials: bool = False) -> None:
    """Run until SIGTERM/SIGINT. Modules keep running afterwards unless ``stop_modules``.
    Credentials other users may read are refused unless ``allow_open_credentials``."""
    config, credentials = load_setup(config_path)
    credentials, configured_bytes = current_credentials(config, credentials)
    open_credentials = check_credentials_private(config.credentials, allow_open=allow_open_credentials)
    logfmt.configure(config.log_level, config.log_format)
    if open_credentials is not None:
        log.warning("%s", open_credentials)
    with single_agent(config.state_dir):
        memory.cap_arenas()  # before any thread of the agent's starts
        enable_port_handover()
        runtimes = build_runtimes(config, credentials.device_id)
        hub = HubHttp(credentials, credentials_path=config.credentials)
        mqtt: MqttSession | None = None
        notifier = Notifier.from_env()
        loop_ref: list[ReconcileLoop] = []

        def on_mqtt(event: object) -> None:
            loop_ref[0].on_mqtt(event)  # type: ignore[arg-type]

        if credentials.mqtt.host is not None:
            mqtt = MqttSession(credentials, on_mqtt)
        loop = ReconcileLoop(
            config,
            credentials,
            runtimes=runtimes,
            hub=hub,
            publish_reported=mqtt.publish_reported if mqtt else (lambda _: None),
            publish_logs=mqtt.publish_logs if mqtt else (lambda _: None),
            agent_version=agent_version(),
            alive=notifier.alive,
            settled=memory.settle,
        )
        loop_ref.append(loop)
        # Credential rotation: its own thread; it writes the new credentials into the state
        # folder and switches the HTTP token and the broker session the loop's publishers use.
        rotator = Rotator(
            credentials, configured=configured_bytes, state_dir=config.state_dir, hub=hub,
            switch_broker=(lambda c: mqtt.switch(c, timeout_s=SWITCH_TIMEOUT_S)) if mqtt else None,
        )  # fmt: skip
        # Collected data: its own thread and its own HTTP connection, never the loop's.
        uploader = Uploader(config.state_dir, hub.put_batch, lambda: quotas_of(loop.records.desired))
        sampler = Sampler(
            credentials.device_id,
            runtimes,
            loop.watched,
            mqtt.publish_telemetry if mqtt else (lambda _: False),
            interval_s=config.telemetry_interval_s,
            hub_reads_newer=loop.hub_reads_newer,
            spools=uploader.figures,
        )

        def on_signal(signum: int, _frame: FrameType | None) -> None:
            loop.submit(Stop())

        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, on_signal)
        log.info(
            "agent %s for %s starting (runtimes: %s, state in %s)",
            agent_version(),
            credentials.device_id,
            ", ".join(config.runtimes),
            config.state_dir,
        )
        # Modules start from the cache first: a device with no network still serves.
        loop.boot()
        loop.step()
        if mqtt is not None:
            mqtt.start()
        sampler.start()
        uploader.start()
        rotator.start()
        notifier.ready(f"serving {len(loop.records.agent.services)} service(s) from the cache")
        try:
            loop.run()
        finally:
            notifier.stopping()
            log.info("agent stopping%s", " and its modules" if stop_modules else "; modules keep running")
            rotator.stop()
            uploader.stop()
            sampler.stop()
            if mqtt is not None:
                mqtt.stop()
            loop.shutdown(stop_modules=stop_modules)
