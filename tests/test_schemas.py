"""Generated JSON Schemas stay in step with the models; the example documents are valid."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from manifests.canonical import canonical_json
from manifests.desired import DesiredState
from manifests.digests import sha256_digest
from manifests.module import ModuleManifest
from manifests.schemas import CONTRACTS, all_schemas
from manifests.signing import Envelope, TrustStore, verify_envelope
from tests.conftest import REPO

SCHEMA_DIR = REPO / "manifests" / "schemas"
EXAMPLE_DIR = REPO / "manifests" / "examples"
SCRIPT = REPO / "scripts" / "gen_schemas.py"


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_schemas", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def example(name: str) -> Any:
    return json.loads((EXAMPLE_DIR / f"{name}.json").read_text())


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_committed_schema_matches_the_model(name: str) -> None:
    path = SCHEMA_DIR / f"{name}.json"
    expected = load_script().render(all_schemas()[name])
    assert path.exists(), f"{path} is missing; run: python scripts/gen_schemas.py"
    assert path.read_text() == expected, (
        f"{path} differs from the model {CONTRACTS[name].__name__}; "
        "run: python scripts/gen_schemas.py"
    )


def test_no_stray_schema_files() -> None:
    assert sorted(p.stem for p in SCHEMA_DIR.glob("*.json")) == sorted(CONTRACTS)


def test_script_writes_pretty_sorted_files_with_a_trailing_newline(tmp_path: Path) -> None:
    (tmp_path / "retired.json").write_text("{}")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(tmp_path)], capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.stem for p in tmp_path.glob("*.json")) == sorted(CONTRACTS)
    for path in tmp_path.glob("*.json"):
        text = path.read_text()
        assert text == (SCHEMA_DIR / path.name).read_text()
        assert text.endswith("}\n") and not text.endswith("\n\n")
        assert text == json.dumps(json.loads(text), indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def test_check_mode_reports_a_drifted_file_and_how_to_fix_it(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path)], check=True, capture_output=True)
    (tmp_path / "module.json").write_text('{"drifted": true}\n')
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--check", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1
    assert "module.json" in proc.stderr
    assert "python scripts/gen_schemas.py" in proc.stderr


def test_schemas_describe_documents_as_they_appear_on_the_wire() -> None:
    schemas = all_schemas()
    assert "schema" in schemas["module"]["properties"]
    assert "schema_" not in schemas["module"]["properties"]
    assert "entryScript" in schemas["inferenceconfig"]["properties"]
    assert "containerResourceRequirements" in schemas["deploymentconfig"]["properties"]
    assert schemas["inferenceconfig"]["additionalProperties"] is False


# --- examples -------------------------------------------------------------------------------


def test_there_is_one_example_per_contract() -> None:
    assert sorted(p.stem for p in EXAMPLE_DIR.glob("*.json")) == sorted(CONTRACTS)


@pytest.mark.parametrize("name", sorted(CONTRACTS))
def test_example_validates_against_its_model(name: str) -> None:
    CONTRACTS[name].model_validate(example(name))


def test_example_envelope_is_the_signed_example_module_and_verifies() -> None:
    envelope = Envelope.model_validate(example("envelope"))
    trust = TrustStore.model_validate(example("trust-store"))
    assert verify_envelope(envelope, trust) == [trust.keys[0].keyid]
    assert ModuleManifest.model_validate(envelope.signed) == ModuleManifest.model_validate(
        example("module")
    )


def test_example_desired_state_points_at_the_example_module() -> None:
    state = DesiredState.model_validate(example("desired-state"))
    wire = canonical_json(example("envelope"))
    assert state.modules[0].manifest_digest == sha256_digest(wire)
    # ...and allows the key that signed it to sign the module's name.
    assert state.modules[0].signers == [Envelope.model_validate(example("envelope")).signatures[0].keyid]
