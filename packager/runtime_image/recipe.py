"""What the runtime image is made of, as data: the inputs of the base layer and their cache
key, the names and labels of the images, and the thin layer's Dockerfile.

Pure: nothing here touches a disk, a network or a Docker engine, so the cache key and the
Dockerfile are tested as plain values.
"""

from __future__ import annotations

import hashlib
import platform
from dataclasses import asdict, dataclass
from importlib import resources

from manifests.canonical import canonical_json
from manifests.errors import ConfigError

#: Bump when the steps that make the base change (what is stripped, how wheels install...):
#: the cache key then changes and every machine builds a fresh base.
BASE_RECIPE = 1
#: The same for the thin layer's steps (its Dockerfile is hashed too, this covers the rest).
THIN_RECIPE = 1

BASE_REPOSITORY = "edgepack/runtime-base"
RUNTIME_REPOSITORY = "edgepack/runtime"
DEFAULT_TAG = "py311"

LABEL_BASE_KEY = "org.edgepack.runtime-base.key"
LABEL_THIN_KEY = "org.edgepack.runtime.key"
LABEL_BASE_ID = "org.edgepack.runtime.base-id"

VENV = "/opt/edgepack/venv"
#: The scoring server runs as this user: a module's code never runs as root in the container.
RUNTIME_UID = 10001
RUNTIME_USER = "edgepack"
#: Where the agent mounts a verified module (read-only) and the port the server listens on.
MODULE_MOUNT = "/module"
DEFAULT_PORT = 8890
#: Debian's own pip wheel (package python3-pip-whl): the thin layer installs the edgepack wheel
#: with it, so no pip has to live in the venv.
PIP_WHEEL_GLOB = "/usr/share/python-wheels/pip-*.whl"



@dataclass(frozen=True)
class _Suite:
    """Facts of a Debian suite the wheels must match: its python3 and its C library."""

    python: str
    glibc: tuple[int, int]


_SUITES = {"bookworm": _Suite(python="3.11", glibc=(2, 36))}
#: ``platform.machine()`` → (Debian architecture, wheel platform suffix)
_ARCHES = {"x86_64": ("amd64", "x86_64"), "amd64": ("amd64", "x86_64"),
           "aarch64": ("arm64", "aarch64"), "arm64": ("arm64", "aarch64")}  # fmt: skip
#: manylinux wheels built for an older C library run on a newer one; pip does not work that
#: out for a foreign --platform, so every compatible tag is listed. 2_17 is the oldest any
#: package we use still ships; manylinux2014 makes pip accept 2010 and manylinux1 too.
_OLDEST_GLIBC_MINOR = 17


@dataclass(frozen=True)
class BaseRecipe:
    """Every input of the base layer. Two equal recipes give interchangeable base images."""

    suite: str
    variant: str
    packages: tuple[str, ...]
    python: str
    arch: str
    wheel_platforms: tuple[str, ...]
    requirements: tuple[str, ...]
    recipe: int = BASE_RECIPE

    @property
    def key(self) -> str:
        """The cache key: sha256 of the recipe as canonical JSON."""
        return hashlib.sha256(canonical_json(asdict(self))).hexdigest()

    @property
    def tag(self) -> str:
        """``edgepack/runtime-base:<first 16 hex digits of the key>``."""
        return f"{BASE_REPOSITORY}:{self.key[:16]}"

    @property
    def python_tag(self) -> str:
        """``cp311`` for Python 3.11: the interpreter and ABI tag of the wheels."""
        return "cp" + self.python.replace(".", "")


def host_arch(machine: str | None = None) -> tuple[str, str]:
    """(Debian architecture, wheel architecture) of this machine; the image runs on its kind."""
    name = machine or platform.machine()
    try:
        return _ARCHES[name]
    except KeyError:
        raise ConfigError(
            f"no runtime image recipe for the {name!r} architecture; supported: amd64, arm64"
        ) from None


def manylinux_platforms(glibc: tuple[int, int], arch: str) -> tuple[str, ...]:
    """The wheel platform tags a system with C library ``glibc`` runs, newest first."""
    major, minor = glibc
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, _OLDEST_GLIBC_MINOR - 1, -1)]
    return (*tags, f"manylinux2014_{arch}")


