"""How fast and how lean the edge agent is, on real parts.

One run starts Mosquitto (from hub-generated accounts), a hub (``edgepack hub serve``) and
agents as separate processes, deploys the digits example and measures:

- ``process_deploy_s`` / ``docker_deploy_s``: the deployment published (the deploy request
  returns) until the hub's roll-up says Healthy, on a device that holds none of the module's
  blobs yet (a fresh device each round; docker: the runtime image is already in the engine);
- ``update_failed_requests``: requests that failed while v1 -> v2 switched, with clients
  calling without pause (keep-alive and fresh connections), per runtime;
- ``rollback_s``: a v3 whose ``init()`` raises is published until the hub's roll-up says
  Failed with v2 still answering; ``rollback_after_timeout_s``: the same for a v3 that never
  becomes ready, counted from the end of its start timeout;
- ``offline_boot_s``: the agent started with hub and broker down (modules killed, as after a
  power cut) until every module answers again;
- ``agent_idle_rss_mb`` (process runtime, one module; ``agent_idle_rss_mb_docker`` too) and
  ``agent_rss_growth_mb``: RSS after 500 desired-state changes minus RSS after the first;
- ``update_bytes`` for an update that changes only ``score.py`` of a module with a 10 MB
  model, against ``changed_bytes + manifest_bytes`` (and ``bundle_bytes``);
- ``device_install_mb`` / ``device_packages``: what ``pip install edgepack`` puts on a device
  (the agent, the scoring server, the CLI), against ``full_install_mb`` / ``full_packages``,
  every dependency before the split (``edgepack[hub,docker,onnx]``); ``device_onnx_install_mb``
  with the ONNX runtime that process-runtime ONNX modules need (the agent bundle's default);
  pip and setuptools counted in none; ``agent_import_s``: ``import edge_agent.daemon``.

Usage: ``python bench/agent.py [--quick] [--no-docker]``; progress on stderr, the last line
of stdout is one JSON object with ``targets`` and ``targets_met``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from manifests.desired import DesiredState, ModuleAssignment, RuntimeKind  # noqa: E402
from manifests.device import AgentConfig, render_agent_config  # noqa: E402
from manifests.signing import (  # noqa: E402
    envelope_bytes,
    generate_private_key,
    load_private_key,
    private_key_pem,
    public_key_pem,
    sign_payload,
)
from packager.build import BuildSpec, build_module  # noqa: E402
from tests.load import Load  # noqa: E402

ADMIN = "ep_admin_" + secrets.token_urlsafe(24)
REGISTRY: list[subprocess.Popen[bytes]] = []
PY = sys.executable
TARGETS = {
    "process_deploy_s_max": 1.0,
    "docker_deploy_s_max": 1.5,
    "update_failed_requests_max": 0,
    "rollback_after_timeout_s_max": 5.0,
    "offline_boot_s_max": 3.0,
    "agent_idle_rss_mb_max": 45.0,
    "agent_rss_growth_mb_max": 2.0,
    "update_bytes_ratio_max": 1.05,
    "device_install_ratio_max": 0.6,
}
FAILING_INIT = (
    'def init():\n    raise RuntimeError("broken on purpose")\n\n\ndef run(raw_data):\n    return raw_data\n'
)
NEVER_READY = (
    "import time\n\n\ndef init():\n    time.sleep(3600)\n\n\ndef run(raw_data):\n    return raw_data\n"
)


def say(*args: object) -> None:
    print(*args, file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait(check: Callable[[], Any], timeout: float, what: str, interval: float = 0.01) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(interval)
    raise SystemExit(f"bench: timed out waiting for {what}")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


# --- the stack ------------------------------------------------------------------------------


def remove_containers(device_id: str) -> None:
    """Remove the containers an agent started for ``device_id`` (docker runtime rounds)."""
    if not Path("/var/run/docker.sock").exists():
        return
    with contextlib.suppress(Exception):
        import docker

        client = docker.from_env()
        for container in client.containers.list(all=True, filters={"label": f"edgepack.device={device_id}"}):
            container.remove(force=True)
        client.close()


@dataclass
class Agent:
    device_id: str
    config: Path
    state_dir: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Agent:
        self.proc = subprocess.Popen(
            [PY, "-m", "edge_agent", "--config", str(self.config)],
            stdout=subprocess.DEVNULL,
            stderr=self.log.open("ab"),
        )
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=60)

    def kill_modules(self) -> None:
        """SIGKILL the module processes this agent started (what a power cut does).

        Only a pid whose command line names the state file is one of them: a container's
        state file holds a pid of the container's namespace, which on the host is somebody
        else's (killing its process group once took the machine's services down)."""
        for state in self.state_dir.glob("run/*/*/instance.json"):
            with contextlib.suppress(ValueError, KeyError, OSError):
                pid = int(json.loads(state.read_text())["pid"])
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                if str(state).encode() in cmdline:
                    os.killpg(pid, signal.SIGKILL)
        remove_containers(self.device_id)

    def connected(self) -> bool:
        return self.log.exists() and "connected to the broker" in self.log.read_text(errors="replace")


@dataclass
class Stack:
    root: Path
    mqtt_port: int = 0
    #: the broker's loopback listener for hubs, where a client id is not its user name
    hub_listener_port: int = 0
    hub_port: int = 0
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    agents: list[Agent] = field(default_factory=list)
    broker: subprocess.Popen[bytes] | None = None
    hub: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    def http(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=60)

    def start(self, publisher_pub: Path) -> None:
        self.mqtt_port, self.hub_port, self.hub_listener_port = free_port(), free_port(), free_port()
        data, broker_dir = self.root / "hub", self.root / "broker"
        env = {**os.environ, "EDGEPACK_HUB_ADMIN_TOKEN": ADMIN}
        subprocess.run(
            [PY, "-m", "packager", "hub", "broker-config", "--out", str(broker_dir), "--data-dir", str(data),
             "--port", str(self.mqtt_port), "--hub-port", str(self.hub_listener_port)],
            check=True, env=env, capture_output=True,
        )  # fmt: skip
        self.start_broker()
        self.hub = subprocess.Popen(
            [PY, "-m", "packager", "hub", "serve", "--data-dir", str(data), "--port", str(self.hub_port),
             "--trust", str(publisher_pub), "--mqtt-host", "127.0.0.1", "--mqtt-port", str(self.mqtt_port),
             "--broker-dir", str(broker_dir), "--broker-pid-file", str(broker_dir / "mosquitto.pid")],
            env=env, stdout=subprocess.DEVNULL, stderr=(self.root / "hub.log").open("wb"),
        )  # fmt: skip
        wait(self._hub_up, 60, "the hub")

    def start_broker(self) -> None:
        conf = self.root / "broker" / "mosquitto.conf"
        text = conf.read_text()
        if os.geteuid() == 0 and "\nuser " not in text:
            conf.write_text(text + "user root\n")
        self.broker = subprocess.Popen(
            ["/usr/sbin/mosquitto", "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT
        )
        wait(lambda: _listening(self.mqtt_port), 20, "the broker")

    def _hub_up(self) -> bool:
        try:
            return httpx.get(self.url + "/api/v1/hub/key", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def stop_hub_and_broker(self) -> None:
        for proc in (self.hub, self.broker):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=30)

    def device(self, device_id: str, runtimes: list[str]) -> Agent:
        with self.http() as http:
            r = http.post("/api/v1/devices", json={"id": device_id, "tags": {"bench": "1"}})
            r.raise_for_status()
        folder = self.root / "devices" / device_id
        folder.mkdir(parents=True)
        creds = folder / "credentials.json"
        creds.write_text(json.dumps(r.json()["device_credentials"]))
        creds.chmod(0o600)  # the agent refuses credentials other users may read
        config = AgentConfig.model_validate(
            {"credentials": creds, "state_dir": folder / "state", "runtimes": runtimes,
             "service_host": "127.0.0.1", "telemetry_interval_s": 10, "log_format": "text"}
        )  # fmt: skip
        path = folder / "agent.toml"
        path.write_text(render_agent_config(config))
        agent = Agent(device_id, path, folder / "state", folder / "agent.log")
        self.agents.append(agent)
        return agent

    def push(self, bundle: Path) -> None:
        with self.http() as http:
            http.post("/api/v1/modules", content=bundle.read_bytes()).raise_for_status()

    def deploy(self, service: str, module: str, version: str, port: int, device: str, runtime: str,
               **extension: Any) -> None:  # fmt: skip
        config = {"computeType": "local", "port": port, "edgepack": {"runtime": runtime, **extension}}
        with self.http() as http:
            r = http.put(f"/api/v1/deployments/{service}", json={
                "module": module, "version": version, "deployment_config": config,
                "target": {"devices": [device]}})  # fmt: skip
            r.raise_for_status()

    def rollup(self, service: str) -> dict[str, Any]:
        with self.http() as http:
            body: dict[str, Any] = http.get(f"/api/v1/deployments/{service}").json()
            return body

    def state_is(self, service: str, state: str, version: str | None = None) -> bool:
        body = self.rollup(service)
        return body["state"] == state and (version is None or body["version"] == version)

    def close(self) -> None:
        for agent in self.agents:
            agent.stop()
            agent.kill_modules()
        self.stop_hub_and_broker()


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


# --- modules --------------------------------------------------------------------------------


@dataclass
class Modules:
    key: Any
    root: Path
    model_dir: Path
    image: str | None = None
    image_digest: str | None = None

    def build(self, name: str, version: str, *, script: str | None = None, big_model: bool = False,
              nonce: bool = True, docker: bool = False) -> Path:  # fmt: skip
        src = self.root / f"src-{name}-{version}"
        src.mkdir()
        (src / "score.py").write_text(script or digits_script())
        model = self.root / f"model-{name}-{version}" / "model"  # lands as model/model/...
        model.mkdir(parents=True)
        shutil.copy(self.model_dir / "digits.onnx", model / "digits.onnx")
        if nonce:  # a blob no device holds yet
            (model / "nonce.bin").write_bytes(os.urandom(64))
        if big_model:
            weights = self.root / "weights.bin"
            if not weights.exists():
                weights.write_bytes(os.urandom(10 << 20))
            shutil.copy(weights, model / "weights.bin")
        spec = BuildSpec(
            name=name, version=version, entry_script=src / "score.py", model=model, source_dir=src,
            requirements=["onnxruntime", "numpy"],
            **({"image": self.image, "image_digest": self.image_digest} if docker and self.image else {}),
        )  # fmt: skip
        return build_module(spec, self.key, self.root / "dist").path


def digits_script(extra: str = "") -> str:
    """The example's stock score.py, reading the model from the model folder it is built with."""
    text = (REPO / "examples/digits/score.py").read_text()
    old = 'os.getenv("AZUREML_MODEL_DIR"), "digits.onnx"'
    return text.replace(old, 'os.getenv("AZUREML_MODEL_DIR"), "model", "digits.onnx"') + extra


