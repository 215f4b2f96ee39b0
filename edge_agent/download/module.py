"""Fetch one module named by a verified desired state into the cache.

In order, and nothing is used before it is checked:

1. the manifest bytes must hash to the digest the desired state names (the hub signed that
   digest), and their signature must verify against the device's **own** publisher keys (a
   hub cannot make a device run a module no trusted publisher signed);
2. only blobs the cache does not hold are fetched, so an update that changes one file moves
   one file;
3. before the first byte, the free space must fit everything still to come (plus a reserve):
   otherwise the module is Unschedulable with the numbers, instead of a download loop on a
   full disk;
4. each blob streams into ``.<hex>.partial`` and is hashed as it arrives; an interrupted
   transfer resumes with an HTTP ``Range`` request, even after the agent was killed;
5. the module folder is built from the blobs only when all are there.

Cancellation and the deadline are checked between chunks: a newer desired state takes over
within one chunk, and no download waits for ever.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass

from edge_agent.cache.blobs import cache_errors
from edge_agent.cache.modules import InstalledModule, ModuleCache
from edge_agent.uplink.http import HubHttp
from manifests.digests import sha256_digest
from manifests.errors import FetchError, HubRefused, TrustError, Unschedulable
from manifests.signing import TrustStore
from manifests.verified import parse_module_manifest

log = logging.getLogger(__name__)

#: room kept free beyond what a module needs (logs, state files, the file system itself)
RESERVE_BYTES = 16 << 20
PROGRESS_EVERY_BYTES = 4 << 20

UNTRUSTED_HINT = (
    "this device runs only modules signed by the publishers the hub trusted when the device "
    "was enrolled; sign it with one of those keys, or enroll the device again after the hub "
    "trusts the new publisher"
)


class Cancelled(Exception):
    """The operation was cancelled at a safe point (a newer desired state wants otherwise)."""


@dataclass
class Counters:
    """What this agent has downloaded (reported in ``edgepack agent status``)."""

    manifests: int = 0
    blobs: int = 0
    bytes: int = 0


@dataclass(frozen=True)
class FetchControl:
    """How an operation is steered from outside: cancel, deadline, progress."""

    cancelled: Callable[[], bool]
    deadline: float  # time.monotonic() by which the fetch must be done
    progress: Callable[[int, int], None]  # bytes done, bytes total


def _check(control: FetchControl, what: str) -> None:
    if control.cancelled():
        raise Cancelled(what)
    if time.monotonic() > control.deadline:
        raise FetchError(f"{what}: did not finish before its deadline; retrying later")


def fetch_module(
    hub: HubHttp,
    cache: ModuleCache,
    digest: str,
    publishers: TrustStore,
    control: FetchControl,
    counters: Counters,
    *,
    reserve_bytes: int = RESERVE_BYTES,
) -> InstalledModule:
    """The installed module ``digest``, fetched and verified if the cache lacks it."""
    installed = cache.open_installed(digest, publishers)
    if installed is not None:
        return installed
    what = f"module {digest[:19]}"
    data = hub.manifest(digest)
    counters.manifests += 1
    if sha256_digest(data) != digest:
        raise TrustError(
            f"{what}: the manifest the hub sent does not match the digest in the signed desired "
            "state; refused"
        )
    verified = parse_module_manifest(data, publishers, what=what, untrusted_hint=UNTRUSTED_HINT)
    ref = verified.manifest.ref
    missing = {d: size for d, size in verified.blob_sizes.items() if not cache.blobs.held(d, size)}
    total = sum(missing.values())
    already = {d: min(cache.blobs.partial_size(d), size) for d, size in missing.items()}
    still = total - sum(already.values())
    with cache_errors(f"module {ref}"):
        free = shutil.disk_usage(cache.root if cache.root.exists() else cache.root.parent).free
    if still + reserve_bytes > free:
        raise Unschedulable(
            f"module {ref} needs {still + reserve_bytes} bytes of disk ({still} to download, "
            f"{reserve_bytes} reserve) but {free} are free in {cache.root}; free some space"
        )
    done = sum(already.values())
    control.progress(done, total)
    for blob, size in sorted(missing.items()):
        done = _fetch_blob(hub, cache, blob, size, control, counters, done, total, ref)
    _check(control, f"module {ref}")
    installed = cache.install_verified(verified)
    log.info("module %s fetched: %d blob(s), %d byte(s)", ref, len(missing), total)
    return installed


def _fetch_blob(
    hub: HubHttp,
    cache: ModuleCache,
    blob: str,
    size: int,
    control: FetchControl,
    counters: Counters,
    done: int,
    total: int,
    ref: str,
) -> int:
    what = f"download of {blob} for {ref}"
    # Another service's fetch of the same blob (or another process's) may hold it: this one
    # waits for it and finds the blob held, one download shared by both.
    writer = cache.blobs.begin_resumable(blob, size, check=lambda: _check(control, what))
    if writer is None:
        done = min(done + size, total)
        control.progress(done, total)
        return done
    start_done = done - writer.offset
    try:
        if writer.offset < size:
            with hub.blob(blob, writer.offset) as (start, chunks):
                if start != writer.offset:
                    writer.restart()
                last = done
                for chunk in chunks:
                    writer.write(chunk)
                    counters.bytes += len(chunk)
                    done = start_done + writer.offset
                    if done - last >= PROGRESS_EVERY_BYTES:
                        control.progress(done, total)
                        last = done
                    _check(control, what)
        writer.commit()
    except (TrustError, HubRefused):
        # Wrong bytes, or the hub refuses to serve the blob (its copy no longer matches): what
        # arrived before is as suspect as the rest, so the next attempt starts from byte 0.
        writer.discard()
        raise
    except BaseException:
        writer.abort()  # keep what arrived: the next attempt resumes from there
        raise
    counters.blobs += 1
    done = start_done + size
    control.progress(done, total)
    return done