def parse_requirements(text: str) -> tuple[str, ...]:
    """The requirement lines of a requirements file: comments and blanks dropped, and every
    line an exact ``name==version`` pin (anything looser would make the key a lie)."""
    lines: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep or not name.strip() or not version.strip() or any(c in version for c in "<>=!~*,; "):
            raise ConfigError(
                f"runtime image requirements, line {number}: {line!r} is not an exact "
                "'name==version' pin; pin every package so the cache key means one set of wheels"
            )
        lines.append(f"{name.strip().lower().replace('_', '-')}=={version.strip()}")
    if not lines:
        raise ConfigError("runtime image requirements list no package")
    return tuple(sorted(lines))


def bundled_requirements() -> str:
    """The pinned requirement list shipped with edgepack (``requirements.txt`` beside this)."""
    return (resources.files("packager.runtime_image") / "requirements.txt").read_text(encoding="utf-8")


def base_recipe(
    *, suite: str = "bookworm", machine: str | None = None, requirements: str | None = None
) -> BaseRecipe:
    """The base recipe for this machine's architecture (or ``machine``'s)."""
    try:
        facts = _SUITES[suite]
    except KeyError:
        raise ConfigError(
            f"no runtime image recipe for Debian {suite!r}; supported: {', '.join(_SUITES)}"
        ) from None
    deb_arch, wheel_arch = host_arch(machine)
    return BaseRecipe(
        suite=suite,
        variant="minbase",
        # python3-venv brings ensurepip's pip wheel (python3-pip-whl), which installs wheels
        # into the venv without pip having to live in it.
        packages=("python3", "python3-venv"),
        python=facts.python,
        arch=deb_arch,
        wheel_platforms=manylinux_platforms(facts.glibc, wheel_arch),
        requirements=parse_requirements(bundled_requirements() if requirements is None else requirements),
    )


def base_changes(recipe: BaseRecipe) -> list[str]:
    """The Dockerfile instructions ``docker import`` applies to the base rootfs."""
    return [
        f"ENV PATH={VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "ENV LANG=C.UTF-8",
        # The code is compiled at build time and the image runs as a user who cannot write
        # there: no point trying at every start.
        "ENV PYTHONDONTWRITEBYTECODE=1",
        "ENV PYTHONUNBUFFERED=1",
        f"LABEL {LABEL_BASE_KEY}={recipe.key}",
        'CMD ["python3"]',
    ]


def thin_dockerfile(base_tag: str) -> str:
    """The Dockerfile of the thin layer: the edgepack wheel (the one ``*.whl`` of the build
    context) on top of ``base_tag``, run as an unprivileged user, the scoring server as
    entry point. It installs with ``--no-index --no-deps``: the build needs no network and
    cannot pull in anything the base does not already hold."""
    return f"""\
# Generated by edgepack (packager/runtime_image/recipe.py): the thin layer of the runtime image.
FROM {base_tag}
COPY *.whl /tmp/edgepack-wheel/
RUN set -e; pip_wheel="$(echo {PIP_WHEEL_GLOB})"; \\
    python "$pip_wheel/pip" install --no-index --no-deps --no-cache-dir --quiet \\
        --disable-pip-version-check --root-user-action=ignore /tmp/edgepack-wheel/*.whl; \\
    rm -rf /tmp/edgepack-wheel; \\
    python -c "import edge_agent.scoring.server, edge_agent.cache"
USER {RUNTIME_UID}:{RUNTIME_UID}
ENV EDGEPACK_PORT={DEFAULT_PORT}
EXPOSE {DEFAULT_PORT}
ENTRYPOINT ["python", "-m", "edge_agent.scoring", "--module-dir", "{MODULE_MOUNT}", "--host", "0.0.0.0"]
"""


def thin_key(*, base_id: str, dockerfile: str, source_digest: str) -> str:
    """The thin layer's cache key: the base it stands on, its Dockerfile, the edgepack source."""
    doc = {"base_id": base_id, "dockerfile": dockerfile, "source": source_digest, "recipe": THIN_RECIPE}
    return hashlib.sha256(canonical_json(doc)).hexdigest()