def digits_request(model_dir: Path) -> bytes:
    samples = json.loads((model_dir / "test_samples.json").read_text())
    return json.dumps({"data": samples["data"][:1]}).encode()


def answers(port: int, body: bytes) -> bool:
    try:
        r = httpx.post(f"http://127.0.0.1:{port}/score", content=body, timeout=2,
                       headers={"Content-Type": "application/json"})  # fmt: skip
        return r.status_code == 200
    except httpx.HTTPError:
        return False


# --- measurements -----------------------------------------------------------------------------


def deploy_time(stack: Stack, mods: Modules, runtime: str, rounds: int) -> list[float]:
    times = []
    for i in range(rounds):
        agent = stack.device(f"{runtime}-{i}", [runtime]).start()
        wait(agent.connected, 30, "the agent's broker connection")
        bundle = mods.build(f"fresh-{runtime}", str(i + 1), docker=runtime == "docker")
        stack.push(bundle)
        started = time.monotonic()
        service = f"svc-{runtime}-{i}"
        stack.deploy(service, f"fresh-{runtime}", str(i + 1), free_port(), agent.device_id, runtime)
        wait(lambda i=i: stack.state_is(f"svc-{runtime}-{i}", "Healthy"), 120, "Healthy")  # type: ignore[misc]
        times.append(time.monotonic() - started)
        say(f"  {runtime} deploy round {i + 1}: {times[-1]:.3f} s")
        agent.stop()
        agent.kill_modules()
    return times


