"""The agent's own C heap: fewer malloc arenas, and freed memory handed back to the system.

The agent runs for months on small devices, mostly idle. Two glibc habits keep memory it no
longer uses in its resident set: each thread that allocates may get an arena of its own (up
to 8 per core), and memory freed inside the heap stays mapped until something trims it
(starting up, verifying and unpacking a module free a few MB that would otherwise stay
resident). Both are set here, for this process only, through glibc's ``mallopt`` and
``malloc_trim``; on another C library (musl) or another system both do nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

log = logging.getLogger(__name__)

#: malloc arenas the agent's threads share (glibc's default is 8 per core). Its threads are
#: few and mostly wait, so two arenas cost no contention that matters. A ``MALLOC_ARENA_MAX``
#: in the agent's environment wins (glibc has read it already).
ARENA_MAX = 2
#: glibc's ``mallopt`` parameter number for the arena cap (malloc.h)
_M_ARENA_MAX = -8


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name or "libc.so.6")
        # only glibc has both; musl's libc has neither
        libc.mallopt.argtypes, libc.malloc_trim.argtypes = [ctypes.c_int, ctypes.c_int], [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def cap_arenas(arena_max: int = ARENA_MAX) -> bool:
    """Cap the malloc arenas at ``arena_max``; call before the agent starts its threads.
    True when glibc took the setting."""
    if _LIBC is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return bool(_LIBC.mallopt(_M_ARENA_MAX, arena_max))


def trim() -> bool:
    """Hand the heap's free memory back to the system (cheap: a walk of the free lists).
    True when some was released."""
    if _LIBC is None:
        return False
    return bool(_LIBC.malloc_trim(0))


def resident_mb() -> float:
    """This process's resident set, in MB (0.0 where /proc is not there)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def settle() -> None:
    """What the agent does when its last operation has ended: trim the heap, and say (at
    debug level) how much that gave back."""
    before = resident_mb()
    released = trim()
    log.debug("settled: heap trimmed (%s), resident %.1f -> %.1f MB", released, before, resident_mb())
