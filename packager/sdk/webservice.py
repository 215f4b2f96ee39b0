"""Azure ML's web service classes, for scripts that name them.

``Webservice(hub, name)`` is a :class:`~packager.sdk.service.Service`; each compute target's
``deploy_configuration(...)`` is a :class:`~packager.sdk.configs.DeploymentConfig` with its
``computeType``. At the edge every one of them deploys to the hub's devices: the compute type
is recorded, and the keywords that describe Azure infrastructure are accepted and have no
effect (as in a ``deploymentconfig.json``).
"""

from __future__ import annotations

from typing import Any

from packager.sdk.configs import DeploymentConfig
from packager.sdk.service import Service

Webservice = Service


class LocalWebservice(Service):
    """Azure ML's local web service: ``LocalWebservice.deploy_configuration(port=8890)``."""

    @staticmethod
    def deploy_configuration(port: int | None = None, **settings: Any) -> DeploymentConfig:
        """A deployment configuration (``computeType: local``); see :class:`DeploymentConfig`."""
        return DeploymentConfig(port=port, compute_type="local", **settings)


class AciWebservice(Service):
    """Azure Container Instances: ``AciWebservice.deploy_configuration(cpu_cores=1, memory_gb=1)``."""

    @staticmethod
    def deploy_configuration(
        cpu_cores: float | None = None, memory_gb: float | None = None, **settings: Any
    ) -> DeploymentConfig:
        """A deployment configuration (``computeType: aci``); see :class:`DeploymentConfig`."""
        return DeploymentConfig(cpu_cores=cpu_cores, memory_gb=memory_gb, compute_type="aci", **settings)


class AksWebservice(Service):
    """Azure Kubernetes Service: ``AksWebservice.deploy_configuration(cpu_cores=1, memory_gb=1)``."""

    @staticmethod
    def deploy_configuration(
        cpu_cores: float | None = None, memory_gb: float | None = None, **settings: Any
    ) -> DeploymentConfig:
        """A deployment configuration (``computeType: aks``); see :class:`DeploymentConfig`."""
        return DeploymentConfig(cpu_cores=cpu_cores, memory_gb=memory_gb, compute_type="aks", **settings)
