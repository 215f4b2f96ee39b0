"""Request counters and a latency histogram, shared by every worker of one scoring server.

Exposed at ``GET /metrics`` in the Prometheus text format (version 0.0.4):

- ``edgepack_requests_total{route, status}`` (counter): answered requests; ``route`` is
  ``score`` for ``/score`` and ``other`` for everything else; ``status`` is the HTTP code.
- ``edgepack_errors_total`` (counter): ``/score`` requests that failed inside the module
  (``run()`` raised, or returned something that is not JSON).
- ``edgepack_score_duration_seconds`` (histogram): time from request to response of
  ``/score``, measured inside the server.
- ``edgepack_run_duration_seconds`` (histogram, same buckets): the module's own ``run()``,
  without reading, parsing or queueing (the agent reports its p50/p95 as ``run_p50_ms`` /
  ``run_p95_ms``: the part of the latency the module's author can make faster).
- ``edgepack_workers`` (gauge): how many worker processes the numbers above add up;
  ``edgepack_ready_workers`` (gauge): how many of them have finished ``init()``.

Each worker owns one fixed-layout slot of 64-bit integers in a shared anonymous mapping and
is its slot's only writer, so no lock is taken on the hot path; ``/metrics`` (answered by
whichever worker the scraper reaches) sums all slots. ``prometheus_client``'s multiprocess
mode would do the same through files and locks at several times the cost per request.
"""

from __future__ import annotations

import mmap
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass

ROUTES = ("score", "other")
ROUTE_SCORE = 0
ROUTE_OTHER = 1
STATUSES = (200, 400, 404, 405, 413, 415, 500, 503)
BUCKETS_S = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_BUCKETS_NS = tuple(round(b * 1e9) for b in BUCKETS_S)
_STATUS_INDEX = {code: i for i, code in enumerate(STATUSES)}
_OTHER_STATUS = len(STATUSES)

# Slot layout, in 64-bit cells.
_N_STATUS = len(STATUSES) + 1
_REQUESTS = 0
_ERRORS = _REQUESTS + len(ROUTES) * _N_STATUS
_BUCKETS = _ERRORS + 1
_SUM_NS = _BUCKETS + len(_BUCKETS_NS) + 1  # the last bucket is +Inf
_COUNT = _SUM_NS + 1
_READY = _COUNT + 1  # 1 once this worker's init() succeeded (a gauge, not summed as a counter)
_RUN_BUCKETS = _READY + 1
_RUN_SUM_NS = _RUN_BUCKETS + len(_BUCKETS_NS) + 1
_RUN_COUNT = _RUN_SUM_NS + 1
SLOT_CELLS = _RUN_COUNT + 1


class WorkerMetrics:
    """One worker's slot: increments only, from the event loop thread."""

    __slots__ = ("_base", "_cells")

    def __init__(self, cells: memoryview, base: int) -> None:
        self._cells = cells
        self._base = base

    def request(self, route: int, status: int) -> None:
        i = self._base + _REQUESTS + route * _N_STATUS + _STATUS_INDEX.get(status, _OTHER_STATUS)
        self._cells[i] += 1

    def score(self, status: int, elapsed_ns: int) -> None:
        cells = self._cells
        base = self._base
        cells[base + _REQUESTS + _STATUS_INDEX.get(status, _OTHER_STATUS)] += 1
        cells[base + _BUCKETS + bisect_left(_BUCKETS_NS, elapsed_ns)] += 1
        cells[base + _SUM_NS] += elapsed_ns
        cells[base + _COUNT] += 1

    def error(self) -> None:
        self._cells[self._base + _ERRORS] += 1

    def run(self, elapsed_ns: int) -> None:
        cells = self._cells
        base = self._base
        cells[base + _RUN_BUCKETS + bisect_left(_BUCKETS_NS, elapsed_ns)] += 1
        cells[base + _RUN_SUM_NS] += elapsed_ns
        cells[base + _RUN_COUNT] += 1

    def mark_ready(self) -> None:
        self._cells[self._base + _READY] = 1


@dataclass(frozen=True)
class Totals:
    """The sum of every worker's slot."""

    requests: dict[tuple[str, str], int]  # (route, status) -> count; zero counts left out
    errors: int
    buckets: tuple[int, ...]  # not cumulative; the last one is +Inf
    sum_ns: int
    count: int
    workers: int
    ready_workers: int
    #: run() alone, like buckets / sum_ns / count (zeros from a server that does not say)
    run_buckets: tuple[int, ...] = (0,) * (len(BUCKETS_S) + 1)
    run_sum_ns: int = 0
    run_count: int = 0


class MetricsBoard:
    """Slots for ``workers`` processes in one shared anonymous mapping.

    Create it before the workers are forked; each worker then writes through
    :meth:`worker` with its own index.
    """

    def __init__(self, workers: int = 1) -> None:
        self.workers = workers
        # An anonymous mapping is MAP_SHARED on Linux: forked children write into it too.
        self._map = mmap.mmap(-1, workers * SLOT_CELLS * 8)
        self._cells = memoryview(self._map).cast("q")

    def worker(self, index: int) -> WorkerMetrics:
        if not 0 <= index < self.workers:
            raise ValueError(f"worker index {index} is outside 0..{self.workers - 1}")
        return WorkerMetrics(self._cells, index * SLOT_CELLS)

    def set_ready(self, index: int, ready: bool) -> None:
        self._cells[index * SLOT_CELLS + _READY] = int(ready)

    def is_ready(self, index: int) -> bool:
        return bool(self._cells[index * SLOT_CELLS + _READY])

    def totals(self) -> Totals:
        sums = [0] * SLOT_CELLS
        cells = self._cells
        for w in range(self.workers):
            base = w * SLOT_CELLS
            for i in range(SLOT_CELLS):
                sums[i] += cells[base + i]
        labels = [*(str(code) for code in STATUSES), "other"]
        requests = {
            (route, labels[s]): n
            for r, route in enumerate(ROUTES)
            for s in range(_N_STATUS)
            if (n := sums[_REQUESTS + r * _N_STATUS + s])
        }
        return Totals(
            requests=requests,
            errors=sums[_ERRORS],
            buckets=tuple(sums[_BUCKETS:_SUM_NS]),
            sum_ns=sums[_SUM_NS],
            count=sums[_COUNT],
            workers=self.workers,
            ready_workers=sums[_READY],
            run_buckets=tuple(sums[_RUN_BUCKETS:_RUN_SUM_NS]),
            run_sum_ns=sums[_RUN_SUM_NS],
            run_count=sums[_RUN_COUNT],
        )


