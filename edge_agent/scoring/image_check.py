"""Whether a container image can run the scoring server: run inside the image, before the server.

The docker runtime runs the agent's own scoring server (``edge_agent`` and ``manifests``,
mounted read-only) with whatever ``python3`` the module's image has, so that any image with a
compatible Python serves, not only edgepack's own. Before the first instance of a module starts
in an image, the agent runs ``python3 -c BOOTSTRAP MODULE... -- DIST...`` in it:
:data:`BOOTSTRAP` checks the interpreter's version in syntax every Python 3 reads, then hands
over to :func:`main`, which tries to import the packages the scoring server (and the module's
model) needs, looks up the module's declared requirements, and prints one JSON line:

``{"python": "3.11.2", "missing": [...], "broken": [...], "server": null}``

(or ``{"python": ..., "code": ...}`` when the mounted code itself does not import, e.g. its
folders are not readable by the container's user). ``missing`` are names that do not import
(or distributions not installed), ``broken`` names
that are there but fail to import (with the error), ``server`` why the scoring server itself
does not import when every package does (e.g. a pydantic 1 in the image). The agent turns the
line into a verdict (``edge_agent.runtime.docker``). Only the standard library is used here.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import sys
from collections.abc import Sequence

#: The oldest Python the scoring server runs on (``datetime.UTC``, ``enum.StrEnum``,
#: ``typing.Self``-era syntax in ``manifests``): pyproject.toml's ``requires-python``.
MIN_PYTHON = (3, 11)

#: Third-party packages the scoring server imports itself (``edge_agent.scoring`` and the parts
#: of ``manifests`` it loads), by import name; each is also its pip name.
SERVER_PACKAGES = ("uvicorn", "httptools", "uvloop", "orjson", "pydantic", "cryptography")

#: What a model file needs: the module's files with this suffix are scored with onnxruntime.
MODEL_PACKAGES = {".onnx": "onnxruntime"}

#: Cut of an import error's text in the verdict (one line in a reported reason).
MAX_ERROR_CHARS = 200

#: Run with ``python3 -c``: the version check first, in syntax any Python 3 parses, so an
#: image with an old Python gets a verdict naming it instead of a SyntaxError.
BOOTSTRAP = (
    "import json, sys\n"
    "python = '.'.join(str(p) for p in sys.version_info[:3])\n"
    f"if sys.version_info[:2] < {MIN_PYTHON!r}:\n"
    "    print(json.dumps({'python': python}))\n"
    "    sys.exit(0)\n"
    "try:\n"
    "    from edge_agent.scoring.image_check import main\n"
    "except ImportError as exc:\n"  # the mounted code is not readable by the container's user
    "    print(json.dumps({'python': python, 'code': '%s: %s' % (type(exc).__name__, exc)}))\n"
    "    sys.exit(0)\n"
    "sys.exit(main(sys.argv[1:]))\n"
)

#: Separates the import names from the distribution names on the command line.
SEPARATOR = "--"


def _one_line(exc: BaseException) -> str:
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= MAX_ERROR_CHARS else text[: MAX_ERROR_CHARS - 1] + "…"


def check(modules: Sequence[str], distributions: Sequence[str]) -> dict[str, object]:
    """Try every import and distribution; the verdict :func:`main` prints."""
    missing: list[str] = []
    broken: list[str] = []
    for name in modules:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
                missing.append(name)  # the package itself is not there
            else:
                broken.append(f"{name} ({_one_line(exc)})")  # one of its own imports is missing
        except Exception as exc:  # a package that is there but fails to load (a wrong ABI)
            broken.append(f"{name} ({_one_line(exc)})")
    for name in distributions:
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            if name not in missing:
                missing.append(name)
    server = None
    if not missing and not broken:
        try:
            importlib.import_module("edge_agent.scoring.server")
        except Exception as exc:  # whatever stops the server is the verdict
            server = _one_line(exc)
    return {
        "python": ".".join(str(p) for p in sys.version_info[:3]),
        "missing": missing,
        "broken": broken,
        "server": server,
    }


def main(argv: Sequence[str]) -> int:
    args = list(argv)
    cut = args.index(SEPARATOR) if SEPARATOR in args else len(args)
    print(json.dumps(check(args[:cut], args[cut + 1 :])), flush=True)
    return 0
