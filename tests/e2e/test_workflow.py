"""The whole workflow, end to end, the way a team uses edgepack: the ``edgepack`` CLI only,
against real parts — Mosquitto on the hub's generated accounts, ``edgepack hub serve``, a
container registry with the runtime image, Docker Engine, and devices each running ``edgepack
agent run`` with their own state and credentials (two docker devices, one process device, and a
fourth process device enrolled late).

The story (issue 10): register the digits model, build and sign a module from an Azure-ML-style
inferenceconfig.json and score.py, push it, deploy it to a tag selector and watch every device
go Transitioning → Healthy, score through every device against scikit-learn, deploy a second
service with Azure's one-command deploy, release a version that changes only score.py (one blob
moves, no client sees a failed request), release a broken one (every device keeps version 2 and
the service says Failed with the reason), revert, enroll a fourth device that gets the service
unasked, read a module's log and the dashboard, then delete it all and find nothing left.
"""

from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.sync_api import expect, sync_playwright

from tests.conftest import EXAMPLE
from tests.e2e.conftest import Device, Stack, port_free_on
from tests.load import Load
from tests.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("e2e")]

SERVICE = "digits-svc"
QUICK = "digits-quick"
SELECTOR = "site=plant-7"
TAGS = {"site": "plant-7"}
V2_MARK = '    return {\n        "predictions"'
BROKEN = "v3 cannot load its model (broken on purpose)"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]  # fmt: skip


# --- the team's Azure ML project ------------------------------------------------------------


def write_project(root: Path, model: Path, port: int) -> Path:
    """score.py in src/ (the inferenceconfig's sourceDirectory), the model in model/, the two
    configs beside them; the deploymentconfig as the example has it, on the test's port."""
    (root / "src").mkdir(parents=True)
    (root / "model").mkdir()
    shutil.copy(EXAMPLE / "score.py", root / "src" / "score.py")
    shutil.copy(model / "digits.onnx", root / "model" / "digits.onnx")
    inference = json.loads((EXAMPLE / "inferenceconfig.json").read_text())
    (root / "inferenceconfig.json").write_text(json.dumps({**inference, "sourceDirectory": "src"}, indent=2))
    deployment = json.loads((EXAMPLE / "deploymentconfig.json").read_text())
    (root / "deploymentconfig.json").write_text(json.dumps({**deployment, "port": port}, indent=2))
    return root


def edit_score(project: Path, old: str, new: str) -> None:
    score = project / "src" / "score.py"
    text = score.read_text()
    assert old in text
    score.write_text(text.replace(old, new))


def build_and_push(stack: Stack, project: Path, version: int) -> Path:
    stack.cli.run(
        "build", "--ic", str(project / "inferenceconfig.json"),
        "--dc", str(project / "deploymentconfig.json"), "-m", str(project / "model" / "digits.onnx"),
        "-n", "digits", "-v", str(version), "-o", str(project / "dist"), "--runtime-image", stack.runtime_ref,
    )  # fmt: skip
    bundle = project / "dist" / f"digits-{version}.edgepack"
    if version == 1:
        stack.cli.run("verify", str(bundle))
    stack.cli.run("push", str(bundle))
    return bundle


def deploy(stack: Stack, project: Path, version: int) -> None:
    stack.cli.run("deploy", "-n", SERVICE, "-m", f"digits:{version}",
                  "--dc", str(project / "deploymentconfig.json"), "--selector", SELECTOR)  # fmt: skip


# --- what the team looks at ------------------------------------------------------------------


def service_wait(stack: Stack, name: str = SERVICE, *, expect_code: int = 0) -> str:
    """``edgepack service wait`` in a pipe: a line per device state change."""
    done = stack.cli.run("service", "wait", name, "--timeout", "150", "--interval", "0.2",
                         check=False, timeout=200)  # fmt: skip
    if done.returncode != expect_code:
        raise AssertionError(f"service wait exited {done.returncode}:\n{done.stdout}\n{done.stderr}\n"
                             f"{stack.logs()}")  # fmt: skip
    return done.stdout


def states_seen(output: str, name: str, device_id: str) -> list[str]:
    """The states ``service wait`` printed for a device, in order."""
    lead = f"{name} on {device_id}: "
    return [line[len(lead):].split(" (")[0] for line in output.splitlines() if line.startswith(lead)]


