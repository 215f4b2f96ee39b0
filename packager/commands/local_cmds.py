"""Using a module on this machine: serve it, call a scoring service, score a batch of records.

``serve`` is the laptop equivalent of a local web service deployment: it verifies the bundle,
unpacks it into the same content-addressed cache an edge device uses, and runs the same
scoring server. ``batch`` runs the entry script in-process over a file or folder of request
bodies, the way a batch endpoint would.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from edge_agent.cache import InstalledModule
from manifests.errors import ConfigError, EdgepackError, RuntimeFailure
from packager.app import app, console
from packager.commands.options import CacheOption, TrustOption, bars, request_body
from packager.files import atomic_output
from packager.sdk.local import install_bundle, trust_store
from packager.sdk.scoring import decode_answer, post_score, scoring_url, tls_verify
from packager.sdk.scoring import server_message as server_message  # tests read it from here


def install(bundle: Path, trust: list[Path] | None, cache_dir: Path | None) -> InstalledModule:
    """Verify ``bundle`` (refusing exactly as ``edgepack verify`` does) into the cache."""
    return install_bundle(bundle, trust_store(trust), cache_dir, progress=bars())


# --- serve ---------------------------------------------------------------------------------


def display_host(host: str) -> str:
    """The host to put in a URL a user can open: a wildcard bind is reached via loopback."""
    if host in ("0.0.0.0", ""):
        return "127.0.0.1"
    if host == "::":
        return "[::1]"
    return f"[{host}]" if ":" in host else host


@app.command("serve")
def serve_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    port: Annotated[int, typer.Option(help="TCP port to listen on", min=1, max=65535)] = 8890,
    host: Annotated[str, typer.Option(help="address to bind (0.0.0.0 for every interface)")] = (
        "127.0.0.1"
    ),
    workers: Annotated[int, typer.Option(help="worker processes", min=1, max=64)] = 1,
    trust: TrustOption = None,
    cache: CacheOption = None,
) -> None:
    """Verify a module bundle, unpack it into the local cache and serve it over HTTP.

    The same scoring server an edge device runs: POST /score, GET /healthz, GET /swagger.json,
    GET /metrics. A bundle that 'edgepack verify' refuses is refused here too (exit code 3).
    """
    from edge_agent.scoring.server import serve_module  # imports the web stack only when serving

    installed = install(bundle, trust, cache)
    m = installed.manifest
    console.print(
        f"module   {m.ref}  ({installed.manifest_digest[:19]}…)  {installed.dir}",
        highlight=False,
        soft_wrap=True,
    )
    console.print(
        f"scoring  [bold]http://{display_host(host)}:{port}/score[/]  "
        f"({workers} worker{'s' if workers > 1 else ''}; Ctrl+C stops)",
        highlight=False,
        soft_wrap=True,
    )
    serve_module(installed.dir, host=host, port=port, workers=workers)


# --- call ----------------------------------------------------------------------------------


@app.command("call")
def call_cmd(
    url: Annotated[str, typer.Argument(help="service URL; /score is added when it has no path")],
    data: Annotated[str | None, typer.Option("--data", "-d", help="request body (JSON)")] = None,
    file: Annotated[
        Path | None, typer.Option("--file", "-f", help="file holding the request body")
    ] = None,
    timeout: Annotated[float, typer.Option(help="seconds to wait for the answer", min=0.1)] = 30.0,
    key: Annotated[
        str | None,
        typer.Option(
            "--key",
            envvar="EDGEPACK_SERVICE_KEY",
            help="endpoint key (authEnabled services; see 'edgepack service keys')",
        ),
    ] = None,
    ca: Annotated[
        Path | None, typer.Option("--ca", help="CA certificate to verify an HTTPS service with")
    ] = None,
) -> None:
    """POST one request to a scoring service and print its JSON answer.

    Exit code 5 when the service's run() raised, 4 when the service cannot be reached or
    answers with another error status.
    """
    body = request_body(data, file)
    response = post_score(scoring_url(url), body, key=key, verify=tls_verify(ca), timeout=timeout)
    answer = decode_answer(response)
    if isinstance(answer, str):
        console.print(response.text, markup=False, highlight=False)
    else:
        console.print_json(data=answer)


# --- batch ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Record:
    """One request body to score, where it came from, and why it cannot be sent (if so)."""

    source: str
    body: str
    problem: str | None = None


def _checked(source: str, body: str) -> Record:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return Record(source, body, f"invalid JSON: {exc}")
    return Record(source, body)


def read_records(path: Path) -> tuple[int, Iterator[Record]]:
    """How many records ``path`` holds, and an iterator over them.

    - ``*.jsonl``: one request body per non-blank line (source ``FILE:LINE``);
    - ``*.json``: one request body; a top-level JSON array is a list of bodies
      (source ``FILE[i]``) — send a body that is itself an array through a ``.jsonl`` file;
    - a folder: each ``*.json`` file in it, sorted by name, is one body, as it is.
    """
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix == ".json" and p.is_file())
        return len(files), (_checked(str(p), _read_text(p)) for p in files)
    if not path.is_file():
        raise ConfigError(f"{path}: input file or folder not found")
    if path.suffix == ".jsonl":
        with path.open("rb") as fh:
            count = sum(1 for line in fh if line.strip())
        return count, _jsonl_records(path)
    if path.suffix == ".json":
        text = _read_text(path)
        try:
            doc = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON ({exc})") from None
        if isinstance(doc, list):
            bodies = [orjson.dumps(item).decode() for item in doc]
            return len(bodies), (Record(f"{path}[{i}]", b) for i, b in enumerate(bodies))
        return 1, iter([Record(str(path), text)])
    raise ConfigError(f"{path}: expected a .jsonl file, a .json file or a folder of .json files")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read ({exc})") from None


def _jsonl_records(path: Path) -> Iterator[Record]:
    with path.open(encoding="utf-8", errors="replace") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                yield _checked(f"{path}:{lineno}", line.rstrip("\r\n"))


def result_line(
    index: int, record: Record, output: Any = None, error: str | None = None
) -> tuple[bytes, bool]:
    """One output line and whether the record succeeded; an output that is not JSON becomes
    an error, not a crash."""
    doc: dict[str, Any] = {"index": index, "source": record.source}
    if error is None:
        try:
            line = orjson.dumps(
                {**doc, "output": output}, default=_tolist, option=orjson.OPT_SERIALIZE_NUMPY
            )
            return line + b"\n", True
        except TypeError as exc:
            error = f"run() returned a value that is not JSON-serialisable: {exc}"
    return orjson.dumps({**doc, "error": error}) + b"\n", False


def _tolist(value: Any) -> Any:
    # As the scoring server encodes answers: values that know how to become lists
    # (pandas, torch...) do, so a batch gives what POST /score would have answered.
    tolist = getattr(value, "tolist", None)
    if callable(tolist):
        return tolist()
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def describe(exc: BaseException) -> str:
    """An exception as one line: its class and message."""
    message = " ".join(str(exc).split())
    return f"{exc.__class__.__name__}: {message}" if message else exc.__class__.__name__


@app.command("batch")
def batch_cmd(
    bundle: Annotated[Path, typer.Argument(help=".edgepack file")],
    input_path: Annotated[
        Path,
        typer.Option("--input", "-i", help=".jsonl file, .json file, or folder of .json files"),
    ],
    output: Annotated[Path, typer.Option("--output", "-o", help="results (.jsonl)")],
    trust: TrustOption = None,
    cache: CacheOption = None,
    allow_failures: Annotated[
        bool, typer.Option("--allow-failures", help="exit 0 even when some records failed")
    ] = False,
) -> None:
    """Score every record of a file or folder with a module, in this process.

    Input: a .jsonl file holds one request body per line; a .json file holds one body, or a
    JSON array of bodies; a folder holds one body per .json file (sorted by name).
    Output: one JSON line per record, {"index", "source", "output"} or {"index", "source",
    "error"}; a bad record is reported there and never stops the batch. The output file
    appears only once the batch is complete.

    Exit code 0 when every record was scored; 1 when any failed (the output is still
    written; --allow-failures makes that 0); 3 for a refused bundle; 5 when init() fails.
    """
    # The entry script runs from its own folder (as on Azure ML): fix paths first.
    input_path, output = input_path.absolute(), output.absolute()
    total, records = read_records(input_path)
    if total == 0:
        raise ConfigError(f"{input_path}: no records to score")
    installed = install(bundle, trust, cache)

    from edge_agent.scoring.entry import BadInput, EntryScript

    script = EntryScript.load(installed.dir)
    try:
        script.init()
    except Exception as exc:
        raise RuntimeFailure(
            f"{installed.manifest.ref}: init() failed: {describe(exc)}; "
            "fix the entry script or the model and build again"
        ) from None

    failed = 0
    with atomic_output(output) as fh, _record_progress() as progress:
        task = progress.add_task(f"scoring {installed.manifest.ref}", total=total)
        for index, record in enumerate(records):
            if record.problem is not None:
                line, ok = result_line(index, record, error=record.problem)
            else:
                try:
                    line, ok = result_line(index, record, output=script.run(record.body))
                except BadInput as exc:
                    line, ok = result_line(index, record, error=str(exc))
                except Exception as exc:
                    line, ok = result_line(index, record, error=describe(exc))
            failed += not ok
            fh.write(line)
            progress.advance(task)
    console.print(
        f"scored {total} record(s): {total - failed} ok, {failed} failed → {output}",
        highlight=False,
    )
    if failed and not allow_failures:
        raise EdgepackError(
            f"{failed} of {total} record(s) failed; see their 'error' in {output}"
        )


def _record_progress() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
        transient=True,
    )
