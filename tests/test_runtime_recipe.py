"""The runtime image's recipe as data: its cache key, wheel platforms and thin Dockerfile."""

from __future__ import annotations

import dataclasses

import pytest

from manifests.errors import ConfigError
from packager.runtime_image.recipe import (
    RUNTIME_UID,
    base_recipe,
    bundled_requirements,
    manylinux_platforms,
    parse_requirements,
    thin_dockerfile,
    thin_key,
)


def test_the_key_is_stable_and_covers_every_input() -> None:
    recipe = base_recipe(machine="x86_64")
    assert recipe.key == base_recipe(machine="x86_64").key
    assert recipe.tag == f"edgepack/runtime-base:{recipe.key[:16]}"
    changed = {
        "suite": "trixie",
        "variant": "buildd",
        "packages": ("python3", "python3-venv", "curl"),
        "python": "3.12",
        "arch": "arm64",
        "wheel_platforms": ("manylinux_2_17_x86_64",),
        "requirements": (*recipe.requirements, "six==1.16.0"),
        "recipe": recipe.recipe + 1,
    }
    assert set(changed) == {f.name for f in dataclasses.fields(recipe)}
    keys = {dataclasses.replace(recipe, **{name: value}).key for name, value in changed.items()}
    assert len(keys) == len(changed) and recipe.key not in keys
    assert base_recipe(machine="aarch64").key != recipe.key


def test_requirements_are_normalised_so_spelling_does_not_change_the_key() -> None:
    one = parse_requirements("numpy==2.4.6\n# comment\nPydantic_Core==2.50.5  # pinned\n")
    two = parse_requirements("pydantic-core==2.50.5\n\nnumpy==2.4.6\n")
    assert one == two == ("numpy==2.4.6", "pydantic-core==2.50.5")


@pytest.mark.parametrize("line", ["numpy", "numpy>=2", "numpy==2.*", "numpy==2,<3", "==1.0"])
def test_a_loose_requirement_is_refused(line: str) -> None:
    with pytest.raises(ConfigError, match="exact 'name==version' pin"):
        parse_requirements(line)


def test_the_bundled_requirements_pin_what_the_scoring_server_imports() -> None:
    names = {line.split("==")[0] for line in parse_requirements(bundled_requirements())}
    assert {"onnxruntime", "numpy", "uvicorn", "httptools", "uvloop", "orjson", "inference-schema",
            "pydantic", "cryptography"} <= names  # fmt: skip
    assert not names & {"fastapi", "sqlalchemy", "paho-mqtt", "typer", "psycopg"}


def test_wheel_platforms_reach_back_from_the_suites_c_library() -> None:
    tags = manylinux_platforms((2, 36), "x86_64")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert "manylinux_2_17_x86_64" in tags and tags[-1] == "manylinux2014_x86_64"
    assert base_recipe(machine="aarch64").wheel_platforms[0] == "manylinux_2_36_aarch64"


def test_an_unknown_architecture_is_refused() -> None:
    with pytest.raises(ConfigError, match="riscv64"):
        base_recipe(machine="riscv64")


def test_the_thin_dockerfile_installs_offline_and_runs_unprivileged() -> None:
    text = thin_dockerfile("edgepack/runtime-base:0123456789abcdef")
    assert text.splitlines()[1] == "FROM edgepack/runtime-base:0123456789abcdef"
    assert "--no-index --no-deps" in text
    assert f"USER {RUNTIME_UID}:{RUNTIME_UID}" in text
    assert text.rstrip().splitlines()[-1] == (
        'ENTRYPOINT ["python", "-m", "edge_agent.scoring", "--module-dir", "/module", "--host", "0.0.0.0"]'
    )


def test_the_thin_key_changes_with_the_base_the_dockerfile_or_the_code() -> None:
    args = {"base_id": "sha256:1", "dockerfile": "FROM x\n", "source_digest": "sha256:2"}
    key = thin_key(**args)
    assert thin_key(**args) == key
    for name in args:
        assert thin_key(**{**args, name: args[name] + "0"}) != key
