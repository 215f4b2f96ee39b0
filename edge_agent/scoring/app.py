"""The scoring server's ASGI application: a plain ASGI callable, no framework.

This is the hot path of edgepack, so ``POST /score`` goes straight from the ASGI scope to
``run()`` and back: no routing table, no middleware, no request objects, ``orjson`` for the
response, and ``run()`` called inline on the event loop (it is CPU-bound and short; a server
that needs more throughput runs more worker processes, each with its own loop).

The entry script is imported and ``init()`` runs in a background thread once the lifespan
starts, so the port answers at once: ``GET /`` (liveness) says "Healthy", ``GET /healthz``
(readiness) says 503 until ``init()`` has succeeded, then 200. If loading or ``init()``
fails, the traceback is logged and ``on_fatal`` is called; the default ends the process with
exit code 5 (:class:`~manifests.errors.RuntimeFailure`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import threading
import traceback
import urllib.parse
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from time import perf_counter_ns
from typing import Any

import orjson

from edge_agent.scoring import collector
from edge_agent.scoring.auth import EndpointKeys
from edge_agent.scoring.entry import BadInput, EntryScript, read_layout
from edge_agent.scoring.failure import describe
from edge_agent.scoring.limits import FD_EXTENSION, BodyBudget, RunWatchdog, ServingLimits
from edge_agent.scoring.metrics import ROUTE_OTHER, MetricsBoard, WorkerMetrics, render
from edge_agent.scoring.openapi import openapi_document
from manifests.errors import ModuleStartFailure, RuntimeFailure

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
FatalHandler = Callable[[BaseException], None]

log = logging.getLogger("edge_agent.scoring")

#: What a client refused for lack of room in the body budget is told to wait (seconds): bodies
#: in flight finish within about a run() or the body timeout.
RETRY_AFTER_S = 1

_JSON = b"application/json"
_TEXT = b"text/plain; charset=utf-8"
_PROMETHEUS = b"text/plain; version=0.0.4; charset=utf-8"
_DUMP_OPTIONS = orjson.OPT_SERIALIZE_NUMPY
#: What an endpoint with keys answers only to a key; GET / (liveness) and /healthz (the
#: agent's readiness probe) stay open, as on Azure.
_KEYED_PATHS = frozenset(("/score", "/swagger.json", "/metrics"))


def _json_default(value: Any) -> Any:
    # Values orjson does not know but that say how to become plain lists (pandas, torch...).
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def query_as_json(query: bytes) -> bytes:
    """``GET /score?a=1&b=x&b=y`` as Azure ML's server reads it: ``{"a": 1, "b": ["x", "y"]}``
    (each value parsed as JSON when it is JSON, kept as a string otherwise)."""

    def value(text: str) -> Any:
        try:
            return orjson.loads(text)
        except orjson.JSONDecodeError:
            return text

    parsed = urllib.parse.parse_qs(query.decode("latin-1"), keep_blank_values=True)
    return orjson.dumps({k: value(v[0]) if len(v) == 1 else [value(x) for x in v] for k, v in parsed.items()})


class _ClientGone(Exception):
    """The client disconnected before its request body was complete."""


class _Refused(Exception):
    """The request body passed the body limit (413) or the worker's body budget (503)."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status


def _declared_length(scope: Scope) -> int:
    """The request's Content-Length, 0 when absent (a chunked body)."""
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else 0
    return 0


def _error_body(message: str, kind: str) -> bytes:
    return orjson.dumps({"error": message, "type": kind})


async def _respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = _JSON,
    *,
    close: bool = False,
    request_id: bytes | None = None,
) -> None:
    headers = [(b"content-type", content_type), (b"content-length", b"%d" % len(body))]
    if request_id is not None:
        # Azure's server names every scoring request this way; it is the correlation id of
        # the data run() collects.
        headers.append((b"x-ms-request-id", request_id))
    if close:
        # uvicorn closes the connection after this response; the client reconnects, and the
        # kernel gives the new connection to the version that still listens.
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def _exit_process(exc: BaseException) -> None:
    # Without a server object to stop, ending the process is the only way to make a failed
    # init() visible to whatever supervises it (the agent, a container runtime, a shell).
    sys.stderr.flush()
    sys.stdout.flush()
    os._exit(RuntimeFailure.exit_code)