def update_under_load(stack: Stack, mods: Modules, runtime: str, body: bytes) -> dict[str, int]:
    agent = stack.device(f"upd-{runtime}", [runtime]).start()
    port = free_port()
    name = f"upd-{runtime}"
    stack.push(mods.build(name, "1", docker=runtime == "docker"))
    stack.deploy(name, name, "1", port, agent.device_id, runtime)
    wait(lambda: stack.state_is(name, "Healthy"), 120, "v1 Healthy")
    stack.push(mods.build(name, "2", docker=runtime == "docker"))
    # Two clients on keep-alive connections and one opening a fresh connection per request.
    loads = [Load(port, body, lambda _: 0, clients=2), Load(port, body, lambda _: 0, clients=1,
                                                             fresh_connections=True)]  # fmt: skip
    with loads[0], loads[1]:
        time.sleep(0.5)
        stack.deploy(name, name, "2", port, agent.device_id, runtime)
        wait(lambda: stack.state_is(name, "Healthy", "2"), 120, "v2 Healthy")
        time.sleep(1.0)
    answered = sum(sum(load.answers.values()) for load in loads)
    failed = sum(len(load.failures) for load in loads)
    say(f"  {runtime} update under load: {answered} answered, {failed} failed")
    agent.stop()
    agent.kill_modules()
    return {"answered": answered, "failed": failed}


