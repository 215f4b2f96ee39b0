"""edgepack: deploy ML models to fleets of edge devices, from Python.

``import edgepack`` gives the SDK (:mod:`packager.sdk`, where everything is documented): the
hub as Azure ML's ``Workspace``, ``Model``, ``InferenceConfig``, ``DeploymentConfig``,
``Service`` and the rest. This package holds no logic; it names the SDK's public API, as the
SDK's ``__all__`` lists it.
"""

from __future__ import annotations

from packager.sdk import *  # noqa: F403  (the SDK's public API)
from packager.sdk import __all__ as __all__
