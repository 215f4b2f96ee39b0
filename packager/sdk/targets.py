"""Where a service runs: the devices whose tags match a selector, or devices named by id.

Azure ML deploys to a compute target; edgepack deploys to devices. There is deliberately no
"every device" target: a typo must never turn into a deployment to the whole fleet.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, TypeAlias

from manifests.desired import DEVICE_ID_PATTERN
from packager.sdk.errors import BadArgument


def check_device_id(device_id: object) -> str:
    """A device id the hub accepts; a BadArgument otherwise."""
    if not isinstance(device_id, str) or not re.fullmatch(DEVICE_ID_PATTERN, device_id):
        raise BadArgument(
            f"device id {device_id!r}: use 1-63 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return device_id


@dataclass(frozen=True)
class Selector:
    """Devices whose tags hold every ``key=value`` pair: ``Selector("site=berlin,tier=gpu")``
    or ``Selector(site="berlin", tier="gpu")``. Devices enrolled or tagged later that match
    get the service too."""

    pairs: tuple[tuple[str, str], ...]

    def __init__(self, text: str | None = None, /, **tags: str) -> None:
        pairs: dict[str, str] = {}
        if text is not None:
            if not isinstance(text, str):
                raise BadArgument(f"Selector: expected 'key=value,...', got {type(text).__name__}")
            items = text.split(",")
            for item in items:
                key, sep, value = item.partition("=")
                if not sep or not key.strip() or not value.strip():
                    raise BadArgument(
                        f"selector {text!r}: each item must be key=value, e.g. site=berlin,tier=gpu"
                    )
                pairs[key.strip()] = value.strip()
        for key, value in tags.items():
            if not isinstance(value, str) or not value:
                raise BadArgument(f"selector {key}={value!r}: the value must be a non-empty string")
            pairs[key] = value
        if not pairs:
            raise BadArgument("selector is empty; give key=value pairs, e.g. Selector('site=berlin')")
        object.__setattr__(self, "pairs", tuple(sorted(pairs.items())))

    def __str__(self) -> str:
        return ",".join(f"{k}={v}" for k, v in self.pairs)

    def to_json(self) -> dict[str, Any]:
        """The target as the hub's deployment API takes it."""
        return {"selector": str(self)}


@dataclass(frozen=True)
class Devices:
    """Exactly these devices, by id: ``Devices(["edge-1", "edge-2"])``."""

    ids: tuple[str, ...]

    def __init__(self, ids: Iterable[str] | str, /) -> None:
        names = [ids] if isinstance(ids, str) else list(ids)
        if not names:
            raise BadArgument("Devices: name at least one device id")
        for device_id in names:
            check_device_id(device_id)
        object.__setattr__(self, "ids", tuple(dict.fromkeys(names)))

    def __str__(self) -> str:
        return ", ".join(self.ids)

    def to_json(self) -> dict[str, Any]:
        """The target as the hub's deployment API takes it."""
        return {"devices": list(self.ids)}


Target: TypeAlias = Selector | Devices


def check_target(target: object, what: str) -> Target:
    """``target`` if it is a :class:`Selector` or :class:`Devices`, else a BadArgument."""
    if isinstance(target, Selector | Devices):
        return target
    raise BadArgument(
        f"{what}: target must be Selector('key=value') or Devices(['id', ...]), not {type(target).__name__}"
    )
