"""Calling a scoring service: ``POST /score`` with a JSON body, errors as one line.

Used by ``Service.run`` (a device's endpoint), ``LocalService.run`` and ``edgepack call``.
"""

from __future__ import annotations

import json
import ssl
from pathlib import Path
from typing import Any

import httpx
import orjson

from manifests.errors import ConfigError, FetchError
from packager.sdk.errors import BadArgument, ScoringRunFailed


def scoring_url(url: str) -> str:
    """``url`` as a full scoring URL: ``http://`` when no scheme, ``/score`` when no path."""
    text = url.strip()
    if "://" not in text:
        text = "http://" + text
    try:
        parsed = httpx.URL(text)
    except httpx.InvalidURL as exc:
        raise ConfigError(f"{url!r} is not a URL ({exc})") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise ConfigError(f"{url!r}: expected http://HOST:PORT[/PATH]")
    if parsed.path in ("", "/"):
        parsed = parsed.copy_with(path="/score")
    return str(parsed)


def request_bytes(input_data: Any) -> bytes:
    """A request body from what a caller passes ``run``: a JSON string or bytes as they are,
    anything else encoded as JSON. A string that is not JSON is a :class:`BadArgument`."""
    if isinstance(input_data, str | bytes):
        body = input_data.encode() if isinstance(input_data, str) else input_data
        try:
            orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadArgument(
                f"input_data is not valid JSON ({exc}); pass a JSON string or an object"
            ) from None
        return body
    try:
        return orjson.dumps(input_data, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        raise BadArgument(f"input_data cannot be sent as JSON ({exc})") from None


def server_message(body: bytes) -> str:
    """The one-line reason a scoring server gave with an error status."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        doc = None
    if isinstance(doc, dict):
        for key in ("error", "message", "detail"):
            value = doc.get(key)
            if isinstance(value, dict):
                value = value.get("message") or value.get("detail") or json.dumps(value)
            if value:
                message = " ".join(str(value).split())
                kind = doc.get("type")  # the scoring server names the exception class here
                if isinstance(kind, str) and kind and not message.startswith(kind):
                    message = f"{kind}: {message}"
                return message
    text = " ".join(body.decode("utf-8", "replace").split())
    return text[:300] + ("…" if len(text) > 300 else "") or "(empty response)"


def _names_an_exception(body: bytes) -> bool:
    """Whether an error body has the scoring server's ``{"error": …, "type": CLASS}`` form,
    which it sends when ``run()`` raised (a proxy's 500 page does not)."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(doc, dict) and isinstance(doc.get("type"), str) and "error" in doc


def tls_verify(ca: Path | None) -> ssl.SSLContext | bool:
    """Verify an HTTPS service against ``ca`` when given, else against the system's CAs."""
    if ca is None:
        return True
    if not ca.is_file():
        raise ConfigError(f"{ca}: CA certificate not found")
    return ssl.create_default_context(cafile=str(ca))


def post_score(
    url: str,
    body: bytes,
    *,
    key: str | None = None,
    verify: ssl.SSLContext | bool = True,
    timeout: float = 30.0,
) -> httpx.Response:
    """POST ``body`` to a scoring URL; the answer, or a :class:`FetchError` saying why not."""
    target = scoring_url(url)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    try:
        response = httpx.post(target, content=body, headers=headers, timeout=timeout, verify=verify)
    except httpx.ConnectError as exc:
        raise FetchError(
            f"cannot connect to {target} ({exc}); check that the service is running "
            "(e.g. 'edgepack serve') and that the host and port are right"
        ) from None
    except httpx.TimeoutException:
        raise FetchError(
            f"{target}: no answer within {timeout:g} s; check the service's log, "
            "or allow more time with --timeout"
        ) from None
    except httpx.HTTPError as exc:
        raise FetchError(f"{target}: {exc.__class__.__name__}: {exc}") from None
    if response.status_code == 500 and _names_an_exception(response.content):
        raise ScoringRunFailed(
            f"{target}: HTTP 500, the service's run() raised {server_message(response.content)}; "
            "its log says where ('edgepack service logs' for a deployed one)"
        )
    if not response.is_success:
        raise FetchError(
            f"{target}: HTTP {response.status_code} {response.reason_phrase}: "
            f"{server_message(response.content)}"
        )
    return response


def decode_answer(response: httpx.Response) -> Any:
    """A scoring answer: its JSON, or its text when it is not JSON."""
    try:
        return orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return response.text
