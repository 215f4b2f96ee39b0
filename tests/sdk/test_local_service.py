"""``LocalService``: a module served on this machine, in a ``with`` block, by the real server."""

from __future__ import annotations

import socket
from pathlib import Path

import httpx
import pytest

from manifests.errors import ModuleStartFailure, RuntimeFailure, TrustError
from manifests.signing import public_key_pem
from packager.sdk import LocalService
from tests.conftest import Publisher
from tests.factory import Defect, Forge

BROKEN_INIT = b"def init():\n    raise KeyError('no weights here')\n\ndef run(raw):\n    return raw\n"


@pytest.fixture
def trusted(tmp_path: Path, publisher: Publisher) -> list[str | Path]:
    pub = tmp_path / "publisher.pub"
    pub.write_bytes(public_key_pem(publisher.key.public_key()))
    return [pub]


def test_a_local_service_answers_inside_its_block_and_stops_after(
    digits_bundle: Path, digits_samples: dict[str, list[object]], trusted: list[str | Path], tmp_path: Path
) -> None:
    with LocalService(
        digits_bundle, port=0, trust=trusted, cache_dir=tmp_path / "cache", progress=False
    ) as s:
        assert s.port != 0 and s.scoring_uri == f"http://127.0.0.1:{s.port}/score"
        answer = s.run({"data": digits_samples["data"][:3]})
        assert answer["predictions"] == digits_samples["expected"][:3]
        assert "model loaded from" in s.get_logs()
        assert s.installed is not None and s.installed.manifest.ref == "digits:1"
        port = s.port
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_local_service_refuses_what_verify_refuses_and_says_why_it_did_not_start(
    forge: Forge, trusted: list[str | Path], tmp_path: Path
) -> None:
    tampered = tmp_path / "tampered.edgepack"
    tampered.write_bytes(forge.bundle(Defect.TAMPERED_BYTE))
    with pytest.raises(TrustError, match=Defect.TAMPERED_BYTE.reason), LocalService(tampered, trust=trusted):
        pass
    broken = tmp_path / "broken.edgepack"
    broken.write_bytes(forge.bundle(files={"src/score.py": BROKEN_INIT, "model/m.json": b"{}"}))
    with (
        pytest.raises(ModuleStartFailure, match="no weights here") as failed,
        LocalService(broken, port=0, trust=trusted),
    ):
        pass
    # One line: where init() raised, the type and the message; the traceback beside it.
    cause = "score.py:2 KeyError: 'no weights here'"
    assert str(failed.value).endswith(f"the entry script failed to start: {cause}")
    assert failed.value.traceback is not None and failed.value.traceback.count("Traceback") == 1
    good = tmp_path / "good.edgepack"
    good.write_bytes(forge.bundle())
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        with (
            pytest.raises(RuntimeFailure, match="held by another program"),
            LocalService(good, taken, trust=trusted),
        ):
            pass