class ScoringApp:
    """The ASGI application for one module directory (one per worker process)."""

    def __init__(
        self,
        module_dir: Path,
        *,
        metrics: WorkerMetrics,
        board: MetricsBoard,
        on_fatal: FatalHandler = _exit_process,
        limits: ServingLimits = ServingLimits(),
        keys: EndpointKeys | None = None,
        watchdog: RunWatchdog | None = None,
    ) -> None:
        self.module_dir = module_dir
        self.keys = keys
        self.watchdog = watchdog
        self.metrics = metrics
        self.board = board
        self.on_fatal = on_fatal
        self.budget = BodyBudget(limits.max_body_bytes, limits.body_budget)
        self.entry: EntryScript | None = None
        self.ready = False
        self.draining = False
        self.failure: BaseException | None = None
        self._swagger: bytes | None = None
        self._init_thread: threading.Thread | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if (
                self.keys is not None
                and scope["path"] in _KEYED_PATHS
                and scope["method"] != "OPTIONS"  # a CORS pre-flight carries no credentials
                and not self._authorized(scope)
            ):
                await self._unauthorized(scope, send)
            elif scope["path"] == "/score":
                await self._score(scope, receive, send)
            else:
                await self._other(scope, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)

    # --- endpoint keys ----------------------------------------------------------------------

    def _authorized(self, scope: Scope) -> bool:
        assert self.keys is not None
        header = next((v for k, v in scope["headers"] if k == b"authorization"), None)
        return self.keys.allows(header, perf_counter_ns() / 1e9)

    async def _unauthorized(self, scope: Scope, send: Send) -> None:
        body = _error_body(
            "this endpoint needs a key: send 'Authorization: Bearer KEY' "
            "(see 'edgepack service keys SERVICE')",
            "Unauthorized",
        )
        headers = [
            (b"content-type", _JSON),
            (b"content-length", b"%d" % len(body)),
            (b"www-authenticate", b"Bearer"),
            # The unread body (if any) is not worth reading: close instead.
            (b"connection", b"close"),
        ]
        await send({"type": "http.response.start", "status": 401, "headers": headers})
        await send({"type": "http.response.body", "body": body})
        self.metrics.request(ROUTE_OTHER, 401)

    # --- /score ---------------------------------------------------------------------------

    async def _score(self, scope: Scope, receive: Receive, send: Send) -> None:
        # The request's correlation id, where collect() inside run() finds it.
        request_id = collector.request_correlation_id(scope["headers"])
        token = collector.CURRENT_REQUEST.set(collector.RequestContext(request_id))
        try:
            await self._score_request(scope, receive, send, request_id.encode())
        finally:
            collector.CURRENT_REQUEST.reset(token)

    async def _score_request(self, scope: Scope, receive: Receive, send: Send, request_id: bytes) -> None:
        start = perf_counter_ns()
        entry = self.entry
        method = scope["method"]
        if not self.ready or entry is None:
            status = 503
            payload = _error_body("the module is not ready: init() has not finished", "NotReady")
        elif method == "POST":
            await self._score_body(entry, scope, receive, send, start, request_id)
            return
        elif method == "GET":
            status, payload = self._call_run(entry, scope, query_as_json(scope["query_string"]))
        elif method == "OPTIONS":
            status, payload = 200, b"{}"  # a CORS pre-flight, which Azure's server answers too
        else:
            status = 405
            payload = _error_body("use POST /score with the input as the body", "MethodNotAllowed")
        await _respond(send, status, payload, close=self.draining, request_id=request_id)
        self.metrics.score(status, perf_counter_ns() - start)

    async def _score_body(
        self, entry: EntryScript, scope: Scope, receive: Receive, send: Send, start: int, request_id: bytes
    ) -> None:
        """``POST /score``: the body read within the body limit and the worker's budget (a
        body announced too large is refused before any of it is read), then ``run()``."""
        budget = self.budget
        status = budget.refuse_announced(_declared_length(scope))
        if not status:
            try:
                body = await self._read_body(receive)
            except _ClientGone:
                return  # a cut-off body must not reach run(), and nobody is left to answer
            except _Refused as exc:
                status = exc.status
        if status:
            await self._refuse(send, status, request_id)
            self.metrics.score(status, perf_counter_ns() - start)
            return
        try:
            status, payload = self._call_run(entry, scope, body)
            await _respond(send, status, payload, close=self.draining, request_id=request_id)
        finally:
            budget.give_back(len(body))
        self.metrics.score(status, perf_counter_ns() - start)

    async def _read_body(self, receive: Receive) -> bytes:
        """The whole body, charged to the budget as it arrives (the caller gives it back).

        Raises :class:`_Refused` as soon as the body passes the limit or the budget, and
        :class:`_ClientGone` if the client goes away; either way nothing stays charged.
        """
        budget = self.budget
        chunks: list[bytes] = []
        held = 0
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise _ClientGone
                chunk: bytes = message.get("body", b"")
                refused = budget.take(held + len(chunk), len(chunk))
                if refused:
                    raise _Refused(refused)
                held += len(chunk)
                if not message.get("more_body", False):
                    break
                chunks.append(chunk)
        except BaseException:
            budget.give_back(held)
            raise
        if not chunks:
            return chunk  # the whole body came at once: the usual case, no copy
        chunks.append(chunk)
        return b"".join(chunks)

    async def _refuse(self, send: Send, status: int, request_id: bytes) -> None:
        """413 or 503 for a body that is not read (any further), closing the connection: the
        rest of the body is still on its way, and reading it is what must not happen."""
        headers = [(b"content-type", _JSON), (b"connection", b"close"), (b"x-ms-request-id", request_id)]
        if status == 413:
            body = _error_body(
                f"request body is larger than {self.budget.max_body} bytes "
                "(the service's maxBodyBytes in deploymentconfig.json)",
                "PayloadTooLarge",
            )
        else:
            body = _error_body("the server holds as many request bodies as it may; try again shortly", "Busy")
            headers.append((b"retry-after", b"%d" % RETRY_AFTER_S))
        headers.append((b"content-length", b"%d" % len(body)))
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _call_run(self, entry: EntryScript, scope: Scope, body: bytes) -> tuple[int, bytes]:
        headers = None
        if entry.wants_headers:
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        watchdog = self.watchdog
        if watchdog is not None:
            watchdog.begin(scope.get("extensions", {}).get(FD_EXTENSION, {}).get("fd", -1))
        try:
            result = entry.run(body, headers)
        except BadInput as exc:
            return 400, _error_body(str(exc), "BadInput")
        except Exception as exc:
            log.exception("run() raised %s", type(exc).__name__)
            self.metrics.error()
            return 500, _error_body(str(exc), type(exc).__name__)
        finally:
            if watchdog is not None:
                watchdog.end()
            if entry.last_run_ns is not None:
                self.metrics.run(entry.last_run_ns)
        try:
            return 200, orjson.dumps(result, default=_json_default, option=_DUMP_OPTIONS)
        except TypeError as exc:
            log.error("run() returned a value that is not JSON: %s", exc)
            self.metrics.error()
            return 500, _error_body(f"run() returned a value that is not JSON: {exc}", "TypeError")

    # --- everything else ------------------------------------------------------------------

    async def _other(self, scope: Scope, send: Send) -> None:
        path = scope["path"]
        if scope["method"] not in ("GET", "HEAD"):
            status, body, ctype = 405, _error_body(f"{path} answers GET only", "MethodNotAllowed"), _JSON
        elif path == "/":
            status, body, ctype = 200, b"Healthy", _TEXT
        elif path == "/healthz":
            status, body, ctype = self._readiness()
        elif path == "/metrics":
            status, body, ctype = 200, render(self.board.totals()), _PROMETHEUS
        elif path == "/swagger.json":
            if self._swagger is None:
                status = 503
                body = _error_body("the entry script is not loaded yet", "NotReady")
            else:
                status, body = 200, self._swagger
            ctype = _JSON
        else:
            status, body, ctype = 404, _error_body(f"no route {path}", "NotFound"), _JSON
        await _respond(send, status, body, ctype, close=self.draining)
        self.metrics.request(ROUTE_OTHER, status)

    def _readiness(self) -> tuple[int, bytes, bytes]:
        if self.ready:
            return 200, b'{"status":"ready"}', _JSON
        if self.failure is not None:
            detail = {"status": "failed", "error": str(self.failure)}
            return 503, orjson.dumps(detail), _JSON
        return 503, b'{"status":"starting"}', _JSON

    # --- start-up -------------------------------------------------------------------------

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.start(asyncio.get_running_loop())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # What collect() calls left in memory goes to the spool before the process ends.
                await asyncio.to_thread(collector.shutdown)
                await send({"type": "lifespan.shutdown.complete"})
                return

    def preload(self) -> None:
        """Import the entry script and run ``init()`` now, in the calling thread (an instance
        that must not listen before it is ready). Raises :class:`ModuleStartFailure` after
        logging the traceback."""
        try:
            entry = EntryScript.load(self.module_dir)
            self._loaded(entry)
            entry.init()
        except BaseException as exc:
            log.error("module %s failed to start:\n%s", self.module_dir, traceback.format_exc())
            self.failure = exc
            # The cause from the traceback itself (the frame in the module's code), so that a
            # supervisor need not parse it back out of the log.
            described = describe(exc, read_layout(self.module_dir, os.environ).src_dir)
            raise ModuleStartFailure(described.cause, traceback=described.traceback) from None
        self.ready = True
        self.metrics.mark_ready()

    def start_draining(self) -> None:
        """From now on every response closes its connection (the instance is going away)."""
        self.draining = True

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Import the entry script and run ``init()`` in a background thread (unless
        :meth:`preload` did already)."""
        if self._init_thread is not None or self.ready:
            return

        def deliver(callback: Callable[..., None], *args: Any) -> None:
            # A closed loop means the server is already shutting down: nobody to tell.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, *args)

        def work() -> None:
            try:
                entry = EntryScript.load(self.module_dir)
                deliver(self._loaded, entry)
                entry.init()
            except BaseException as exc:
                log.error("module %s failed to start:\n%s", self.module_dir, traceback.format_exc())
                deliver(self._failed, exc)
            else:
                deliver(self._ready)

        # A daemon thread, so a shutdown during a slow init() is not held up by it.
        self._init_thread = threading.Thread(target=work, name="edgepack-init", daemon=True)
        self._init_thread.start()

    def _loaded(self, entry: EntryScript) -> None:
        self.entry = entry
        layout = entry.layout
        self._swagger = orjson.dumps(
            openapi_document(
                title=layout.name,
                version=layout.version,
                input_schema=entry.input_schema or layout.manifest_input_schema,
                output_schema=entry.output_schema or layout.manifest_output_schema,
            )
        )

    def _ready(self) -> None:
        self.ready = True
        self.metrics.mark_ready()

    def _failed(self, exc: BaseException) -> None:
        self.failure = exc
        self.on_fatal(exc)


def create_app(
    module_dir: Path,
    *,
    board: MetricsBoard | None = None,
    worker: int = 0,
    on_fatal: FatalHandler | None = None,
    limits: ServingLimits = ServingLimits(),
    keys: EndpointKeys | None = None,
    watchdog: RunWatchdog | None = None,
) -> ScoringApp:
    """The ASGI app serving ``module_dir``.

    ``board``/``worker`` give the metrics slot this worker writes (a fresh one-worker board
    by default); ``on_fatal`` is called when loading or ``init()`` fails (by default the
    process exits with code 5); ``limits`` bound the request bodies it holds.
    """
    read_layout(module_dir, os.environ)  # fail now, in the caller, on a directory that is no module
    if board is None:
        board = MetricsBoard(1)
    return ScoringApp(
        module_dir,
        metrics=board.worker(worker),
        board=board,
        on_fatal=on_fatal or _exit_process,
        limits=limits,
        keys=keys,
        watchdog=watchdog,
    )