def _histogram(name: str, help_: str, buckets: Sequence[int], sum_ns: int, count: int) -> list[str]:
    """One histogram in the exposition format: cumulative buckets over BUCKETS_S and +Inf."""
    lines = [f"# HELP {name} {help_}", f"# TYPE {name} histogram"]
    cumulative = 0
    for bound, n in zip((*(repr(b) for b in BUCKETS_S), "+Inf"), buckets, strict=True):
        cumulative += n
        lines.append(f'{name}_bucket{{le="{bound}"}} {cumulative}')
    return [*lines, f"{name}_sum {sum_ns / 1e9!r}", f"{name}_count {count}"]


def render(totals: Totals) -> bytes:
    """The Prometheus text exposition of ``totals``."""
    lines = [
        "# HELP edgepack_requests_total HTTP requests answered, by route and status code.",
        "# TYPE edgepack_requests_total counter",
    ]
    for (route, status), n in totals.requests.items():
        lines.append(f'edgepack_requests_total{{route="{route}",status="{status}"}} {n}')
    lines += [
        "# HELP edgepack_errors_total /score requests that failed inside the module.",
        "# TYPE edgepack_errors_total counter",
        f"edgepack_errors_total {totals.errors}",
    ]
    lines += _histogram(
        "edgepack_score_duration_seconds", "Time from request to response of /score.",
        totals.buckets, totals.sum_ns, totals.count,
    )  # fmt: skip
    lines += _histogram(
        "edgepack_run_duration_seconds", "Time in the module's run() alone, of /score.",
        totals.run_buckets, totals.run_sum_ns, totals.run_count,
    )  # fmt: skip
    lines += [
        "# HELP edgepack_workers Worker processes whose numbers are summed here.",
        "# TYPE edgepack_workers gauge",
        f"edgepack_workers {totals.workers}",
        "# HELP edgepack_ready_workers Worker processes whose init() has succeeded.",
        "# TYPE edgepack_ready_workers gauge",
        f"edgepack_ready_workers {totals.ready_workers}",
    ]
    return ("\n".join(lines) + "\n").encode()


def parse(text: str) -> Totals:
    """Read back what :func:`render` wrote (e.g. the agent scraping ``/metrics``)."""
    requests: dict[tuple[str, str], int] = {}
    cumulative: list[int] = []
    run_cumulative: list[int] = []
    values: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, number = line.rpartition(" ")
        if name.startswith("edgepack_requests_total{"):
            labels = dict(part.split("=", 1) for part in name[name.index("{") + 1 : -1].split(","))
            key = (labels["route"].strip('"'), labels["status"].strip('"'))
            requests[key] = int(float(number))
        elif name.startswith("edgepack_score_duration_seconds_bucket{"):
            cumulative.append(int(float(number)))
        elif name.startswith("edgepack_run_duration_seconds_bucket{"):
            run_cumulative.append(int(float(number)))
        else:
            values[name] = float(number)
    buckets = tuple(b - a for a, b in zip([0, *cumulative[:-1]], cumulative, strict=True))
    # A scoring server older than the agent (a module's image) has no run histogram: zeros.
    run_buckets = tuple(b - a for a, b in zip([0, *run_cumulative], run_cumulative, strict=False))
    return Totals(
        requests=requests,
        errors=int(values.get("edgepack_errors_total", 0)),
        buckets=buckets or (0,) * (len(BUCKETS_S) + 1),
        sum_ns=round(values.get("edgepack_score_duration_seconds_sum", 0.0) * 1e9),
        count=int(values.get("edgepack_score_duration_seconds_count", 0)),
        workers=int(values.get("edgepack_workers", 0)),
        ready_workers=int(values.get("edgepack_ready_workers", 0)),
        run_buckets=run_buckets or (0,) * (len(BUCKETS_S) + 1),
        run_sum_ns=round(values.get("edgepack_run_duration_seconds_sum", 0.0) * 1e9),
        run_count=int(values.get("edgepack_run_duration_seconds_count", 0)),
    )


def latency_quantile(buckets: tuple[int, ...], q: float) -> float | None:
    """The ``q`` quantile (0..1) of /score latency in seconds, interpolated within its bucket
    as Prometheus' ``histogram_quantile`` does; None when nothing was observed.

    ``buckets`` are per-bucket counts (not cumulative), as in :class:`Totals`; differences of
    two snapshots give the quantile over the interval between them.
    """
    total = sum(buckets)
    if total <= 0:
        return None
    rank = q * total
    seen = 0
    for i, n in enumerate(buckets):
        if n and seen + n >= rank:
            if i >= len(BUCKETS_S):
                return BUCKETS_S[-1]  # beyond the last finite bound: all that is known
            lower = BUCKETS_S[i - 1] if i else 0.0
            return lower + (BUCKETS_S[i] - lower) * (rank - seen) / n
        seen += n
    return BUCKETS_S[-1]
