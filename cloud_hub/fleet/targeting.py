"""Which devices a deployment targets: device tags, tag selectors, explicit device lists.

A selector is a comma-separated list of ``key=value`` pairs (``site=berlin,tier=gpu``) and
matches a device whose tags hold every pair. There is deliberately no empty selector: a typo
must never turn into "deploy to the whole fleet".
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from manifests.desired import DEVICE_ID_PATTERN, check_tag, check_tag_count
from manifests.errors import ConfigError

_DEVICE_RE = re.compile(DEVICE_ID_PATTERN)


def parse_tag(text: str, *, what: str = "tag") -> tuple[str, str]:
    """``"site=berlin"`` → ``("site", "berlin")``; anything else is a ConfigError."""
    key, sep, value = text.strip().partition("=")
    key, value = key.strip(), value.strip()
    if not sep:
        raise ConfigError(f"{what} {text!r}: expected key=value, e.g. site=berlin")
    try:
        check_tag(key, value)
    except ConfigError as exc:
        raise ConfigError(f"{what} {text!r}: {exc}") from None
    return key, value


def parse_tags(items: Iterable[str], *, what: str = "tag") -> dict[str, str]:
    """Several ``key=value`` strings into one dict; a key given twice is an error."""
    tags: dict[str, str] = {}
    for item in items:
        key, value = parse_tag(item, what=what)
        if key in tags and tags[key] != value:
            raise ConfigError(f"{what} key {key!r} is given twice ({tags[key]!r} and {value!r})")
        tags[key] = value
    return tags


def parse_selector(text: str) -> dict[str, str]:
    """``"site=berlin,tier=gpu"`` → ``{"site": "berlin", "tier": "gpu"}``."""
    if not text.strip():
        raise ConfigError(
            "selector is empty; give key=value pairs separated by commas, e.g. site=berlin,tier=gpu"
        )
    parts = text.split(",")
    check_tag_count(len(parts), "items in the selector")
    if any(not p.strip() for p in parts):
        raise ConfigError(f"selector {text!r} has an empty item; remove the stray comma")
    return parse_tags(parts, what="selector item")


def format_selector(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def check_tags(tags: Mapping[str, Any]) -> dict[str, str]:
    """Validate a tag mapping that arrived as JSON (keys and values as in ``parse_tag``)."""
    check_tag_count(len(tags))
    out: dict[str, str] = {}
    for key, value in tags.items():
        if not isinstance(value, str):
            raise ConfigError(f"tag {key!r}: value must be a string, got {type(value).__name__}")
        k, v = parse_tag(f"{key}={value}")
        out[k] = v
    return out


def check_device_id(device_id: str) -> str:
    if not _DEVICE_RE.fullmatch(device_id):
        raise ConfigError(
            f"device id {device_id!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


def selector_matches(selector: Mapping[str, str], tags: Mapping[str, str]) -> bool:
    return all(tags.get(k) == v for k, v in selector.items())


class Target(BaseModel):
    """A deployment's target: explicit device ids, or a tag selector. Exactly one."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: tuple[str, ...] | None = Field(default=None, min_length=1)
    selector: dict[str, str] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Target:
        if (self.devices is None) == (self.selector is None):
            raise ValueError("give exactly one of 'devices' or 'selector'")
        return self

    def includes(self, device_id: str, tags: Mapping[str, str]) -> bool:
        if self.devices is not None:
            return device_id in self.devices
        assert self.selector is not None
        return selector_matches(self.selector, tags)

    def describe(self) -> str:
        if self.devices is not None:
            return "devices " + ", ".join(self.devices)
        assert self.selector is not None
        return "selector " + format_selector(self.selector)


def parse_target(raw: Any) -> Target:
    """A target as the API receives it: ``{"devices": [...]}`` or ``{"selector": "k=v,..."}``."""
    if not isinstance(raw, Mapping):
        raise ConfigError('target must be an object: {"devices": ["ID", ...]} or {"selector": "k=v,..."}')
    unknown = set(raw) - {"devices", "selector"}
    if unknown:
        raise ConfigError(f"target: unknown field {sorted(unknown)[0]!r}; use 'devices' or 'selector'")
    devices, selector = raw.get("devices"), raw.get("selector")
    if (devices is None) == (selector is None):
        raise ConfigError("target: give exactly one of 'devices' or 'selector'")
    if devices is not None:
        if not isinstance(devices, list) or not devices or not all(isinstance(d, str) for d in devices):
            raise ConfigError("target.devices: must be a non-empty list of device ids")
        ids = tuple(dict.fromkeys(check_device_id(d) for d in devices))
        return Target(devices=ids)
    if isinstance(selector, str):
        return Target(selector=parse_selector(selector))
    if isinstance(selector, Mapping) and selector:
        return Target(selector=check_tags(selector))
    raise ConfigError("target.selector: must be a string such as 'site=berlin,tier=gpu'")
