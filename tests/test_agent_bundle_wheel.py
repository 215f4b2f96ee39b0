"""Building the edgepack wheel for an agent bundle from one checkout, twice at once.

setuptools builds in the source tree (``build/``, ``*.egg-info``): two builds at once (two
``edgepack hub agent-bundle build``, or two test workers) deleted each other's files and one
failed with "Failed to build one or more wheels". Builds from one tree now take turns.
"""

from __future__ import annotations

import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from packager.agent_bundle import build_edgepack_wheel
from tests.conftest import REPO


def test_two_wheel_builds_from_one_tree_at_once_both_succeed(tmp_path: Path) -> None:
    outs = [tmp_path / f"out-{i}" for i in range(3)]
    for out in outs:
        out.mkdir()
    with ThreadPoolExecutor(len(outs)) as pool:
        wheels = list(pool.map(lambda out: build_edgepack_wheel(REPO, out), outs))
    for wheel in wheels:
        names = zipfile.ZipFile(wheel).namelist()
        assert "edge_agent/daemon.py" in names and "cloud_hub/install/install.sh" in names, names[:20]
