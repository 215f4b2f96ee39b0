"""Fixtures shared by every test: keys, the trained digits model and its signed bundle.

Each fixture builds real things (real Ed25519 keys, a real ONNX model trained on
scikit-learn's bundled digits data, a real signed bundle); nothing here is a mock.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from manifests.signing import TrustStore, generate_private_key
from packager.build import BuildSpec, build_module
from tests.engines import free_port, free_ports  # noqa: F401  (re-exported: fixtures import them from here)

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "digits"


def pytest_configure(config: pytest.Config) -> None:
    """Refuse ``--dist loadgroup`` where it would not group: the tests of an ``xdist_group``
    share one engine a worker (a RabbitMQ cluster, pushed foreign images), and from pytest 9.2
    on, pytest-xdist 3.8 drops the groups without a word (pytest-xdist#1386): each worker then
    started its own engines."""
    if config.getoption("dist", "no") == "loadgroup" and pytest.version_tuple[:2] >= (9, 2):
        raise pytest.UsageError(
            f"pytest {pytest.__version__} makes --dist loadgroup ignore xdist_group marks: "
            "install the ranges in pyproject.toml (pip install -e '.[test]')"
        )


@dataclass
class Publisher:
    key: Ed25519PrivateKey
    trust: TrustStore


def make_publisher() -> Publisher:
    key = generate_private_key()
    return Publisher(key=key, trust=TrustStore().with_key(key.public_key(), name="test"))


@pytest.fixture(scope="session")
def publisher() -> Publisher:
    return make_publisher()


@pytest.fixture(scope="session")
def digits_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Folder with digits.onnx and test_samples.json, trained for this test session."""
    out = tmp_path_factory.mktemp("digits-model")
    subprocess.run(
        [sys.executable, str(EXAMPLE / "train.py"), "--out", str(out)],
        check=True,
        capture_output=True,
    )
    return out


@pytest.fixture(scope="session")
def digits_samples(digits_model: Path) -> dict[str, list[object]]:
    samples: dict[str, list[object]] = json.loads((digits_model / "test_samples.json").read_text())
    return samples


@pytest.fixture(scope="session")
def digits_source(tmp_path_factory: pytest.TempPathFactory, digits_model: Path) -> Path:
    """A copy of examples/digits with the freshly trained model beside score.py."""
    src = tmp_path_factory.mktemp("digits-src")
    for name in ("score.py", "inferenceconfig.json", "deploymentconfig.json"):
        shutil.copy(EXAMPLE / name, src / name)
    shutil.copy(digits_model / "digits.onnx", src / "digits.onnx")
    return src


@pytest.fixture(scope="session")
def digits_bundle(
    tmp_path_factory: pytest.TempPathFactory, digits_source: Path, publisher: Publisher
) -> Path:
    """A signed ``digits-1.edgepack`` built from the example."""
    out = tmp_path_factory.mktemp("dist")
    spec = BuildSpec(
        name="digits",
        version="1",
        entry_script=digits_source / "score.py",
        model=digits_source / "digits.onnx",
        requirements=["onnxruntime", "numpy"],
    )
    return build_module(spec, publisher.key, out).path


# Last: they import REPO and free_port from here. Once per session, so one registry a worker.
from tests.docker_fixtures import *  # noqa: E402, F403  (docker_engine, registry, runtime_image)
