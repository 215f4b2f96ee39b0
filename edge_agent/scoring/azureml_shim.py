"""``azureml.monitoring`` and ``azureml.ai.monitoring`` as an unchanged Azure entry script
imports them, backed by edgepack's collector (:mod:`edge_agent.scoring.collector`).

- v1: ``ModelDataCollector(model_name, designation="inputs", feature_names=[...])`` then
  ``.collect(data)`` in ``run()``;
- v2: ``Collector(name="model_inputs")``; ``context = inputs.collect(df)`` then
  ``outputs.collect(result, context)``: the outputs share the inputs' correlation id and
  sampling decision.

:func:`install` puts both into ``sys.modules`` before the entry script is imported, in place of
any real ``azureml`` package installed beside the module: inside a module, collected data goes
to the device's spool, never to a cloud the device may not reach. Neither class ever raises
into ``run()``.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
import types
import uuid
from collections.abc import Callable
from typing import Any

from edge_agent.scoring import collector
from edge_agent.scoring.collector import (
    CURRENT_REQUEST,
    RequestContext,
    active,
    check_names,
    valid_correlation_id,
)

log = logging.getLogger("edge_agent.scoring.collector")

#: What Azure's v1 collector takes for "not given" as model version.
_DEFAULT = "default"


class ModelDataCollector:
    """Azure ML's v1 collector (``azureml.monitoring``), with its signature."""

    def __init__(
        self,
        model_name: str,
        designation: str = "default",
        feature_names: list[str] | None = None,
        workspace: str = "default/default/default",
        webservice_name: str = "default",
        model_version: str = _DEFAULT,
        collection_name: str = "default",
    ) -> None:
        module_version = collector.module_identity()[1]
        self.model_name = str(model_name)
        self.designation = str(designation)
        self.model_version = module_version if model_version in (None, "", _DEFAULT) else str(model_version)
        self.feature_names = [str(n) for n in feature_names] if feature_names is not None else None
        self.workspace, self.webservice_name, self.collection_name = (
            workspace,
            webservice_name,
            collection_name,
        )
        self._problem = check_names(self.model_name, self.model_version, self.designation, self.feature_names)
        if self._problem is not None:
            log.warning("ModelDataCollector(%r) collects nothing: %s", self.model_name, self._problem)

    def collect(self, input_data: Any, user_correlation_id: str = "") -> dict[str, str | None]:
        """Keep ``input_data`` (when collection is on and the request is sampled); returns the
        correlations to pass to :meth:`add_correlations`, as Azure's does."""
        context = CURRENT_REQUEST.get()
        correlation_id = context.correlation_id if context is not None else None
        if user_correlation_id:
            correlation_id = valid_correlation_id(user_correlation_id) or correlation_id
        try:
            collection = active()
            if collection is None:
                return {"correlation_id": correlation_id}
            if self._problem is not None:
                collection.drop("bad-name", self._problem)
            elif collection.sampled(context):
                collection.collect(
                    input_data,
                    model=self.model_name,
                    model_version=self.model_version,
                    designation=self.designation,
                    correlation_id=correlation_id,
                    feature_names=self.feature_names,
                )
        except Exception:  # collection never fails a request
            log.exception("ModelDataCollector(%r).collect failed", self.model_name)
        return {"correlation_id": correlation_id}

    def add_correlations(self, input_data: Any, correlations: Any) -> Any:
        """Azure returns the data with the correlation columns added; edgepack keeps the
        correlation id in each record, so the data is returned as it is."""
        return input_data


class BasicCorrelationContext:
    """Azure's v2 correlation context: an id (and headers) tying outputs to their inputs."""

    def __init__(self, id: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.id = id or str(uuid.uuid4())
        self.headers = dict(headers or {})
        self._sampled: bool | None = None

    def get_id(self) -> str:
        return self.id

    def get_headers(self) -> dict[str, str]:
        return self.headers


class Collector:
    """Azure ML's v2 collector (``azureml.ai.monitoring``): ``name`` is the designation, the
    model is the module (its name and version)."""

    def __init__(
        self,
        *,
        name: str,
        on_error: Callable[[Exception], Any] | None = None,
        **kwargs: Any,
    ) -> None:
        self.name = str(name)
        self.on_error = on_error
        self.model_name, self.model_version = collector.module_identity()
        self._problem = check_names(self.model_name, self.model_version, self.name, None)
        if self._problem is not None:
            log.warning("Collector(name=%r) collects nothing: %s", self.name, self._problem)

    def collect(
        self, data: Any, correlation_context: BasicCorrelationContext | None = None
    ) -> BasicCorrelationContext:
        request = CURRENT_REQUEST.get()
        if correlation_context is None:
            correlation_context = BasicCorrelationContext(request.correlation_id if request else None)
        try:
            collection = active()
            if collection is None:
                return correlation_context
            if self._problem is not None:
                collection.drop("bad-name", self._problem)
                return correlation_context
            correlation_id = valid_correlation_id(correlation_context.get_id())
            # The request's own decision when this context is the request's, else the
            # context's: the outputs of a sampled input are kept with it.
            sampling = request if request is not None and request.correlation_id == correlation_id else None
            if sampling is None:
                sampling = RequestContext(correlation_id, getattr(correlation_context, "_sampled", None))
            keep = collection.sampled(sampling)
            if isinstance(correlation_context, BasicCorrelationContext):
                correlation_context._sampled = keep
            if keep:
                collection.collect(
                    data,
                    model=self.model_name,
                    model_version=self.model_version,
                    designation=self.name,
                    correlation_id=correlation_id,
                )
        except Exception as exc:  # collection never fails a request
            if self.on_error is not None:
                try:
                    self.on_error(exc)
                except Exception:
                    log.exception("Collector(name=%r): on_error raised", self.name)
            else:
                log.exception("Collector(name=%r).collect failed", self.name)
        return correlation_context


def _module(name: str, **attributes: Any) -> types.ModuleType:
    module = types.ModuleType(name, f"edgepack's {name} (see edge_agent.scoring.azureml_shim)")
    module.__dict__.update(attributes)
    return module


def _parent(name: str) -> types.ModuleType:
    """The package ``name``: the installed one when there is one (other azureml packages keep
    working), else an empty package of our own."""
    existing = sys.modules.get(name)
    if existing is not None:
        return existing
    try:
        if importlib.util.find_spec(name) is not None:
            return importlib.import_module(name)
    except (ImportError, ValueError):
        pass  # a broken installation: ours stands in
    package = _module(name)
    package.__path__ = []
    sys.modules[name] = package
    return package


def install() -> None:
    """Make ``azureml.monitoring`` and ``azureml.ai.monitoring`` resolve to edgepack's."""
    v1 = _module("azureml.monitoring", ModelDataCollector=ModelDataCollector)
    v2 = _module(
        "azureml.ai.monitoring", Collector=Collector, BasicCorrelationContext=BasicCorrelationContext
    )
    root = _parent("azureml")
    sys.modules["azureml.monitoring"] = v1
    root.monitoring = v1  # type: ignore[attr-defined]
    ai = _parent("azureml.ai")
    sys.modules["azureml.ai.monitoring"] = v2
    ai.monitoring = v2  # type: ignore[attr-defined]
    if getattr(root, "ai", None) is not ai:
        root.ai = ai  # type: ignore[attr-defined]
