"""What the docker runtime asks of a module's image, and how it words a refusal (pure parts of
``edge_agent.runtime.docker`` and ``edge_agent.scoring.image_check``; the real thing runs in
tests/agent/test_custom_images.py)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from edge_agent.cache.modules import InstalledModule
from edge_agent.runtime.base import requirement_names
from edge_agent.runtime.docker import image_problem, required_packages
from edge_agent.scoring.image_check import BOOTSTRAP, SERVER_PACKAGES, check
from manifests.bounds import MAX_REASON
from tests.conftest import REPO
from tests.factory import Forge

IMAGE = "acme/py:1"


def installed(files: dict[str, bytes], requirements: list[str]) -> InstalledModule:
    manifest = Forge().manifest(files=files, runtime={"python": {"requirements": requirements}})
    return InstalledModule(dir=Path("/nowhere"), manifest=manifest, manifest_digest="sha256:" + "0" * 64)


def test_an_old_python_is_refused_naming_both_versions() -> None:
    reason = image_problem(IMAGE, {"python": "3.9.2"})
    assert reason == "image acme/py:1 has Python 3.9.2; edgepack needs >= 3.11"


def test_missing_packages_are_named_in_one_line_with_what_to_do() -> None:
    answer = {"python": "3.11.2", "missing": ["uvicorn", "onnxruntime"], "broken": [], "server": None}
    assert image_problem(IMAGE, answer) == (
        "image acme/py:1 lacks python packages: onnxruntime, uvicorn (pip install them into the image)"
    )
    broken = {"python": "3.12.1", "missing": [], "broken": ["onnxruntime (ImportError: libgomp.so.1)"]}
    assert image_problem(IMAGE, broken) == (
        "image acme/py:1 has python packages that do not import: onnxruntime (ImportError: libgomp.so.1)"
    )
    why = "ImportError: cannot import name 'ConfigDict'"
    server = {"python": "3.11.2", "missing": [], "broken": [], "server": why}
    assert image_problem(IMAGE, server) == (
        "image acme/py:1: edgepack's scoring server does not import with its Python 3.11.2: "
        "ImportError: cannot import name 'ConfigDict'"
    )
    assert image_problem(IMAGE, {"python": "3.11.2", "missing": [], "broken": [], "server": None}) is None


def test_scoring_code_the_container_cannot_read_is_named_with_its_folders() -> None:
    # What the bootstrap prints when the mounted code does not import (its folders unreadable).
    done = subprocess.run(
        [sys.executable, "-I", "-S", "-c", BOOTSTRAP], capture_output=True, text=True, timeout=60,
        check=True, cwd="/",
    )  # fmt: skip
    answer = json.loads(done.stdout)
    assert answer["code"] == "ModuleNotFoundError: No module named 'edge_agent'"
    reason = image_problem(IMAGE, answer)
    assert reason is not None and reason.startswith(
        "image acme/py:1: the agent's scoring code mounted at /opt/edgepack-scoring does not import "
        "(ModuleNotFoundError: No module named 'edge_agent'); its folders ("
    )
    assert f"{REPO / 'edge_agent'}, {REPO / 'manifests'}) must be readable by uid 10001" in reason


def test_a_thousand_missing_requirements_still_fit_a_reported_reason() -> None:
    names = [f"package-number-{i}" for i in range(1000)]
    broken = [f"{n} (ImportError: {'x' * 300})" for n in names]
    image = "registry.example/" + "a" * 1000 + ":1"  # as long as a manifest allows
    reason = image_problem(image, {"python": "3.11.2", "missing": names, "broken": broken})
    assert reason is not None and len(reason) < MAX_REASON - 200  # room for "version N failed: …"
    assert "package-number-0, package-number-1, " in reason
    assert " more (pip install them into the image)" in reason


def test_what_an_image_prints_reaches_the_reason_as_one_clean_line() -> None:
    # The verdict comes from the image: control characters or odd shapes never break the report.
    answer = {"python": "3.11\x1b[2J", "missing": ["evil\npkg", 7], "broken": "not a list", "server": None}
    reason = image_problem(IMAGE, answer)
    assert reason == "image acme/py:1 lacks python packages: 7, evil pkg (pip install them into the image)"
    old = image_problem(IMAGE, {"python": "2.7.18\r\n" + "9" * 5000})
    assert old is not None and len(old) < 120 and "\r" not in old and "\n" not in old


def test_an_onnx_model_needs_onnxruntime_and_declared_requirements_are_checked_by_name() -> None:
    plain = installed({"src/score.py": b"", "model/model.json": b"{}"}, [])
    assert required_packages(plain) == (SERVER_PACKAGES, ())
    onnx = installed(
        {"src/score.py": b"", "model/digits.onnx": b"onnx"},
        ["onnxruntime>=1.18", "numpy", "scikit-learn[alldeps]==1.5; python_version>'3'", "numpy<3"],
    )
    assert required_packages(onnx) == ((*SERVER_PACKAGES, "onnxruntime"), ("numpy", "scikit-learn"))
    assert requirement_names(["uvicorn[standard]>=0.30", " orjson", "uvicorn"]) == ["uvicorn", "orjson"]


def test_the_check_tells_missing_from_broken_packages(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fails_to_load.py").write_text("raise OSError('libfoo.so: cannot open shared object file')\n")
    (tmp_path / "needs_other.py").write_text("import no_such_dependency_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    modules = ["json", "no_such_module_xyz", "fails_to_load", "needs_other"]
    answer = check(modules, ["pydantic", "no-such-dist-xyz"])
    assert answer["python"] == ".".join(map(str, sys.version_info[:3]))
    assert answer["missing"] == ["no_such_module_xyz", "no-such-dist-xyz"]
    assert answer["broken"] == [
        "fails_to_load (OSError: libfoo.so: cannot open shared object file)",
        "needs_other (ModuleNotFoundError: No module named 'no_such_dependency_xyz')",
    ]
    assert answer["server"] is None  # only tried once every package imports


def test_the_bootstrap_runs_the_check_in_a_fresh_interpreter() -> None:
    # What the check container runs, with this machine's python3 and this checkout as the mount.
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r}); exec({BOOTSTRAP!r})",
         "orjson", "no_such_module_xyz", "--", "pydantic"],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    assert answer["missing"] == ["no_such_module_xyz"] and answer["broken"] == []
    # The version check comes first, in syntax an old Python 3 still parses.
    ast.parse(BOOTSTRAP, feature_version=(3, 4))


def test_the_check_covers_every_third_party_package_the_scoring_server_imports() -> None:
    # The modules of ours the server loads, then every import statement in them.
    listing = subprocess.run(
        [sys.executable, "-c", "import sys, edge_agent.scoring.__main__, edge_agent.scoring.server; "
         "print('\\n'.join(m.__file__ for n, m in list(sys.modules.items()) "
         "if n.split('.')[0] in ('edge_agent', 'manifests') and getattr(m, '__file__', None)))"],
        capture_output=True, text=True, timeout=60, check=True, cwd=REPO,
    )  # fmt: skip
    third_party: set[str] = set()
    for path in listing.stdout.split():
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in sys.stdlib_module_names and top not in ("edge_agent", "manifests"):
                    third_party.add(top)
    # inference_schema is the entry script's, imported only when the script uses it.
    assert third_party - {"inference_schema"} <= set(SERVER_PACKAGES), third_party
