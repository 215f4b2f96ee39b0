"""Talking to one instance on its private probe port: readiness, metrics, a scored example.

The probe port belongs to exactly one instance, so these answers are that instance's even
while two versions share the public port. Plain ``http.client``: one short request on
loopback, no pool needed. An instance whose endpoint speaks TLS is probed over TLS without
verifying its certificate (it is our own process on loopback), and one whose endpoint needs a
key is given the agent's own key for that instance (``docs/security.md``).
"""

from __future__ import annotations

import functools
import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any

from edge_agent.scoring.metrics import Totals, parse
from edge_agent.scoring.openapi import GENERIC_SCHEMA
from edge_agent.state.records import InstanceRecord

PROBE_HOST = "127.0.0.1"


@functools.cache
def _loopback_tls() -> ssl.SSLContext:
    """The context for TLS services' probe ports, made with the first one: an OpenSSL context
    holds about 1 MB, which an agent without TLS services should not carry."""
    return ssl._create_unverified_context()


@dataclass(frozen=True)
class Target:
    port: int
    tls: bool = False
    key: str | None = None  # the agent's own endpoint key for this instance

    @classmethod
    def of(cls, instance: InstanceRecord, port: int | None = None) -> Target | None:
        chosen = port if port is not None else instance.probe_port
        if chosen is None:
            return None
        return cls(chosen, instance.assignment.settings.tls is not None, instance.agent_key)


def _request(
    target: Target, method: str, path: str, timeout_s: float, body: bytes | None = None
) -> tuple[int, bytes] | None:
    conn = (
        http.client.HTTPSConnection(PROBE_HOST, target.port, timeout=timeout_s, context=_loopback_tls())
        if target.tls
        else http.client.HTTPConnection(PROBE_HOST, target.port, timeout=timeout_s)
    )
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        if target.key is not None:
            headers["Authorization"] = f"Bearer {target.key}"
        conn.request(method, path, body=body, headers=headers)
        response = conn.getresponse()
        return response.status, response.read(1 << 20)
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


def healthy(target: Target, path: str, timeout_s: float) -> bool:
    """True when the instance answers its health path with 200 within ``timeout_s``."""
    answer = _request(target, "GET", path, timeout_s)
    return answer is not None and answer[0] == 200


def metrics(target: Target, timeout_s: float = 2.0) -> Totals | None:
    answer = _request(target, "GET", "/metrics", timeout_s)
    if answer is None or answer[0] != 200:
        return None
    try:
        return parse(answer[1].decode("utf-8", errors="replace"))
    except (ValueError, KeyError, IndexError):
        return None


def input_example(target: Target, timeout_s: float) -> bytes | None:
    """The example request body the module's input schema gives, if it gives one."""
    answer = _request(target, "GET", "/swagger.json", timeout_s)
    if answer is None or answer[0] != 200:
        return None
    try:
        schema = json.loads(answer[1])["components"]["schemas"]["ServiceInput"]
    except (ValueError, KeyError, TypeError):
        return None
    if schema == GENERIC_SCHEMA:
        return None  # the module declares no input schema: its placeholder example says nothing
    example = _example_of(schema)
    return None if example is None else json.dumps(example).encode()


def _example_of(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return None
    if "example" in schema:
        return schema["example"]
    properties = schema.get("properties")
    if isinstance(properties, dict) and properties:
        parts = {name: _example_of(sub) for name, sub in properties.items()}
        if all(v is not None for v in parts.values()):
            return parts
    return None


def score(target: Target, body: bytes, timeout_s: float) -> tuple[int, bytes] | None:
    """POST ``body`` to the instance's ``/score``: (status, body), or None on no answer."""
    return _request(target, "POST", "/score", timeout_s, body)
