"""Sign-in throttling: a growing delay per client address after repeated wrong admin tokens.

Without it anyone who reaches the hub could try tokens as fast as it answers. Now wrong
tokens from an address are answered 401, and the ``free_failures``-th starts a block of
``base_delay_s`` during which every attempt from that address, right token or wrong, is
refused (429 with ``Retry-After``) without the token being looked at, so a block tells the
attacker nothing. Each wrong token after a block starts the next one, twice as long, up to
``max_delay_s``. A right token after a block resets the address; an address that sends
nothing for ``forget_after_s`` is forgotten.

The table is bounded: at most ``max_clients`` addresses, the least recently seen forgotten
first. The state is per hub process (replicas do not share it): what an address may try is
multiplied by the number of replicas it reaches, and a restart forgets it. That is chosen on
purpose: a table in the database would make every wrong token a write, which is an attack of
its own.

Pure logic with an injectable clock; the route (``api.dashboard.login``) does the I/O.
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

#: IPv6 clients are counted per /64: one host usually holds a whole /64 and could otherwise
#: take a fresh address for every attempt.
IPV6_PREFIX = 64


@dataclass(frozen=True)
class ThrottlePolicy:
    free_failures: int = 5
    base_delay_s: float = 1.0
    max_delay_s: float = 300.0
    forget_after_s: float = 900.0
    max_clients: int = 10_000

    def __post_init__(self) -> None:
        if self.free_failures < 1 or self.max_clients < 1:
            raise ValueError("free_failures and max_clients must be at least 1")
        if not 0 < self.base_delay_s <= self.max_delay_s:
            raise ValueError("need 0 < base_delay_s <= max_delay_s")


@dataclass(slots=True)
class _Client:
    failures: int = 0
    blocked_until: float = 0.0
    last_seen: float = 0.0
    #: this address is in a throttling episode (reported once, ended by a success or forgetting)
    throttled: bool = False


@dataclass(frozen=True)
class Admission:
    """The verdict on one sign-in attempt, before its token is compared.

    ``retry_after_s`` > 0: refused, the address is blocked for that long. Otherwise the attempt
    may go on; ``block_s`` is the block it starts if its token is wrong (0 for none), and
    ``episode_started`` says that block begins a new throttling episode (the moment to record
    an event)."""

    retry_after_s: float
    block_s: float = 0.0
    episode_started: bool = False


def client_key(address: str | None) -> str:
    """The table's key for a client address: IPv6 by its /64, anything else as it is."""
    if not address:
        return "unknown"
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address[:64]
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_PREFIX), strict=False))
    return str(ip)


class LoginThrottle:
    """The per-address failure table. Thread-safe: sign-in runs on the server's worker threads."""

    def __init__(self, policy: ThrottlePolicy, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.policy = policy
        self._clock = clock
        self._clients: OrderedDict[str, _Client] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._clients)

    def retry_after(self, key: str) -> float:
        """Seconds until ``key`` may try again; 0 when it may try now."""
        with self._lock:
            now = self._clock()
            client = self._clients.get(key)
            return 0.0 if client is None else max(0.0, client.blocked_until - now)

    def admit(self, key: str) -> Admission:
        """Decide on an attempt from ``key``, and count it as a wrong token at once.

        Counting before the token is compared (:meth:`succeeded` undoes it) makes the check and
        the count one step: a burst of concurrent attempts gets no more comparisons than the
        same attempts one by one.
        """
        with self._lock:
            now = self._clock()
            client = self._touch(key, now)
            if client.blocked_until > now:
                return Admission(retry_after_s=client.blocked_until - now)
            client.failures += 1
            # The free_failures-th wrong token starts the first block; each one after doubles it.
            doublings = client.failures - self.policy.free_failures
            if doublings < 0:
                return Admission(retry_after_s=0.0)
            # The exponent is capped only so that a long episode never overflows a float.
            block = min(self.policy.max_delay_s, self.policy.base_delay_s * 2 ** min(doublings, 62))
            client.blocked_until = now + block
            started = not client.throttled
            client.throttled = True
            return Admission(retry_after_s=0.0, block_s=block, episode_started=started)

    def succeeded(self, key: str) -> None:
        """A right token from ``key`` (admitted): its failures, block and episode end."""
        with self._lock:
            self._clients.pop(key, None)

    def _touch(self, key: str, now: float) -> _Client:
        self._forget_idle(now)
        client = self._clients.get(key)
        if client is None:
            while len(self._clients) >= self.policy.max_clients:
                self._clients.popitem(last=False)
            client = self._clients[key] = _Client()
        else:
            self._clients.move_to_end(key)
        client.last_seen = now
        return client

    def _forget_idle(self, now: float) -> None:
        # Oldest first (the dict is in order of last sight), so this stops at the first
        # address still remembered: amortised O(1) per call. Never before a block has ended.
        forget = max(self.policy.forget_after_s, self.policy.max_delay_s)
        while self._clients:
            key, client = next(iter(self._clients.items()))
            if now - client.last_seen < forget:
                break
            del self._clients[key]