def rollback(stack: Stack, mods: Modules, body: bytes) -> dict[str, float]:
    agent = stack.device("rollback", ["process"]).start()
    port = free_port()
    stack.push(mods.build("rb", "2"))
    stack.deploy("rb", "rb", "2", port, agent.device_id, "process")
    wait(lambda: stack.state_is("rb", "Healthy"), 120, "v2 Healthy")
    stack.push(mods.build("rb", "3", script=FAILING_INIT))
    started = time.monotonic()
    stack.deploy("rb", "rb", "3", port, agent.device_id, "process")
    wait(lambda: stack.state_is("rb", "Failed") and answers(port, body), 60, "v3 Failed, v2 serving")
    broken = time.monotonic() - started
    timeout_s = 3.0
    stack.push(mods.build("rb", "4", script=NEVER_READY))
    started = time.monotonic()
    stack.deploy("rb", "rb", "4", port, agent.device_id, "process", startTimeoutSeconds=timeout_s)
    wait(lambda: stack.state_is("rb", "Failed", "4") and answers(port, body), 60, "v4 Failed, v2 serving")
    never = time.monotonic() - started
    say(f"  rollback: init() raises {broken:.2f} s; never ready {never:.2f} s (timeout {timeout_s:g} s)")
    agent.stop()
    agent.kill_modules()
    return {"rollback_s": broken, "rollback_after_timeout_s": never - timeout_s, "start_timeout_s": timeout_s}


def idle_rss(stack: Stack, mods: Modules, runtime: str) -> tuple[Agent, float, int]:
    agent = stack.device(f"idle-{runtime}", [runtime]).start()
    port = free_port()
    name = f"idle-{runtime}"
    stack.push(mods.build(name, "1", docker=runtime == "docker"))
    stack.deploy(name, name, "1", port, agent.device_id, runtime)
    wait(lambda: stack.state_is(name, "Healthy"), 120, "Healthy")
    time.sleep(12)  # a telemetry sample or two, a report
    assert agent.proc is not None
    rss = rss_mb(agent.proc.pid)
    say(f"  idle agent RSS ({runtime}, one module): {rss:.1f} MB")
    return agent, rss, port


