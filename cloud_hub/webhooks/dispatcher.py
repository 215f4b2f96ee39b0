"""One dispatcher per hub process: claims due deliveries and sends them, signed.

It runs its own thread with an asyncio loop and an ``aiohttp.ClientSession`` per subscription
(httpx spent 1.5 ms of CPU per request in its connection pool, aiohttp 0.2 ms: the difference
between 600 and several thousand deliveries per second on one core).
What a receiver can cost the hub is bounded: requests in flight (all, and per subscription, so a receiver
that hangs holds at most its own share), the whole request's time, no redirect followed (a
3xx is a failed attempt), at most a few KiB of an answer read. The database work (claim,
record) runs in worker threads, batched: one transaction per round, not per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import urllib.parse
import urllib.request
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy.exc import OperationalError
from standardwebhooks import Webhook

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.settings import HubSettings
from cloud_hub.webhooks import queue
from cloud_hub.webhooks.queue import Job, Outcome, RetryPolicy

if TYPE_CHECKING:
    # Imported with the first subscription's session (_Clients.of), not with the hub: 9 MB
    # that a hub sending no webhooks does without.
    import aiohttp

log = logging.getLogger(__name__)

#: Of a receiver's answer at most this much is read (then the connection is dropped).
MAX_ANSWER_BYTES = 4096
#: How often delivered rows older than webhook_keep_delivered_s are deleted.
CLEANUP_EVERY_S = 60.0
#: Deliveries claimed ahead per request slot: a claim round (a database transaction) then
#: serves several rounds of requests.
QUEUE_DEPTH = 16
#: A lease outlasts a request and the wait for the next round by this much (time for that
#: round's transaction), so a delivery held by a live dispatcher is never taken by another.
LEASE_SLACK_S = 10.0
#: After a wake-up with requests in flight, the dispatcher waits this long for more to finish.
BATCH_S = 0.02


@dataclass(frozen=True)
class DispatchPolicy:
    concurrency: int
    per_subscription: int
    timeout_s: float
    poll_s: float
    keep_delivered_s: float
    retry: RetryPolicy

    @property
    def lease_s(self) -> float:
        # A request, the wait for the next round and that round's transaction: each round
        # renews what the dispatcher still holds (waiting for a slot or in flight), so a lease
        # need not cover the wait in the queue. A process that dies leaves its deliveries
        # for this long (20.5 s by default), then another (or the next) one sends them.
        return self.timeout_s + self.poll_s + LEASE_SLACK_S

    @property
    def renew_within_s(self) -> float:
        """A held lease that ends sooner than this is renewed in the coming round."""
        return self.poll_s + LEASE_SLACK_S

    @classmethod
    def from_settings(cls, s: HubSettings) -> DispatchPolicy:
        return cls(
            concurrency=s.webhook_concurrency,
            per_subscription=min(s.webhook_concurrency_per_subscription, s.webhook_concurrency),
            timeout_s=s.webhook_timeout_s,
            poll_s=s.webhook_poll_s,
            keep_delivered_s=s.webhook_keep_delivered_s,
            retry=RetryPolicy(s.webhook_retry_base_s, s.webhook_retry_max_s, s.webhook_max_age_s),
        )


def signed_headers(job: Job, now: datetime) -> dict[str, str]:
    """The Standard Webhooks headers (id, timestamp, signature) and the CloudEvents type."""
    return {
        "content-type": "application/cloudevents+json; charset=utf-8",
        "webhook-id": job.message_id,
        "webhook-timestamp": str(math.floor(now.timestamp())),
        "webhook-signature": Webhook(job.secret).sign(job.message_id, now, job.body),
        "user-agent": "edgepack-hub-webhooks/1",
    }


@dataclass(frozen=True)
class Route:
    """How a subscription's requests go out: its connection pool, and the proxy if any."""

    session: aiohttp.ClientSession
    proxy: str | None