def show(stack: Stack, name: str = SERVICE) -> dict[str, Any]:
    body: dict[str, Any] = stack.cli.json("service", "show", name)
    return body


def call(stack: Stack, url: str, request: Path) -> dict[str, Any]:
    answer: dict[str, Any] = json.loads(stack.cli.run("call", f"{url}/score", "--file", str(request)).stdout)
    return answer


def score(url: str, request: Path) -> dict[str, Any]:
    """What ``call`` does, in this process (a CLI run costs seconds on a busy machine)."""
    r = httpx.post(f"{url}/score", content=request.read_bytes(), timeout=30,
                   headers={"Content-Type": "application/json"})  # fmt: skip
    assert r.status_code == 200, r.text
    answer: dict[str, Any] = r.json()
    return answer


def version_of(answer: dict[str, Any]) -> int:
    return int(answer.get("version", 1))


# --- the story -------------------------------------------------------------------------------


def test_a_team_ships_digits_to_its_fleet_updates_it_and_takes_it_away(
    stack: Stack, digits_model: Path, digits_samples: dict[str, list[Any]]
) -> None:
    cli = stack.cli
    request = stack.root / "request.json"
    request.write_text(json.dumps({"data": digits_samples["data"]}))
    expected = digits_samples["expected"]  # scikit-learn's own predictions
    port, quick_port = (port_free_on(stack.addresses(4)) for _ in range(2))
    project = write_project(stack.root / "project", digits_model, port)

    # The fleet: two docker devices and a process device, enrolled with tags, agents running.
    fleet = [
        stack.device("edge-1", runtime="docker", tags={**TAGS, "line": "a"}).start(),
        stack.device("edge-2", runtime="docker", tags={**TAGS, "line": "b"}).start(),
        stack.device("edge-3", runtime="process", tags={**TAGS, "line": "c"}).start(),
    ]
    ids = [d.device_id for d in fleet]
    online = lambda: {d["id"] for d in cli.json("device", "list", "--selector", SELECTOR) if d["online"]}  # noqa: E731
    wait_for(lambda: online() == set(ids), timeout=60, what="the fleet online", interval=0.3,
             log=stack.logs)  # fmt: skip

    # 1. Register the model with tags; build, sign and push a module from the Azure ML files.
    cli.run("model", "register", "-n", "digits", "-p", str(project / "model" / "digits.onnx"),
            "--tag", "framework=onnx", "--tag", "dataset=sklearn-digits")  # fmt: skip
    models = cli.json("model", "list", "--tag", "framework=onnx")
    assert [(m["name"], str(m["version"])) for m in models] == [("digits", "1")]
    v1 = build_and_push(stack, project, 1)

    # 2. Deploy to the selector: service wait shows each device Transitioning, then Healthy.
    #    A process device is Healthy within half a second of the deploy, before a CLI started
    #    after it makes its first poll; so the agents are paused (SIGSTOP) until service wait
    #    has drawn its first state of every device.
    for device in fleet:
        device.pause()
    deploy(stack, project, 1)
    waiting = stack.cli.popen_text("service", "wait", SERVICE, "--timeout", "150", "--interval", "0.2")
    assert waiting.stdout is not None
    guard = threading.Timer(200, waiting.kill)  # a wait that hangs silently must not hang the test
    guard.start()
    first = [waiting.stdout.readline() for _ in fleet]
    assert sorted(line.split(": ")[0] for line in first) == [f"{SERVICE} on {i}" for i in ids], first
    for device in fleet:
        device.resume()
    rest, errors = waiting.communicate(timeout=200)
    guard.cancel()
    output = "".join(first) + rest
    assert waiting.returncode == 0, f"{output}\n{errors}\n{stack.logs()}"
    for device_id in ids:
        seen = states_seen(output, SERVICE, device_id)
        assert "Transitioning" in seen and seen[-1] == "Healthy", (device_id, output)
        assert seen.index("Transitioning") < len(seen) - 1, (device_id, output)
    shown = show(stack)
    assert shown["state"] == "Healthy" and sorted(d["device_id"] for d in shown["devices"]) == ids
    runtimes = {d.device_id: (d.service(SERVICE) or {}).get("runtime") for d in fleet}
    assert runtimes == dict(zip(ids, ["docker", "docker", "process"], strict=True))

    # 3. Every device's endpoint answers what scikit-learn predicted.
    for device in fleet:
        assert call(stack, device.url(port), request)["predictions"] == expected, device.device_id

    # Azure's one-command deploy, as a second service on the process device: the registered
    # model and the entry script's folder become a module, signed, sent and deployed.
    quick_dc = stack.root / "quick-deploymentconfig.json"
    quick_dc.write_text(json.dumps({"computeType": "local", "port": quick_port}))
    made = cli.run("deploy", "-n", QUICK, "-m", "digits:1", "--ic", str(project / "inferenceconfig.json"),
                   "--dc", str(quick_dc), "--target", f"device:{ids[2]}")  # fmt: skip
    assert f"built module {QUICK}:1 from digits:1" in made.stdout, made.stdout
    assert "Healthy on 1 device(s)" in service_wait(stack, QUICK)
    assert call(stack, fleet[2].url(quick_port), request)["predictions"] == expected
    cli.run("service", "delete", QUICK, "--yes")

    # 4. Version 2 changes score.py only: each device fetches that one blob, and clients
    #    calling all through the update never see a failed request.
    before = {d.device_id: d.status()["downloads"] for d in fleet}
    edit_score(project, V2_MARK, '    return {\n        "version": 2,\n        "predictions"')
    v2 = build_and_push(stack, project, 2)
    files = [{f["path"]: f["digest"] for f in cli.json("inspect", str(b))["signed"]["files"]}
             for b in (v1, v2)]  # fmt: skip
    assert [p for p in files[0] if files[0][p] != files[1].get(p)] == ["src/score.py"]
    body = json.dumps({"data": digits_samples["data"][:1]}).encode()
    loads = [Load(port, body, version_of, clients=1, host=d.address) for d in fleet]
    for load in loads:
        load.__enter__()
    try:
        deploy(stack, project, 2)
        service_wait(stack)
        for load in loads:
            wait_for(lambda load=load: load.last[-3:] == [2, 2, 2], timeout=30,  # type: ignore[misc]
                     what="version 2 answering", interval=0.3, log=stack.logs)  # fmt: skip
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    for device, load in zip(fleet, loads, strict=True):
        assert load.failures == [], (device.device_id, load.failures[:5])
        assert load.answers[1] > 0 and load.answers[2] > 0, (device.device_id, load.answers)
    score_size = (project / "src" / "score.py").stat().st_size
    for device in fleet:
        after = device.status()["downloads"]
        moved = {k: after[k] - before[device.device_id][k] for k in after}
        assert moved == {"manifests": 1, "blobs": 1, "bytes": score_size}, (device.device_id, before, after)
        assert score(device.url(port), request)["predictions"] == expected

    # 5. A broken version 3 (init() raises): every device rolls back to 2, the service says
    #    Failed with the reason, and version 2 keeps answering.
    edit_score(project, "def init():\n", f"def init():\n    raise RuntimeError({BROKEN!r})\n")
    build_and_push(stack, project, 3)
    loads = [Load(port, body, version_of, clients=1, host=d.address) for d in fleet]
    for load in loads:
        load.__enter__()
    try:
        deploy(stack, project, 3)
        service_wait(stack, expect_code=5)
    finally:
        for load in loads:
            load.__exit__(None, None, None)
    for device, load in zip(fleet, loads, strict=True):
        assert load.failures == [] and set(load.answers) == {2}, (device.device_id, load.answers)
    shown = show(stack)
    assert shown["state"] == "Failed", shown
    for row in shown["devices"]:
        assert row["state"] == "Failed" and BROKEN in (row["reason"] or ""), row
    for device in fleet:
        assert (device.service(SERVICE) or {}).get("serving_version") == "2", device.peek()
        answer = score(device.url(port), request)
        assert version_of(answer) == 2 and answer["predictions"] == expected

    # The team reverts the release to version 2, which serves already.
    deploy(stack, project, 2)
    service_wait(stack)

    # 6. A fourth device whose tags match gets the service without anyone deploying again.
    edge4 = stack.device("edge-4", runtime="process", tags={**TAGS, "line": "d"}).start()
    output = service_wait(stack)
    assert states_seen(output, SERVICE, edge4.device_id)[-1] == "Healthy", output
    everyone = [*fleet, edge4]
    assert sorted(d["device_id"] for d in show(stack)["devices"]) == sorted(d.device_id for d in everyone)
    answer = score(edge4.url(port), request)
    assert version_of(answer) == 2 and answer["predictions"] == expected

    # 7. A module's log through the hub, from a docker device and from a process device, and
    #    the dashboard with the four devices, their states and charts of real telemetry.
    for device in (fleet[0], edge4):
        logs = cli.run("service", "logs", SERVICE, "--device", device.device_id, "--tail", "50").stdout
        assert "model loaded from" in logs, (device.device_id, logs)
    for device in everyone:  # requests for the charts to count
        for _ in range(3):
            score(device.url(port), request)
    check_dashboard(stack, everyone)

    # 8. Delete the service and the model: modules stop, files leave the devices and the hub.
    assert all(files_under(d.state_dir / "cache") for d in everyone)
    assert files_under(stack.hub_data / "blobs")
    pids = [(d.service(SERVICE) or {}).get("pid") for d in everyone if d.runtime == "process"]
    assert all(pids), pids
    cli.run("service", "delete", SERVICE, "--yes")
    for device in everyone:
        wait_for(lambda device=device: not device.peek()["services"], timeout=60,  # type: ignore[misc]
                 what=f"{SERVICE} to leave {device.device_id}", interval=0.3, log=stack.logs)  # fmt: skip
    for device in everyone:
        with pytest.raises(httpx.TransportError):
            httpx.post(f"{device.url(port)}/score", content=body, timeout=5)
        assert files_under(device.state_dir / "cache") == [], device.device_id
    for device in fleet[:2]:
        assert containers_of(device) == [], device.device_id
    for pid in pids:
        assert not Path(f"/proc/{pid}").exists(), f"module process {pid} still runs"
    for ref in ("digits:1", "digits:2", "digits:3", f"{QUICK}:1"):
        cli.run("module", "delete", ref)
    cli.run("model", "delete", "digits:1")
    cli.run("hub", "gc", "--grace", "0")
    assert cli.json("model", "list") == [] and cli.json("module", "list") == []
    assert files_under(stack.hub_data / "blobs") == []