def rss_growth(stack: Stack, agent: Agent, hub_key: Any, changes: int) -> dict[str, float]:
    """Publish ``changes`` desired states as the hub would (signed, rising generations),
    alternating one service and two (the second cannot run here: a docker module on a
    process-only device), and compare the agent's RSS after the first and the last."""
    assert agent.proc is not None
    device = agent.device_id
    with httpx.Client(base_url=stack.url, headers={"Authorization": f"Bearer {ADMIN}"}) as http:
        current = http.get(f"/api/v1/devices/{device}").json()["generation"]
        body = http.get("/api/v1/deployments/idle-process").json()
    base = ModuleAssignment.model_validate({
        "service": body["name"], "module": body["module"], "version": body["version"],
        "manifest_digest": body["manifest_digest"], "settings": body["settings"]})  # fmt: skip
    ghost = base.model_copy(update={"service": "ghost", "settings": base.settings.model_copy(
        update={"runtime": RuntimeKind.DOCKER, "port": base.settings.port + 1})})  # fmt: skip
    password = (stack.root / "hub" / "mqtt_password").read_text().strip()
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"bench-{secrets.token_hex(4)}",
                         protocol=mqtt.MQTTv311)  # fmt: skip
    client.username_pw_set("edgepack-hub", password)
    # Beside the hub, under the hub's user: on the devices' listener the client id is the user
    # name, and the two would keep replacing each other.
    client.connect("127.0.0.1", stack.hub_listener_port)
    client.loop_start()
    topic = f"edgepack/devices/{device}/desired"
    state_file = agent.state_dir / "agent-state.json"

    def applied() -> int:
        try:
            return int(json.loads(state_file.read_text())["applied_generation"])
        except (FileNotFoundError, ValueError, KeyError):
            return 0

    first = 0.0
    for i in range(1, changes + 1):
        now = datetime.now(UTC)
        modules = [base] if i % 2 else [base, ghost]
        state = DesiredState(device_id=device, generation=current + i, issued=now,
                             expires=now + timedelta(hours=1), modules=modules)  # fmt: skip
        payload = envelope_bytes(sign_payload(state.model_dump(mode="json", by_alias=True), [hub_key]))
        client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)
        wait(lambda i=i: applied() >= current + i, 30, f"desired change {i}", interval=0.002)  # type: ignore[misc]
        if i == 1:
            time.sleep(1.0)
            first = rss_mb(agent.proc.pid)
    time.sleep(2.0)
    last = rss_mb(agent.proc.pid)
    client.loop_stop()
    client.disconnect()
    say(f"  RSS after the first desired change {first:.1f} MB, after {changes}: {last:.1f} MB")
    return {"first": first, "last": last}


def update_bytes(stack: Stack, mods: Modules) -> dict[str, int]:
    agent = stack.device("bytes", ["process"]).start()
    port = free_port()
    stack.push(mods.build("big", "1", big_model=True, nonce=False))
    stack.deploy("big", "big", "1", port, agent.device_id, "process")
    wait(lambda: stack.state_is("big", "Healthy"), 120, "v1 Healthy")
    before = json.loads((agent.state_dir / "agent-state.json").read_text())["downloads"]
    script = digits_script("\n# v2: only the entry script changed\n")
    bundle = mods.build("big", "2", script=script, big_model=True, nonce=False)
    stack.push(bundle)
    stack.deploy("big", "big", "2", port, agent.device_id, "process")
    wait(lambda: stack.state_is("big", "Healthy", "2"), 120, "v2 Healthy")
    time.sleep(0.5)
    after = json.loads((agent.state_dir / "agent-state.json").read_text())["downloads"]
    with tarfile.open(bundle) as tar:
        manifest_bytes = tar.getmember("module.json").size
    blob_bytes = after["bytes"] - before["bytes"]
    agent.stop()
    agent.kill_modules()
    return {
        "update_bytes": blob_bytes + manifest_bytes,
        "changed_bytes": len(script.encode()),
        "manifest_bytes": manifest_bytes,
        "bundle_bytes": bundle.stat().st_size,
        "blobs_fetched": after["blobs"] - before["blobs"],
    }


def offline_boot(stack: Stack, agent: Agent, port: int, body: bytes) -> float:
    agent.stop(signal.SIGKILL)
    agent.kill_modules()
    stack.stop_hub_and_broker()
    started = time.monotonic()
    agent.start()
    wait(lambda: answers(port, body), 60, "the module after the reboot")
    elapsed = time.monotonic() - started
    say(f"  offline boot: serving again after {elapsed:.2f} s")
    return elapsed