def env_proxy(url: str) -> str | None:
    """The proxy the environment names for ``url`` (HTTP_PROXY, HTTPS_PROXY, NO_PROXY), as the
    hub's other HTTP clients use it; looked up once per subscription, not per request."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname and urllib.request.proxy_bypass(parts.hostname):
        return None
    return urllib.request.getproxies().get(parts.scheme)


async def send(route: Route, job: Job, *, timeout_s: float) -> str | None:
    """One attempt; None when the receiver answered 2xx, else why not (never the secret)."""
    import aiohttp  # already imported by the route's session: a lookup in sys.modules

    try:
        async with asyncio.timeout(timeout_s):
            headers = signed_headers(job, datetime.now(UTC))
            async with route.session.post(
                job.url, data=job.body.encode(), headers=headers, allow_redirects=False, proxy=route.proxy
            ) as resp:
                # Read what the answer has, up to the bound: an answer read to its end leaves
                # the connection for the next request; a longer one is dropped with it.
                read = 0
                while read < MAX_ANSWER_BYTES:
                    chunk = await resp.content.read(MAX_ANSWER_BYTES - read)
                    if not chunk:
                        break
                    read += len(chunk)
                status = resp.status
                location = resp.headers.get("location", "")
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except aiohttp.ClientError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirect to {location[:200]!r} not followed"
    return f"HTTP {status}"


class _Clients:
    """One HTTP session (connection pool) per subscription, of per_subscription connections
    kept alive: one receiver's connections never crowd another's."""

    def __init__(self, policy: DispatchPolicy) -> None:
        self._policy = policy
        self._routes: dict[str, Route] = {}

    def of(self, subscription_id: str, url: str) -> Route:
        route = self._routes.get(subscription_id)
        if route is None:
            import aiohttp

            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=self._policy.per_subscription),
                timeout=aiohttp.ClientTimeout(total=self._policy.timeout_s),
                # The proxy comes from env_proxy, once; trusting the environment here would
                # also hand a receiver the credentials ~/.netrc holds for its host (and cost
                # two executor calls per request).
                trust_env=False,
                # The hub's cookies are nobody's business; a receiver's are not kept.
                cookie_jar=aiohttp.DummyCookieJar(),
                # At most MAX_ANSWER_BYTES of the answer are read, as sent: no inflating.
                auto_decompress=False,
            )
            # A subscription's URL never changes (another URL is another subscription).
            route = self._routes[subscription_id] = Route(session, env_proxy(url))
        return route

    async def __aenter__(self) -> _Clients:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for route in self._routes.values():
            with contextlib.suppress(Exception):
                await route.session.close()


class WebhookDispatcher:
    def __init__(
        self,
        sessions: Sessions,
        policy: DispatchPolicy,
        on_attempt: Callable[[bool], None] = lambda delivered: None,
    ) -> None:
        self._sessions = sessions
        self._policy = policy
        self._on_attempt = on_attempt  # counts each attempt (delivered or not) for /metrics
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._wake: asyncio.Event | None = None
        self._done: list[Outcome] = []
        #: claimed and not yet recorded: waiting for a slot, or in flight
        self._in_flight: dict[int, tuple[str, asyncio.Task[None]]] = {}
        #: when the lease of each held delivery ends (loop time, a little before the database's)
        self._lease_ends: dict[int, float] = {}
        self._slots: asyncio.Semaphore | None = None
        self._sub_slots: dict[str, asyncio.Semaphore] = {}
        self._ready = threading.Event()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="webhook-dispatcher", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(stop.set)
        if self._thread is not None:
            self._thread.join(timeout=self._policy.timeout_s + 10)
            self._thread = None

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception:
            log.exception("webhook dispatcher stopped by an error")

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()
        self._slots = asyncio.Semaphore(self._policy.concurrency)
        self._ready.set()
        p = self._policy
        last_cleanup = 0.0
        async with _Clients(p) as client:
            while not self._stop.is_set():
                self._wake.clear()
                claimed = 0
                try:
                    claimed = await self._round(client)
                    if self._loop.time() - last_cleanup > CLEANUP_EVERY_S:
                        last_cleanup = self._loop.time()
                        await asyncio.to_thread(self._cleanup)
                except OperationalError as exc:
                    # A busy database (SQLite's writer lock, a lost PostgreSQL connection):
                    # nothing was claimed or recorded; the next round tries again.
                    log.warning("webhook dispatcher: database busy (%s); retrying", exc.orig)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(p.poll_s):
                        await self._wake_or_stop()
                if claimed or self._in_flight:
                    # Let more requests finish: their outcomes and the next claim share one
                    # transaction (a commit per delivery capped a fast receiver at ~40/s).
                    await asyncio.sleep(BATCH_S)
            # Stopping: let what is in flight finish (briefly), and record how it went.
            tasks = [t for _, t in self._in_flight.values()]
            if tasks:
                await asyncio.wait(tasks, timeout=min(p.timeout_s, 5))
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
            # Held without an outcome (never sent, or cut off mid-request): free them for the
            # next process at once. A request cut off may have reached the receiver, but
            # keeping its lease would not save a second copy, only delay it: without an
            # outcome the delivery goes out again either way (at least once).
            unsettled = list(self._in_flight)
            if unsettled:
                with contextlib.suppress(OperationalError):
                    await asyncio.to_thread(self._release, unsettled)
            with contextlib.suppress(OperationalError):
                await self._record_done()

    async def _wake_or_stop(self) -> None:
        assert self._wake is not None and self._stop is not None
        waits = [asyncio.create_task(self._wake.wait()), asyncio.create_task(self._stop.wait())]
        try:
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def _round(self, client: _Clients) -> int:
        """Record the finished attempts and claim as many due deliveries as there are free
        slots, in one transaction; start sending what was claimed."""
        p = self._policy
        assert self._loop is not None
        done, self._done = self._done, []
        free = p.concurrency * QUEUE_DEPTH - len(self._in_flight)
        busy = Counter(sub for sub, _ in self._in_flight.values())
        started = self._loop.time()
        due = [i for i, end in self._lease_ends.items() if end - started < p.renew_within_s]
        try:
            jobs = await asyncio.to_thread(self._record_and_claim, done, free, dict(busy), due)
        except BaseException:
            self._done[:0] = done
            raise
        for job_id in due:
            if job_id in self._lease_ends:
                self._lease_ends[job_id] = started + p.lease_s
        for job in jobs:
            task = asyncio.create_task(self._deliver(client, job), name=f"webhook-{job.id}")
            self._in_flight[job.id] = (job.subscription_id, task)
            self._lease_ends[job.id] = started + p.lease_s
        return len(jobs)

    def _record_and_claim(
        self, done: list[Outcome], free: int, busy: dict[str, int], renewing: list[int]
    ) -> list[Job]:
        p = self._policy
        with self._sessions.begin() as s:
            now = utcnow()
            if done:
                queue.record(s, done, now=now, policy=p.retry)
            if renewing:
                queue.renew(s, renewing, until=now + timedelta(seconds=p.lease_s))
            if free <= 0:
                return []
            return queue.claim(s, now=now, limit=free, in_flight=busy,
                         per_subscription=p.per_subscription * QUEUE_DEPTH, lease_s=p.lease_s)

    async def _deliver(self, client: _Clients, job: Job) -> None:
        p = self._policy
        sub_slots = self._sub_slots.setdefault(job.subscription_id, asyncio.Semaphore(p.per_subscription))
        assert self._slots is not None
        try:
            # The subscription's own slot first: a receiver that hangs holds at most
            # per_subscription of the process's slots, never the others'.
            async with sub_slots, self._slots:
                error = await send(client.of(job.subscription_id, job.url), job, timeout_s=p.timeout_s)
        except Exception as exc:  # a bug must not kill the dispatcher; the delivery is retried
            log.exception("webhook delivery %d failed unexpectedly", job.id)
            error = f"hub error: {type(exc).__name__}"
        self._done.append(Outcome(job, error))
        self._on_attempt(error is None)
        self._in_flight.pop(job.id, None)
        self._lease_ends.pop(job.id, None)
        if self._wake is not None:
            self._wake.set()

    async def _record_done(self) -> None:
        if not self._done:
            return
        done, self._done = self._done, []
        try:
            await asyncio.to_thread(self._record, done)
        except BaseException:
            self._done[:0] = done
            raise

    def _record(self, done: list[Outcome]) -> None:
        with self._sessions.begin() as s:
            queue.record(s, done, now=utcnow(), policy=self._policy.retry)

    def _release(self, ids: list[int]) -> None:
        with self._sessions.begin() as s:
            queue.release(s, ids, now=utcnow())

    def _cleanup(self) -> None:
        with self._sessions.begin() as s:
            queue.forget_delivered(s, before=utcnow() - timedelta(seconds=self._policy.keep_delivered_s))