def files_under(folder: Path) -> list[Path]:
    assert folder.is_dir(), folder
    return [p for p in folder.rglob("*") if p.is_file()]


def containers_of(device: Device) -> list[str]:
    import docker

    client = docker.from_env()
    try:
        found = client.containers.list(all=True, filters={"label": f"edgepack.device={device.device_id}"})
        return [c.name for c in found]
    finally:
        client.close()


def check_dashboard(stack: Stack, devices: list[Device]) -> None:
    """What the dashboard shows (kept in one place: its markup may change): every device, the
    service's state on each, and charts drawn from the devices' telemetry."""
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            page = browser.new_context().new_page()
            page.goto(stack.url + "/")
            page.fill("#token", stack.admin_token)
            page.click("#login button[type=submit]")
            expect(page.locator("#main")).to_be_visible()
            expect(page.locator("#devices tr[data-device]")).to_have_count(len(devices))
            for device in devices:
                expect(page.locator(f"#devices tr[data-device='{device.device_id}']")).to_be_visible()
                row = page.locator(f"#services tr[data-service='{SERVICE}']")
                state = row.locator(f"li[data-device='{device.device_id}']")
                expect(state).to_have_attribute("data-state", "Healthy")
            chart = page.locator(f"[data-chart='{SERVICE} requests/s']")
            expect(chart).to_contain_text("req/s", timeout=30_000)
            # A uPlot chart (a canvas) of at least one point of the devices' telemetry.
            expect(chart).to_have_attribute("data-points", re_nonempty(), timeout=30_000)
            expect(chart).not_to_have_attribute("data-points", "0")
            expect(chart.locator("canvas")).to_have_count(1)
        finally:
            browser.close()


def re_nonempty() -> Any:
    import re

    return re.compile(r"\d")