def docker_image(root: Path) -> tuple[str, str] | None:
    """The runtime image pushed to a registry on loopback: (pinned reference, digest)."""
    try:
        import docker

        client = docker.from_env()
        client.ping()
    except Exception as exc:
        say(f"  no Docker Engine ({type(exc).__name__}): docker figures left out")
        return None
    from packager.runtime_image.builder import BuildOptions, build_runtime_image

    port = free_port()
    (root / "registry.yml").write_text(
        "version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: " + str(root / "registry")
        + f"\nhttp:\n  addr: 127.0.0.1:{port}\n"
    )
    REGISTRY.append(subprocess.Popen(["/usr/bin/docker-registry", "serve", str(root / "registry.yml")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))  # fmt: skip
    wait(lambda: _listening(port), 30, "the registry")
    built = build_runtime_image(
        BuildOptions(cache_dir=Path("/var/tmp/edgepack-bench/runtime-image"), tag="bench",
                     push=f"127.0.0.1:{port}", source_dir=REPO), client=client)  # fmt: skip
    assert built.pinned_ref and built.digest
    return built.pinned_ref.split("@")[0] + ":bench", built.digest


def installed(requirement: str, target: Path) -> tuple[float, int]:
    """MB and distributions that ``pip install --target`` puts there for ``requirement``."""
    subprocess.run([PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--target",
                    str(target), requirement], check=True, capture_output=True)  # fmt: skip
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file() and not f.is_symlink())
    return size / 1e6, len(list(target.glob("*.dist-info")))


def install_size(root: Path) -> dict[str, Any]:
    wheels = root / "wheel"
    subprocess.run([PY, "-m", "pip", "wheel", "--quiet", "--no-deps", "--wheel-dir", str(wheels), str(REPO)],
                   check=True, capture_output=True)  # fmt: skip
    uri = next(wheels.glob("edgepack-*.whl")).resolve().as_uri()
    result: dict[str, Any] = {}
    for key, extras in (("device", ""), ("device_onnx", "[onnx]"), ("full", "[hub,docker,onnx]")):
        mb, packages = installed(f"edgepack{extras} @ {uri}", root / f"site-{key}")
        result[f"{key}_install_mb"], result[f"{key}_packages"] = round(mb, 1), packages
        say(f"  {key}: {packages} distributions, {mb:.1f} MB")
    result["device_install_ratio"] = round(result["device_install_mb"] / result["full_install_mb"], 3)
    times = []
    for _ in range(5):
        began = time.perf_counter()
        subprocess.run([PY, "-c", "import edge_agent.daemon"], check=True, cwd=REPO)
        times.append(time.perf_counter() - began)
    result["agent_import_s"] = round(statistics.median(times), 3)
    return result


