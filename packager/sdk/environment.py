"""``Environment``: the Python packages (and image) an entry script needs, as Azure ML writes it.

An environment becomes the ``environment`` object of an inference configuration: its pip
packages are the module's Python requirements (the process runtime checks they are installed
on the device; the docker runtime's image must hold them), its variables every instance's
environment, its ``docker.base_image`` the docker runtime's image (pinned to its digest when
the module is built).

edgepack's hub keeps no environments: :meth:`Environment.get` knows the curated ones built
into the SDK, the rest are made here (``Environment(name)``, :meth:`from_pip_requirements`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import TYPE_CHECKING, Any

from packager.sdk.errors import BadArgument

if TYPE_CHECKING:
    from packager.sdk.hub import Hub

#: Curated environments: name → its pip packages. The scoring server and its web stack come
#: with every runtime, so "minimal" means nothing beyond them (as Azure's AzureML-Minimal).
CURATED: dict[str, list[str]] = {
    "AzureML-Minimal": [],
    "edgepack-minimal": [],
}


class CondaDependencies:
    """The packages an environment installs: conda packages and, among them, pip packages."""

    def __init__(
        self, *, pip_packages: list[str] | None = None, conda_packages: list[str] | None = None
    ) -> None:
        self.pip_packages: list[str] = list(pip_packages or [])
        self.conda_packages: list[str] = list(conda_packages or [])

    @staticmethod
    def create(
        pip_packages: list[str] | None = None,
        conda_packages: list[str] | None = None,
        python_version: str | None = None,
    ) -> CondaDependencies:
        """Azure ML's ``CondaDependencies.create``: packages, and the Python version to record."""
        conda = list(conda_packages or [])
        if python_version is not None:
            conda.insert(0, f"python={python_version}")
        return CondaDependencies(pip_packages=pip_packages, conda_packages=conda)

    def add_pip_package(self, pip_package: str) -> None:
        """Add one pip requirement (``"scikit-learn"``, ``"numpy>=1.26"``); once only."""
        if not isinstance(pip_package, str) or not pip_package.strip():
            raise BadArgument(f"add_pip_package: expected a requirement such as 'numpy', got {pip_package!r}")
        if pip_package not in self.pip_packages:
            self.pip_packages.append(pip_package.strip())

    def add_conda_package(self, conda_package: str) -> None:
        """Record a conda package (kept in the module's configuration; devices install nothing)."""
        if not isinstance(conda_package, str) or not conda_package.strip():
            raise BadArgument(f"add_conda_package: expected a package name, got {conda_package!r}")
        if conda_package not in self.conda_packages:
            self.conda_packages.append(conda_package.strip())

    def remove_pip_package(self, pip_package: str) -> None:
        """Drop a pip requirement added before."""
        self.pip_packages = [p for p in self.pip_packages if p != pip_package]

    def to_json(self) -> dict[str, Any]:
        """The ``condaDependencies`` object of an Azure ``inferenceconfig.json``."""
        dependencies: list[Any] = list(self.conda_packages)
        if self.pip_packages:
            dependencies.append({"pip": list(self.pip_packages)})
        return {"dependencies": dependencies}

    @classmethod
    def from_json(cls, data: dict[str, Any] | None) -> CondaDependencies:
        """Read the ``condaDependencies`` object of an ``inferenceconfig.json``."""
        pip: list[str] = []
        conda: list[str] = []
        for dep in (data or {}).get("dependencies", []):
            if isinstance(dep, dict) and isinstance(dep.get("pip"), list):
                pip.extend(str(p) for p in dep["pip"])
            elif isinstance(dep, str):
                conda.append(dep)
        return cls(pip_packages=pip, conda_packages=conda)


class PythonSection:
    """``environment.python``: whose interpreter, and which packages."""

    def __init__(self) -> None:
        self.user_managed_dependencies: bool = False
        self.interpreter_path: str | None = None
        self.conda_dependencies: CondaDependencies = CondaDependencies()


class DockerSection:
    """``environment.docker``: the image the docker runtime runs the module in."""

    def __init__(self) -> None:
        self.enabled: bool | None = None
        #: ``REGISTRY/edgepack/runtime@sha256:…`` (a tag is pinned to its digest at build time)
        self.base_image: str | None = None


class Environment:
    """What an entry script needs to run (Azure ML's ``Environment``)."""

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not name.strip():
            raise BadArgument("Environment: give it a name, e.g. Environment('digits-env')")
        self.name = name
        self.version: str | None = None
        self.python = PythonSection()
        self.docker = DockerSection()
        self.environment_variables: dict[str, str] = {}

    def __repr__(self) -> str:
        return f"Environment({self.name!r}, pip={self.python.conda_dependencies.pip_packages})"

    @staticmethod
    def get(workspace: Hub, name: str, version: str | None = None) -> Environment:
        """A curated environment by name (``"AzureML-Minimal"``); a copy you may change.

        ``workspace`` is taken for Azure ML scripts' sake: the hub keeps no environments.
        """
        if name not in CURATED:
            raise BadArgument(
                f"environment {name!r} is not a curated one ({', '.join(sorted(CURATED))}); the hub "
                "keeps no environments: make one with Environment(name) or "
                "Environment.from_pip_requirements(name, 'requirements.txt')"
            )
        env = Environment(name)
        env.version = version
        for package in CURATED[name]:
            env.python.conda_dependencies.add_pip_package(package)
        return env

    def clone(self, new_name: str) -> Environment:
        """A deep copy under another name, to change without changing this one."""
        twin = copy.deepcopy(self)
        twin.name = new_name
        twin.version = None
        return twin

    @staticmethod
    def from_pip_requirements(name: str, file_path: str | Path) -> Environment:
        """An environment whose pip packages are the lines of a ``requirements.txt``."""
        path = Path(file_path)
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise BadArgument(f"{path}: cannot read the requirements file ({exc.strerror})") from None
        env = Environment(name)
        for number, line in enumerate(lines, 1):
            requirement = line.split("#", 1)[0].strip()
            if not requirement:
                continue
            if requirement.startswith("-"):
                raise BadArgument(
                    f"{path}:{number}: pip options ({requirement.split()[0]}) are not supported; "
                    "list the packages themselves"
                )
            env.python.conda_dependencies.add_pip_package(requirement)
        return env

    def to_json(self) -> dict[str, Any]:
        """The ``environment`` object of an Azure ``inferenceconfig.json``."""
        python: dict[str, Any] = {
            "userManagedDependencies": self.python.user_managed_dependencies,
            "condaDependencies": self.python.conda_dependencies.to_json(),
        }
        if self.python.interpreter_path is not None:
            python["interpreterPath"] = self.python.interpreter_path
        doc: dict[str, Any] = {"name": self.name, "python": python}
        if self.version is not None:
            doc["version"] = self.version
        docker = {
            key: value
            for key, value in (("enabled", self.docker.enabled), ("baseImage", self.docker.base_image))
            if value is not None
        }
        if docker:
            doc["docker"] = docker
        if self.environment_variables:
            doc["environmentVariables"] = dict(self.environment_variables)
        return doc
