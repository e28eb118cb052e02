"""Prometheus metrics (prefix `vpt_`). One registry per app so in-process tests do not collide.

Never a label per task id (unbounded cardinality); per-task counters are served as JSON by
`GET /v1/tasks/{task_id}` (see `TaskStats`). Per-tenant labels are bounded (tenants are configured)
but name the tenants: `VPT_METRICS_TENANT_LABELS=false` leaves them out.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from server.engine.bank import BankStats
from server.scheduler.scheduler import SchedulerHooks

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


@dataclass(frozen=True)
class LiveStats:
    """The core's gauges at one moment (for /metrics)."""

    bank: BankStats
    queued_images: int
    in_flight: int


class _LiveCollector(Collector):
    """The core's gauges and the bank's counters, read at scrape time, so they can never drift from the
    bank and the queues themselves. With several API servers, the scrape asks the core for them."""

    def __init__(self, live: Callable[[], LiveStats | None]) -> None:
        self._live = live

    def describe(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        """The families `collect` yields (the registry learns their names without calling `live`)."""
        return self._families(LiveStats(BankStats(0, 0, 0, 0, 0, 0, 0, 0), 0, 0))

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        live = self._live()
        if live is not None:
            yield from self._families(live)

    @staticmethod
    def _families(live: LiveStats) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        s = live.bank
        for name, value, doc in (
            ("hits", s.hits, "Lookups that found the task's current version resident"),
            ("misses", s.misses, "Lookups that did not"),
            ("evictions", s.evictions, "Tasks evicted to make room (LRU)"),
            ("loads", s.loads, "Task versions copied into the bank"),
        ):
            yield CounterMetricFamily(f"vpt_bank_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "vpt_bank_resident_tasks", "Task versions resident in the bank", value=s.resident
        )
        yield GaugeMetricFamily("vpt_bank_capacity_slots", "Slots in the bank", value=s.capacity)
        g = GaugeMetricFamily("vpt_bank_bytes", "Bank bytes on the device", labels=["kind"])
        g.add_metric(["allocated"], s.allocated_bytes)
        g.add_metric(["used"], s.used_bytes)
        yield g
        yield GaugeMetricFamily(
            "vpt_queue_depth_images", "Images waiting in the queues", value=live.queued_images
        )
        yield GaugeMetricFamily(
            "vpt_batches_in_flight", "Batches launched and not yet finished", value=live.in_flight
        )


class _EveryProcess(Collector):
    """Every process's metrics from prometheus_client's multiprocess files, summed; and a family with
    no samples yet (`vpt_rejections_total` before any rejection, in any process) declared as one
    process alone would declare it, so a dashboard's or alert's series exist from the start."""

    def __init__(self, path: str, declared: list[Collector]) -> None:
        self._files = MultiProcessCollector(None, path=path)
        self._declared = declared

    def collect(self) -> Iterator[Metric]:
        seen = set()
        for family in self._files.collect():
            seen.add(family.name)
            yield family
        for collector in self._declared:
            for family in collector.collect():
                if family.name not in seen:
                    yield Metric(family.name, family.documentation, family.type, family.unit)


class Metrics(SchedulerHooks):
    def __init__(self, *, tenant_labels: bool = True) -> None:
        # prometheus_client reads it at import: set, every metric's value lives in a file there.
        self.multiprocess_dir = os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None
        self.registry = CollectorRegistry()
        r = self.registry
        self.request_latency = Histogram(
            "vpt_request_duration_seconds",
            "HTTP request latency",
            ["route", "status"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_wait_s = Histogram(
            "vpt_queue_wait_seconds", "Time from enqueue to dispatch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_size = Histogram(
            "vpt_batch_size", "Images per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tasks = Histogram(
            "vpt_batch_tasks", "Distinct tasks per forward pass", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_compute_s = Histogram(
            "vpt_batch_compute_seconds", "Engine time per batch", buckets=LATENCY_BUCKETS, registry=r
        )
        self.task_load_s = Histogram(
            "vpt_task_load_seconds", "Cold task load: store → device", buckets=LATENCY_BUCKETS, registry=r
        )
        self.images = Counter("vpt_images_total", "Images processed by the engine", ["route"], registry=r)
        self.images_decoded = Counter("vpt_images_decoded_total", "Images decoded", registry=r)
        self.rejections = Counter("vpt_rejections_total", "Requests rejected", ["reason"], registry=r)
        # Tenant names and their traffic: left out with VPT_METRICS_TENANT_LABELS=false.
        self.tenant_requests = (
            Counter(
                "vpt_tenant_requests_total", "Requests per tenant", ["tenant", "route", "status"], registry=r
            )
            if tenant_labels
            else None
        )
        # Summed over the live API servers when there are several (prometheus_client's multiprocess mode).
        self.in_progress = Gauge(
            "vpt_requests_in_progress", "HTTP requests being handled", registry=r, multiprocess_mode="livesum"
        )
        self._declared = list(r._collector_to_names)  # this class's metrics (not the live gauges)
        self._live: Callable[[], LiveStats | None] = lambda: None
        r.register(_LiveCollector(lambda: self._live()))

    def bind(self, live: Callable[[], LiveStats]) -> None:
        """Where the core's gauges come from (the core in this process)."""
        self._live = live

    def exposition(self, live: Callable[[], LiveStats | None] | None = None) -> CollectorRegistry:
        """The registry a scrape reads. One process: this one's. With several processes (the engine core
        and its API servers, `PROMETHEUS_MULTIPROC_DIR` set), every process's counts, summed by
        prometheus_client's multiprocess collector, and the core's gauges from `live`."""
        if self.multiprocess_dir is None:
            return self.registry
        registry = CollectorRegistry()
        registry.register(_EveryProcess(self.multiprocess_dir, self._declared))
        registry.register(_LiveCollector(live or (lambda: self._live())))
        return registry

    def tenant_request(self, tenant: str, route: str, status: int) -> None:
        if self.tenant_requests is not None:
            self.tenant_requests.labels(tenant, route, str(status)).inc()

    # SchedulerHooks
    def queue_wait(self, seconds: float) -> None:
        self.queue_wait_s.observe(seconds)

    def batch(self, size: int, compute_s: float, tasks: int) -> None:
        self.batch_size.observe(size)
        self.batch_compute_s.observe(compute_s)
        self.batch_tasks.observe(tasks)

    def task_load(self, seconds: float) -> None:
        self.task_load_s.observe(seconds)

    def rejected(self, reason: str) -> None:
        self.rejections.labels(reason).inc()


@dataclass
class TaskCounters:
    requests: int = 0
    images: int = 0
    errors: int = 0
    last_used: float | None = None


class TaskStats:
    """Per-task counters, in memory on this replica (served as JSON, not as Prometheus labels).

    Only tasks that exist have counters. A task id is the caller's choice: counting requests for ids
    that do not exist would let any caller grow this without bound, and a task created later under
    such an id would start with their errors. `exists(tenant, task_id)` says whether the store has
    shown the task to exist (`Residency.knows`).
    """

    def __init__(self, exists: Callable[[str, str], bool]) -> None:
        self._exists = exists
        self._lock = threading.Lock()
        self._c: dict[tuple[str, str], TaskCounters] = {}

    def record(self, tenant: str, task_id: str, images: int, ok: bool) -> None:
        """Count a finished request, if its task is known to exist. A task found gone (deleted through
        another replica) loses its counters, so one created again under its id starts clean."""
        key, exists = (tenant, task_id), self._exists(tenant, task_id)
        with self._lock:
            if not exists:
                self._c.pop(key, None)
                return
            c = self._c.setdefault(key, TaskCounters())
            c.requests += 1
            c.images += images if ok else 0
            c.errors += 0 if ok else 1
            c.last_used = time.time()

    def get(self, tenant: str, task_id: str) -> TaskCounters:
        with self._lock:
            return TaskCounters(**vars(self._c.get((tenant, task_id), TaskCounters())))

    def forget(self, tenant: str, task_id: str) -> None:
        with self._lock:
            self._c.pop((tenant, task_id), None)

    def __len__(self) -> int:
        """Tasks with counters."""
        return len(self._c)
