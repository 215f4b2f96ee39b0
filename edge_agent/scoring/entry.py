"""Loading a module's entry script and calling it the way Azure ML's inference server does.

The contract is Azure ML's: ``init()`` once, ``run(raw_data)`` per request. A ``run()``
decorated with ``inference_schema``'s ``@input_schema`` receives the request's JSON object
split into keyword arguments (the decorator then converts each to its declared type); an
undecorated ``run()`` receives the request body as a string. A ``run()`` that declares a
``request_headers`` parameter also gets the request headers, as Azure's server passes them.
"""

from __future__ import annotations

import importlib.util
import inspect
import itertools
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from time import perf_counter_ns
from types import ModuleType
from typing import Any

import orjson

from edge_agent.scoring import azureml_shim, collector
from manifests.errors import RuntimeFailure
from manifests.module import MODEL_ROOT, SRC_ROOT

MANIFEST_NAME = "module.json"
_module_numbers = itertools.count(1)


class BadInput(ValueError):
    """The request body cannot be handed to ``run()``: the client must change its request."""


@dataclass(frozen=True)
class ModuleLayout:
    """Where a module directory keeps its parts, and which script is the entry."""

    root: Path
    entry_script: Path
    name: str
    version: str
    environment: Mapping[str, str]
    manifest_input_schema: dict[str, Any] | None = None
    manifest_output_schema: dict[str, Any] | None = None

    @property
    def src_dir(self) -> Path:
        return self.root / SRC_ROOT

    @property
    def model_dir(self) -> Path:
        return self.root / MODEL_ROOT


def read_layout(module_dir: Path, env: Mapping[str, str]) -> ModuleLayout:
    """Find the entry script of ``module_dir``.

    ``module.json`` (already verified by whoever unpacked the module) names it; without a
    manifest, ``AZUREML_ENTRY_SCRIPT`` (relative to ``src/``) does, as on Azure ML.
    """
    root = module_dir.resolve()
    manifest_path = root / MANIFEST_NAME
    if manifest_path.is_file():
        try:
            document = orjson.loads(manifest_path.read_bytes())
            signed = document["signed"]
            entry = str(signed["entry_script"])
        except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
            raise RuntimeFailure(
                f"{manifest_path}: not a module manifest ({exc}); unpack the module again"
            ) from None
        entry_script = (root / entry).resolve()
        if not entry_script.is_relative_to(root / SRC_ROOT):
            raise RuntimeFailure(
                f"{manifest_path}: entry script {entry!r} lies outside {SRC_ROOT}/; "
                "the module is damaged, unpack it again"
            )
        runtime = signed.get("runtime") or {}
        return ModuleLayout(
            root=root,
            entry_script=entry_script,
            name=str(signed.get("name", root.name)),
            version=str(signed.get("version", "0")),
            environment={str(k): str(v) for k, v in (runtime.get("environment") or {}).items()},
            manifest_input_schema=signed.get("input_schema"),
            manifest_output_schema=signed.get("output_schema"),
        )
    entry_env = env.get("AZUREML_ENTRY_SCRIPT")
    if not entry_env:
        raise RuntimeFailure(
            f"{module_dir}: no {MANIFEST_NAME} and AZUREML_ENTRY_SCRIPT is not set; "
            "point --module-dir at an unpacked module"
        )
    return ModuleLayout(
        root=root,
        entry_script=root / SRC_ROOT / entry_env,
        name=root.name,
        version="0",
        environment={},
    )


