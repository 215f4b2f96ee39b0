"""Reading a message from a newer peer: the fields this version does not know are dropped
instead of refusing the whole message.

The contracts forbid unknown fields, so that a misspelt field in a document someone writes is
an error. A message one program sends another in a mixed fleet is different: an agent one
version ahead adds a field (``failure`` beside ``reason``), and a hub that refused its whole
report for it would lose the device's state. :func:`parse_lenient` keeps the strictness for
everything else: every field it knows is checked as before, and the bytes are bounded by the
caller before they get here.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar, get_args

from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from manifests.logs import LogResponse
from manifests.reported import ReportedState, Telemetry

M = TypeVar("M", bound=BaseModel)


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model a field holds (itself, in a list, or optional), if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def known_fields(model: type[BaseModel], data: Any) -> Any:
    """``data`` (parsed JSON) without the keys ``model`` does not declare, at every depth."""
    if isinstance(data, list):
        return [known_fields(model, item) for item in data]
    if not isinstance(data, dict):
        return data
    fields: dict[str, FieldInfo] = {}
    for name, field in model.model_fields.items():
        fields[name] = field
        if field.alias:
            fields[field.alias] = field
    kept = {}
    for key, value in data.items():
        known = fields.get(key)
        if known is None:
            continue
        inner = _model_in(known.annotation)
        kept[key] = known_fields(inner, value) if inner is not None else value
    return kept


def parse_lenient(model: type[M], payload: bytes) -> M:
    """``payload`` as ``model``, ignoring fields it does not know (see the module). Raises
    :class:`ValidationError` for everything else that is wrong with it."""
    try:
        return model.model_validate_json(payload)
    except ValidationError as exc:
        if any(error["type"] != "extra_forbidden" for error in exc.errors()):
            raise
    # Only unknown fields were wrong: validated again without them, from JSON as before (so
    # that strict fields read the same).
    return model.model_validate_json(json.dumps(known_fields(model, json.loads(payload))))


#: What agents send since hubs read leniently, and a hub from before that refuses whole: held
#: back until the applied desired state says its hub reads newer messages
#: (``DesiredState.hub_reads_newer``). The agents go first in an upgrade (an older agent
#: refuses a newer hub's desired states), so a newer agent must keep speaking to the older
#: hub; the list stays as long as such hubs may be out there.
HELD_BACK: dict[type[BaseModel], dict[str, Any]] = {
    ReportedState: {"link_problem": True, "modules": {"__all__": {"failure"}}},
    Telemetry: {
        "modules": {
            "__all__": {"p95_ms", "run_p50_ms", "run_p95_ms", "data_spooled_bytes", "data_dropped_total"}
        }
    },
    LogResponse: {"version": True, "failed_version": True},
}


def encode_for_hub(message: BaseModel, *, hub_reads_newer: bool) -> bytes:
    """``message`` as JSON for a hub: all of it when the hub reads newer messages, else
    without the fields an older hub refuses (:data:`HELD_BACK`)."""
    held = None if hub_reads_newer else HELD_BACK.get(type(message))
    return message.model_dump_json(by_alias=True, exclude=held).encode()
