"""Entry scripts with chosen behaviour, for the agent tests (stdlib only, so they start fast).

Each is a stock Azure-ML-style script; :func:`files` pairs one with the one-number model the
forge's default module uses (``{"factor": N}``).
"""

from __future__ import annotations

from manifests.canonical import canonical_json
from tests.factory import SCORE_PY

#: init() fails: the version never becomes ready
FAILING_INIT = b'''\
def init():
    raise RuntimeError("model could not be loaded: weights are corrupt")


def run(raw_data):
    return raw_data
'''

#: serves, then the process dies 0.3 s later, every time (a crash loop)
CRASHES_AFTER_START = SCORE_PY + b'''

import os as _os
import threading as _threading

_init = init


def init():
    _init()
    print("about to crash", flush=True)
    _threading.Timer(0.3, lambda: _os._exit(3)).start()
'''

#: dies 0.3 s after its first start only (a marker file, named by CRASH_MARKER, remembers)
CRASHES_ONCE = SCORE_PY + b'''

import os as _os
import threading as _threading

_init = init


def init():
    _init()
    marker = _os.environ["CRASH_MARKER"]
    if not _os.path.exists(marker):
        open(marker, "w").close()
        _threading.Timer(0.3, lambda: _os._exit(3)).start()
'''

#: run() with {"data": ["hang"]} blocks the server's event loop: it stops answering probes
HANGS_ON_REQUEST = SCORE_PY + b'''

import time as _time

_run = run


def run(raw_data):
    if "hang" in raw_data:
        _time.sleep(3600)
    return _run(raw_data)
'''


def files(script: bytes = SCORE_PY, factor: int = 2, *, padding: bytes = b"") -> dict[str, bytes]:
    """A module's files: ``script`` as src/score.py and the factor model (optionally a large
    extra model file, for downloads that take a while)."""
    out = {"src/score.py": script, "model/model.json": canonical_json({"factor": factor})}
    if padding:
        out["model/weights.bin"] = padding
    return out
