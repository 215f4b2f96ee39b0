"""A device installs ``edgepack`` without the hub's packages (and without the docker SDK unless
it runs docker modules): the agent and the CLI's device commands load none of them, and a
command that needs an extra this install lacks says so in one line.

Each test runs a real ``python`` in which every package of an extra fails to import, as in a
base install (``manifests.extras.EXTRA_OF_IMPORT``), and checks what it loaded or printed.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from manifests.extras import EXTRA_OF_IMPORT
from tests.conftest import REPO

#: Installed before anything of ours loads: the packages of these extras are not there.
LACKING = textwrap.dedent(
    """
    import importlib.abc, sys

    class _NotInstalled(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".", 1)[0] in {lacking!r}:
                raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
            return None

    sys.meta_path.insert(0, _NotInstalled())
    """
)


def _python(code: str, lacking: set[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    script = LACKING.format(lacking=sorted(lacking)) + textwrap.dedent(code)
    env = {**os.environ, "PYTHONPATH": str(REPO), "EDGEPACK_HOME": str(cwd / "home")}
    return subprocess.run(
        [sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120
    )


def _cli(argv: list[str], lacking: set[str], *, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _python(
        f"from packager.cli import main\nsys.argv = ['edgepack', *{argv!r}]\nmain()\n", lacking, cwd=cwd
    )


ALL_EXTRAS = set(EXTRA_OF_IMPORT)


def test_the_agent_and_the_cli_load_no_package_of_an_extra(tmp_path: Path) -> None:
    done = _python(
        """
        import packager.cli, edge_agent.__main__, edge_agent.daemon, edge_agent.scoring.server
        import edge_agent.runtime.process, edge_agent.uplink.mqtt, edge_agent.uplink.http
        from manifests.extras import extra_for
        print(sorted(m for m in sys.modules if extra_for(m)))
        """,
        ALL_EXTRAS,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_device_commands_work_in_a_base_install(tmp_path: Path) -> None:
    credentials = tmp_path / "edge-1.json"
    credentials.write_bytes((REPO / "manifests/examples/device-credentials.json").read_bytes())
    credentials.chmod(0o600)
    done = _cli(
        ["agent", "init", "--credentials", str(credentials), "--state-dir", str(tmp_path / "state"),
         "--out", str(tmp_path / "agent.toml")],
        ALL_EXTRAS, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "agent.toml").is_file()
    assert _cli(["--help"], ALL_EXTRAS, cwd=tmp_path).returncode == 0


def test_a_hub_command_without_the_hub_extra_is_one_line_naming_it(tmp_path: Path) -> None:
    done = _cli(["hub", "serve", "--data-dir", str(tmp_path / "hub")], ALL_EXTRAS, cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("error: the hub needs the package ")
    assert lines[0].endswith("pip install 'edgepack[hub]'")


def test_the_docker_runtime_without_the_docker_sdk_is_one_line_naming_the_extra(tmp_path: Path) -> None:
    done = _python(
        f"""
        from manifests.device import AgentConfig
        from manifests.desired import RuntimeKind
        from manifests.errors import ConfigError
        from edge_agent.daemon import build_runtimes
        config = AgentConfig(credentials={str(tmp_path / "c.json")!r}, state_dir={str(tmp_path)!r},
                             runtimes=[RuntimeKind.DOCKER])
        try:
            build_runtimes(config, "edge-1")
        except ConfigError as exc:
            print(exc)
        """,
        {"docker"},
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == (
        "runtime 'docker' in agent.toml: the docker runtime and runtime images needs the package "
        "'docker', which this install lacks: pip install 'edgepack[docker]'"
    )
