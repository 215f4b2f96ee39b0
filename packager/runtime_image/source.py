"""The edgepack source tree the thin layer is made from: where it is, a digest of it, its wheel.

The digest covers exactly what goes into the wheel (``pyproject.toml``, the README it names,
and every file of the packages ``[tool.setuptools.packages.find]`` includes), so any change
to edgepack's code makes a new thin layer and nothing else does.
"""

from __future__ import annotations

import fnmatch
import hashlib
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import packager
from manifests.errors import ConfigError, EdgepackError

_SKIP_DIRS = {"__pycache__"}
_SKIP_SUFFIXES = {".pyc", ".pyo"}


def find_source_tree() -> Path:
    """The checkout this edgepack runs from (editable install or ``PYTHONPATH``)."""
    root = Path(packager.__file__).resolve().parent.parent
    if not _is_edgepack_tree(root):
        raise ConfigError(
            f"{root}: not an edgepack source checkout (no pyproject.toml for edgepack there); the "
            "runtime image is built from the source: run this command from a clone's environment "
            "(pip install -e .)"
        )
    return root


def _is_edgepack_tree(root: Path) -> bool:
    try:
        project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError):
        return False
    return bool(project.get("project", {}).get("name") == "edgepack")


def source_files(root: Path) -> list[str]:
    """The paths (relative, POSIX, sorted) of every file the wheel is built from."""
    project = tomllib.loads((root / "pyproject.toml").read_text(encoding="utf-8"))
    find = project.get("tool", {}).get("setuptools", {}).get("packages", {}).get("find", {})
    patterns = find.get("include")
    if not patterns:
        raise ConfigError(f"{root}/pyproject.toml: no [tool.setuptools.packages.find] include list")
    files = ["pyproject.toml"]
    readme = project.get("project", {}).get("readme")
    if isinstance(readme, str) and (root / readme).is_file():
        files.append(readme)
    for top in sorted(p for p in root.iterdir() if p.is_dir() and (p / "__init__.py").is_file()):
        if not any(fnmatch.fnmatch(top.name, pattern) for pattern in patterns):
            continue
        for path in sorted(top.rglob("*")):
            rel = path.relative_to(root)
            if path.is_file() and path.suffix not in _SKIP_SUFFIXES and not _SKIP_DIRS & set(rel.parts):
                files.append(rel.as_posix())
    return sorted(files)


def source_digest(root: Path, files: list[str]) -> str:
    """sha256 over each file's path and content, in order."""
    h = hashlib.sha256()
    for rel in files:
        content = (root / rel).read_bytes()
        h.update(f"{rel}\0{len(content)}\0".encode())
        h.update(content)
    return "sha256:" + h.hexdigest()


def build_wheel(root: Path, files: list[str], out: Path, log: Path) -> Path:
    """``pip wheel --no-deps`` of a copy of exactly ``files`` (so the checkout gets no
    ``build/`` folder and two builds at once cannot trip over each other); returns the wheel."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgepack-wheel-src-") as tmp:
        src = Path(tmp) / "edgepack"
        for rel in files:
            (src / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(root / rel, src / rel)
        with log.open("ab") as fh:
            # The trailing "/" makes pip read a folder, never a project name on an index.
            done = subprocess.run(
                [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check",
                 "--no-deps", "--wheel-dir", str(out), f"{src}/"],
                stdout=fh, stderr=subprocess.STDOUT, check=False,
            )  # fmt: skip
    if done.returncode != 0:
        raise EdgepackError(
            f"building the edgepack wheel failed (exit code {done.returncode}); the log is in {log} "
            "(pip needs setuptools>=69 and wheel from the package index or its cache)"
        )
    wheels = sorted(out.glob("edgepack-*.whl"))
    if len(wheels) != 1:
        raise EdgepackError(f"{out}: expected one edgepack wheel, found {len(wheels)}")
    return wheels[0]
