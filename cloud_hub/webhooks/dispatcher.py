"""One dispatcher per hub process: claims due deliveries and sends them, signed.

It runs its own thread with an asyncio loop and an ``httpx.AsyncClient`` per subscription.
What a receiver can cost the hub is bounded: requests in flight (all, and per subscription, so a receiver
that hangs holds at most its own share), the whole request's time, no redirect followed (a
3xx is a failed attempt), at most a few KiB of an answer read. The database work (claim,
record) runs in worker threads, batched: one transaction per round, not per delivery.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import logging
import math
import sys
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx
from sqlalchemy.exc import OperationalError
from standardwebhooks import Webhook

from cloud_hub.db.base import Sessions, utcnow
from cloud_hub.settings import HubSettings
from cloud_hub.webhooks.queue import Job, Outcome, RetryPolicy, claim, forget_delivered, record, release

log = logging.getLogger(__name__)

#: Of a receiver's answer at most this much is read (then the connection is dropped).
MAX_ANSWER_BYTES = 4096
#: How often delivered rows older than webhook_keep_delivered_s are deleted.
CLEANUP_EVERY_S = 60.0
#: Deliveries claimed ahead per request slot: a claim round (a database transaction) then
#: serves several rounds of requests.
QUEUE_DEPTH = 8
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
        # Past the longest a claimed delivery can wait for its turn (QUEUE_DEPTH rounds of its
        # subscription's requests) and take, so it is not claimed again while it may still be
        # in flight; a process that dies leaves it for this long.
        return self.timeout_s * (QUEUE_DEPTH + 1) + 30

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


async def send(client: httpx.AsyncClient, job: Job, *, timeout_s: float) -> str | None:
    """One attempt; None when the receiver answered 2xx, else why not (never the secret)."""
    try:
        async with asyncio.timeout(timeout_s):
            headers = signed_headers(job, datetime.now(UTC))
            async with client.stream("POST", job.url, content=job.body.encode(), headers=headers) as resp:
                read = 0
                async for chunk in resp.aiter_raw():
                    read += len(chunk)
                    if read >= MAX_ANSWER_BYTES:
                        break
                status = resp.status_code
                location = resp.headers.get("location", "")
    except TimeoutError:
        return f"no answer within {timeout_s:g} s"
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"
    if 200 <= status < 300:
        return None
    if 300 <= status < 400:
        return f"HTTP {status}: redirect to {location[:200]!r} not followed"
    return f"HTTP {status}"


def skip_sniffio_lookups() -> None:
    """httpcore asks ``import sniffio`` on every request; without the package installed each
    failed import searches sys.path again (a fifth of the dispatcher's time at 1,000
    requests/s). Recording the absence once makes the failure immediate."""
    if "sniffio" not in sys.modules and importlib.util.find_spec("sniffio") is None:
        sys.modules["sniffio"] = None  # type: ignore[assignment]


class _Clients:
    """One HTTP client (connection pool) per subscription, of per_subscription connections:
    httpcore's pool does work per connection for every request, so small pools are cheaper
    than one large one, and one receiver's connections never crowd another's."""

    def __init__(self, policy: DispatchPolicy) -> None:
        self._policy = policy
        self._clients: dict[str, httpx.AsyncClient] = {}

    def of(self, subscription_id: str) -> httpx.AsyncClient:
        client = self._clients.get(subscription_id)
        if client is None:
            n = self._policy.per_subscription
            client = httpx.AsyncClient(
                follow_redirects=False,
                limits=httpx.Limits(max_connections=n, max_keepalive_connections=n),
                timeout=self._policy.timeout_s,
            )
            self._clients[subscription_id] = client
        return client

    async def __aenter__(self) -> _Clients:
        return self

    async def __aexit__(self, *_exc: object) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()


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
        self._slots: asyncio.Semaphore | None = None
        self._sending: set[int] = set()
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
        skip_sniffio_lookups()
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
            # Stopping: let what is in flight finish (briefly), and record how it went; what
            # does not finish keeps its lease and goes out again after a restart.
            tasks = [t for _, t in self._in_flight.values()]
            if tasks:
                await asyncio.wait(tasks, timeout=min(p.timeout_s, 5))
                for t in tasks:
                    t.cancel()
            # Claimed but never sent: free them for the next process at once instead of at
            # the end of their lease. (One that was being sent keeps its lease: the receiver
            # may have it, and a restart must not send it twice.)
            unsent = [job_id for job_id in self._in_flight if job_id not in self._sending]
            if unsent:
                with contextlib.suppress(OperationalError):
                    await asyncio.to_thread(self._release, unsent)
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
        done, self._done = self._done, []
        free = p.concurrency * QUEUE_DEPTH - len(self._in_flight)
        busy = Counter(sub for sub, _ in self._in_flight.values())
        try:
            jobs = await asyncio.to_thread(self._record_and_claim, done, free, dict(busy))
        except BaseException:
            self._done[:0] = done
            raise
        for job in jobs:
            task = asyncio.create_task(self._deliver(client, job), name=f"webhook-{job.id}")
            self._in_flight[job.id] = (job.subscription_id, task)
        return len(jobs)

    def _record_and_claim(self, done: list[Outcome], free: int, busy: dict[str, int]) -> list[Job]:
        p = self._policy
        with self._sessions.begin() as s:
            now = utcnow()
            if done:
                record(s, done, now=now, policy=p.retry)
            if free <= 0:
                return []
            return claim(s, now=now, limit=free, in_flight=busy,
                         per_subscription=p.per_subscription * QUEUE_DEPTH, lease_s=p.lease_s)

    async def _deliver(self, client: _Clients, job: Job) -> None:
        p = self._policy
        sub_slots = self._sub_slots.setdefault(job.subscription_id, asyncio.Semaphore(p.per_subscription))
        assert self._slots is not None
        try:
            # The subscription's own slot first: a receiver that hangs holds at most
            # per_subscription of the process's slots, never the others'.
            async with sub_slots, self._slots:
                self._sending.add(job.id)
                error = await send(client.of(job.subscription_id), job, timeout_s=p.timeout_s)
        except Exception as exc:  # a bug must not kill the dispatcher; the delivery is retried
            log.exception("webhook delivery %d failed unexpectedly", job.id)
            error = f"hub error: {type(exc).__name__}"
        self._done.append(Outcome(job, error))
        self._on_attempt(error is None)
        self._in_flight.pop(job.id, None)
        self._sending.discard(job.id)
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
            record(s, done, now=utcnow(), policy=self._policy.retry)

    def _release(self, ids: list[int]) -> None:
        with self._sessions.begin() as s:
            release(s, ids, now=utcnow())

    def _cleanup(self) -> None:
        with self._sessions.begin() as s:
            forget_delivered(s, before=utcnow() - timedelta(seconds=self._policy.keep_delivered_s))