def _import_script(path: Path) -> ModuleType:
    # A unique module name per load: two modules whose scripts are both called score.py must
    # not share sys.modules entries (nor inference_schema's registry, keyed by module name).
    name = f"edgepack_entry_{path.stem}_{next(_module_numbers)}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RuntimeFailure(f"{path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def _is_schema_decorated(func: Callable[..., Any]) -> bool:
    # Imported lazily: a module that does not use inference_schema should not pay for it.
    if "inference_schema" not in sys.modules:
        return False
    from inference_schema.schema_util import is_schema_decorated

    return bool(is_schema_decorated(func))


class EntryScript:
    """An imported entry script, ready for :meth:`init` and :meth:`run`."""

    def __init__(self, layout: ModuleLayout, module: ModuleType) -> None:
        self.layout = layout
        self.module = module
        run = getattr(module, "run", None)
        if not callable(run):
            raise RuntimeFailure(f"{layout.entry_script}: defines no run() function; add run(raw_data)")
        self._run: Callable[..., Any] = run
        #: how long the last call of the script's run() took (ns); None before the first
        self.last_run_ns: int | None = None
        init = getattr(module, "init", None)
        self._init: Callable[[], Any] | None = init if callable(init) else None
        params = [
            p
            for p in inspect.signature(run).parameters.values()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        self.wants_headers = any(p.name == "request_headers" for p in params)
        self._params = [p for p in params if p.name != "request_headers"]
        if not self._params:
            raise RuntimeFailure(
                f"{layout.entry_script}: run() takes no argument for the input; declare run(raw_data)"
            )
        self.schema_decorated = _is_schema_decorated(run)
        self.input_schema: dict[str, Any] | None = None
        self.output_schema: dict[str, Any] | None = None
        if self.schema_decorated:
            from inference_schema.schema_util import get_input_schema, get_output_schema

            self.input_schema = get_input_schema(run)
            self.output_schema = get_output_schema(run)

    @classmethod
    def load(cls, module_dir: Path) -> EntryScript:
        """Prepare the process for ``module_dir`` and import its entry script.

        Sets ``EDGEPACK_MODEL_DIR`` and ``AZUREML_MODEL_DIR`` to ``<dir>/model`` (and the
        module's own environment variables unless already set), puts ``src/`` first on
        ``sys.path`` and makes it the working directory, since Azure ML scripts open files
        relative to it. ``azureml.monitoring`` and ``azureml.ai.monitoring`` are edgepack's
        collector (:mod:`edge_agent.scoring.azureml_shim`).
        """
        layout = read_layout(module_dir, os.environ)
        if not layout.entry_script.is_file():
            raise RuntimeFailure(f"{layout.entry_script}: entry script not found; unpack the module again")
        for key, value in layout.environment.items():
            os.environ.setdefault(key, value)
        model_dir = str(layout.model_dir)
        os.environ["EDGEPACK_MODEL_DIR"] = model_dir
        os.environ["AZUREML_MODEL_DIR"] = model_dir
        os.environ["AZUREML_ENTRY_SCRIPT"] = str(layout.entry_script.relative_to(layout.src_dir))
        src = str(layout.src_dir)
        if src not in sys.path:
            sys.path.insert(0, src)
        if layout.src_dir.is_dir():
            os.chdir(src)
        # An Azure script's data collector resolves to edgepack's, with this module as its
        # default model.
        collector.set_module(layout.name, layout.version)
        azureml_shim.install()
        return cls(layout, _import_script(layout.entry_script))

    def _timed(self, *args: Any, **kwargs: Any) -> Any:
        # The module's own time, without reading, parsing or queueing: what its author can
        # make faster (the scoring server reports it as run_p50_ms / run_p95_ms).
        start = perf_counter_ns()
        try:
            return self._run(*args, **kwargs)
        finally:
            self.last_run_ns = perf_counter_ns() - start

    def init(self) -> None:
        """Call the script's ``init()`` (a script without one needs no set-up)."""
        if self._init is not None:
            self._init()

    def run(self, raw: str | bytes, headers: Mapping[str, str] | None = None) -> Any:
        """Score one request body; raises :class:`BadInput` when the body cannot be used.

        Whatever ``run()`` itself raises propagates unchanged.
        """
        self.last_run_ns = None
        if self.schema_decorated:
            return self._run_decorated(raw, headers)
        return self._run_plain(raw, headers)

    def _run_plain(self, raw: str | bytes, headers: Mapping[str, str] | None = None) -> Any:
        if isinstance(raw, bytes):
            try:
                raw = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise BadInput(f"request body is not UTF-8 text: {exc}") from None
        if self.wants_headers:
            return self._timed(raw, request_headers=dict(headers or {}))
        return self._timed(raw)

    def _run_decorated(self, raw: str | bytes, headers: Mapping[str, str] | None = None) -> Any:
        if not raw:
            raise BadInput("request body is empty; send a JSON object")
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadInput(f"request body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise BadInput("request body must be a JSON object")
        kwargs: dict[str, Any] = {}
        for param in self._params:
            value = body.get(param.name, param.default)
            if value is inspect.Parameter.empty:
                raise BadInput(f"request body has no value for {param.name!r}")
            kwargs[param.name] = value
        if self.wants_headers:
            kwargs["request_headers"] = dict(headers or {})
        return self._timed(**kwargs)