def targets_met(result: dict[str, Any]) -> dict[str, bool]:
    checks = {
        "process_deploy_s": lambda v: v < TARGETS["process_deploy_s_max"],
        "docker_deploy_s": lambda v: v < TARGETS["docker_deploy_s_max"],
        "update_failed_requests": lambda v: all(n == 0 for n in v.values()),
        "rollback_after_timeout_s": lambda v: v < TARGETS["rollback_after_timeout_s_max"],
        "offline_boot_s": lambda v: v < TARGETS["offline_boot_s_max"],
        "agent_idle_rss_mb": lambda v: v < TARGETS["agent_idle_rss_mb_max"],
        "agent_rss_growth_mb": lambda v: v < TARGETS["agent_rss_growth_mb_max"],
        "update_bytes_ratio": lambda v: v <= TARGETS["update_bytes_ratio_max"],
        "device_install_ratio": lambda v: v <= TARGETS["device_install_ratio_max"],
    }
    return {key: bool(check(result[key])) for key, check in checks.items() if key in result}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="fewer rounds (about a minute)")
    parser.add_argument("--no-docker", action="store_true", help="leave out the docker runtime")
    parser.add_argument(
        "--only", default="", help="parts, comma-separated: deploy,update,rollback,bytes,memory,boot,install"
    )
    args = parser.parse_args()
    rounds = 3 if args.quick else 7
    everything = {"deploy", "update", "rollback", "bytes", "memory", "boot", "install"}
    parts = set(filter(None, args.only.split(","))) or everything
    root = Path(tempfile.mkdtemp(prefix="edgepack-bench-agent-"))
    stack = Stack(root)
    try:
        say("training the digits model")
        model_dir = root / "digits"
        subprocess.run([PY, str(REPO / "examples/digits/train.py"), "--out", str(model_dir)], check=True,
                       capture_output=True)  # fmt: skip
        body = digits_request(model_dir)
        key = generate_private_key()
        (root / "publisher.pub").write_bytes(public_key_pem(key.public_key()))
        (root / "publisher.key").write_bytes(private_key_pem(key))
        mods = Modules(key, root, model_dir)
        image = None if args.no_docker else docker_image(root)
        if image is not None:
            mods.image, mods.image_digest = image
        say("starting broker and hub")
        stack.start(root / "publisher.pub")
        hub_key = load_private_key((root / "hub" / "hub.key").read_bytes())
        result: dict[str, Any] = {"bench": "agent", "quick": args.quick, "cpus": os.cpu_count()}

        if "deploy" in parts:
            say("deploy time, process runtime (fresh device each round)")
            times = deploy_time(stack, mods, "process", rounds)
            result["process_deploy_s"] = round(statistics.median(times), 3)
            result["process_deploy_rounds_s"] = [round(t, 3) for t in times]
        if image is not None and "deploy" in parts:
            say("deploy time, docker runtime (image present)")
            times = deploy_time(stack, mods, "docker", rounds)
            result["docker_deploy_s"] = round(statistics.median(times), 3)
            result["docker_deploy_rounds_s"] = [round(t, 3) for t in times]

        if "update" in parts:
            say("updates under load")
            failed = {"process": update_under_load(stack, mods, "process", body)}
            if image is not None:
                failed["docker"] = update_under_load(stack, mods, "docker", body)
            result["update_failed_requests"] = {k: v["failed"] for k, v in failed.items()}
            result["update_answered_requests"] = {k: v["answered"] for k, v in failed.items()}
        if "rollback" in parts:
            say("rollback")
            result.update({k: round(v, 3) for k, v in rollback(stack, mods, body).items()})
        if "bytes" in parts:
            say("bytes moved by an update of score.py beside a 10 MB model")
            moved = update_bytes(stack, mods)
            result.update(moved)
            wanted = moved["changed_bytes"] + moved["manifest_bytes"]
            result["update_bytes_ratio"] = round(moved["update_bytes"] / wanted, 3)
        if parts & {"memory", "boot"}:
            say("memory")
            if image is not None:
                docker_agent, docker_rss, _ = idle_rss(stack, mods, "docker")
                result["agent_idle_rss_mb_docker"] = round(docker_rss, 1)
                docker_agent.stop()
                docker_agent.kill_modules()
            agent, rss, port = idle_rss(stack, mods, "process")
            result["agent_idle_rss_mb"] = round(rss, 1)
            if "memory" in parts:
                growth = rss_growth(stack, agent, hub_key, 500)
                result["agent_rss_after_first_change_mb"] = round(growth["first"], 1)
                result["agent_rss_after_500_changes_mb"] = round(growth["last"], 1)
                result["agent_rss_growth_mb"] = round(growth["last"] - growth["first"], 2)
            if "boot" in parts:
                say("offline boot")
                result["offline_boot_s"] = round(offline_boot(stack, agent, port, body), 3)
        if "install" in parts:
            say("installed size: device against full")
            result.update(install_size(root))
        result["targets"] = TARGETS
        result["targets_met"] = targets_met(result)
    except SystemExit:
        for agent in stack.agents[-2:]:
            text = agent.log.read_text(errors="replace")[-3000:] if agent.log.exists() else ""
            say(f"--- {agent.device_id} ---\n{text}")
        hub_log = root / "hub.log"
        say("--- hub ---\n" + (hub_log.read_text(errors="replace")[-2000:] if hub_log.exists() else ""))
        raise
    finally:
        stack.close()
        for proc in REGISTRY:
            proc.terminate()
        shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
