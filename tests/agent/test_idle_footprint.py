"""What an idle agent carries (issue 21): a device runs the agent for months, mostly idle, so
what only a rare path needs is loaded by that path. Checked on the real thing: an agent process
against a real hub and Mosquitto, serving one module, with Python's own import log
(``PYTHONPROFILEIMPORTTIME``) saying what it ever imported. The resident set itself is measured
by ``bench/agent.py`` (``agent_idle_rss_mb``), not here: a number that flakes is no test."""

from __future__ import annotations

import re
import subprocess
import sys

from edge_agent.uplink.tls import client_context
from manifests.device import DeviceCredentials
from tests.agent.conftest import Agent, Fleet, free_port, wait_for

#: what an idle agent serving one process module must not have imported, and what loads it
NOT_AT_IDLE = {
    "manifests.data": "the first collected batch to upload (most devices collect no data)",
    "gzip": "the first collected batch to upload",
    "edge_agent.scoring.collector": "the scoring server, in the module's process",
    "cryptography.x509": "the first TLS service's certificate",
    "docker": "a device whose agent.toml enables the docker runtime",
    "edge_agent.runtime.docker": "a device whose agent.toml enables the docker runtime",
    "httpx": "the CLI",
    "typer": "the CLI",
    "rich": "the CLI",
    "fastapi": "the hub",
    "sqlalchemy": "the hub",
    "uvicorn": "the scoring server, in the module's process",
    "numpy": "ONNX modules, in the module's process",
    "onnxruntime": "ONNX modules, in the module's process",
}

IMPORT_LINE = re.compile(r"^import time:\s+\d+ \|\s+\d+ \|\s+(\S+)\s*$", re.MULTILINE)


def imported(agent: Agent) -> set[str]:
    return set(IMPORT_LINE.findall(agent.log()))


def test_an_idle_agent_serving_a_module_has_not_loaded_what_only_rare_paths_need(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", log_level="debug").start(env={"PYTHONPROFILEIMPORTTIME": "1"})
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    fleet.wait_rollup("demo", "Healthy")  # reported: the report path ran too

    # the module was downloaded, verified and started: every path of a deploy ran
    modules = imported(agent)
    assert {"edge_agent.download.module", "cryptography.hazmat.primitives.asymmetric.ed25519"} <= modules
    loaded = {name: why for name, why in NOT_AT_IDLE.items() if name in modules}
    assert not loaded, f"an idle agent imported what only these need: {loaded}"


def test_once_its_operations_end_the_agent_hands_freed_heap_back(fleet: Fleet) -> None:
    agent = fleet.device("edge-1", log_level="debug").start()
    port = free_port()
    fleet.deploy("demo", fleet.push("demo", "1"), port=port, devices=["edge-1"])
    agent.wait_state("demo", "Healthy")
    # once at the start (imports, the cache read), once after the deployment's operations
    wait_for(lambda: agent.log().count("settled: heap trimmed (True)") >= 2, what="two trims", log=agent.log)


#: counts the OpenSSL contexts made while the agent's code is imported
COUNT_TLS_CONTEXTS = """
import ssl
made = []
make = ssl.SSLContext.__new__
def counting(cls, *args, **kwargs):
    made.append(cls)
    return make(cls, *args, **kwargs)
ssl.SSLContext.__new__ = counting
ssl.create_default_context()
assert made, "the count sees the contexts made"
made.clear()
import edge_agent.daemon
print(len(made))
"""


def test_importing_the_agent_makes_no_tls_context() -> None:
    # each holds about 1 MB; the probe's loopback one is for TLS services only, made with the first
    out = subprocess.run([sys.executable, "-c", COUNT_TLS_CONTEXTS], capture_output=True, text=True)
    assert (out.returncode, out.stdout.strip()) == (0, "0"), out.stderr


def test_the_hub_and_broker_links_share_one_tls_context(fleet: Fleet) -> None:
    agent = fleet.device("edge-1")
    credentials = DeviceCredentials.model_validate(agent.credentials)
    again = DeviceCredentials.model_validate(agent.credentials)  # read anew, as each link does
    assert client_context(credentials) is client_context(again)
