"""Which wave a device is in (pure): deterministic, spread across a tag's values, stable.

At the start of a rollout every targeted device gets a number in [0, 1) from a hash of the
rollout id and its id. Within each value of the spread tag (one group without ``--spread-by``)
devices are ranked by that number, and all devices are then ordered by their rank's position
within their group, (rank + ½) / group size: so every group is walked at the same pace and a
wave of 10 % takes about 10 % of every site. Wave *w* holds the first ``count(w)`` devices of
that order (cumulative). What is stored is, per group and wave, the hash number below which a
device is in the wave: the devices present at the start are placed exactly, and a device that
joins later is compared with its group's thresholds (a group never seen: the wave's share), so
it gets the version its wave would give without moving anybody else.
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence

Thresholds = dict[str, list[float]]


def unit_hash(rollout_id: str, device_id: str) -> float:
    """A number in [0, 1) fixed by the rollout and the device."""
    digest = hashlib.sha256(f"{rollout_id}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def group_of(tags: Mapping[str, str], spread_by: str | None) -> str:
    return "" if spread_by is None else tags.get(spread_by, "")


def wave_sizes(total: int, waves: Sequence[float]) -> list[int]:
    """How many devices waves 0..w hold together: the share rounded down, at least one device
    (a wave of nobody would bake nothing), every device in the last."""
    sizes = []
    for share in waves:
        size = total if share >= 100 else max(1, math.floor(total * share / 100))
        sizes.append(min(total, size))
    return sizes


def pick_thresholds(
    rollout_id: str,
    devices: Mapping[str, Mapping[str, str]],
    waves: Sequence[float],
    spread_by: str | None,
) -> Thresholds:
    """Per group, per wave: the hash number below which a device is in waves 0..w."""
    groups: dict[str, list[tuple[float, str]]] = defaultdict(list)
    for device_id, tags in devices.items():
        groups[group_of(tags, spread_by)].append((unit_hash(rollout_id, device_id), device_id))
    order: list[tuple[float, float, str, str]] = []
    for group, members in groups.items():
        members.sort()
        for rank, (u, device_id) in enumerate(members):
            order.append(((rank + 0.5) / len(members), u, group, device_id))
    order.sort()
    sizes = wave_sizes(len(order), waves)
    taken_by_wave: list[dict[str, int]] = []
    taken: dict[str, int] = defaultdict(int)
    walked = 0
    for size in sizes:
        for entry in order[walked:size]:
            taken[entry[2]] += 1
        walked = max(walked, size)
        taken_by_wave.append(dict(taken))
    out: Thresholds = {}
    for group, members in groups.items():
        limits = []
        for w in range(len(waves)):
            count = taken_by_wave[w].get(group, 0)
            last = w == len(waves) - 1
            limits.append(1.0 if last or count >= len(members) else members[count][0])
        out[group] = limits
    return out


def wave_of(
    rollout_id: str,
    device_id: str,
    tags: Mapping[str, str],
    *,
    waves: Sequence[float],
    thresholds: Mapping[str, Sequence[float]],
    spread_by: str | None,
) -> int:
    """The first wave (0-based) that holds the device."""
    u = unit_hash(rollout_id, device_id)
    limits = thresholds.get(group_of(tags, spread_by)) or [share / 100 for share in waves]
    for w, limit in enumerate(limits):
        if u < limit:
            return w
    return len(waves) - 1
