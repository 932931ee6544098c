"""Prometheus metrics: counters fed by ingest and attempts, gauges read from the workers.

What the gauges read is handed in: the service's workers and store (`Gauged`), and the
API's connection guard once the process wiring listens (`watch_connections`). So this
module imports neither the service nor the API.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from webhookd.listener import Guard
    from webhookd.records import HistorySize, PruneResult, Webhook
    from webhookd.scheduler import Clock, TenantWorker
    from webhookd.sender import Outcome
    from webhookd.store import Store
    from webhookd.store.protocol import Cluster


class Gauged(Protocol):
    """What the queue gauges read at scrape time (the service)."""

    @property
    def clock(self) -> Clock: ...

    @property
    def store(self) -> Store: ...

    @property
    def cluster(self) -> Cluster | None: ...

    @property
    def history_seen(self) -> HistorySize: ...

    @property
    def problem(self) -> str | None:
        """What the last health check found wrong (None: healthy)."""
        ...

    def visible_workers(self) -> list[TenantWorker]: ...


class _QueueCollector(Collector):
    """Per-tenant gauges read at scrape time from the workers' in-memory state (no SQL).

    With several instances on one database, each reports only the tenants whose lease it
    holds now (`holds`: at most one instance at a time), so that a dashboard summing over
    instances counts every tenant once; and how many leases it holds, the live instances
    and its lease changes."""

    def __init__(self, service: Gauged) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        depth = GaugeMetricFamily(
            "webhookd_queue_depth", "Webhooks waiting per tenant.", labels=["tenant"]
        )
        oldest = GaugeMetricFamily(
            "webhookd_oldest_waiting_seconds",
            "Age of the oldest waiting webhook per tenant.",
            labels=["tenant"],
        )
        attempts = GaugeMetricFamily(
            "webhookd_backoff_attempts",
            "Consecutive failed attempts of the tenant's head (0 when not in backoff).",
            labels=["tenant"],
        )
        parked = GaugeMetricFamily(
            "webhookd_parked", "Webhooks parked by an operator per tenant.", labels=["tenant"]
        )
        stalled = GaugeMetricFamily("webhookd_tenants_stalled", "Tenants in backoff.")
        disk_full = GaugeMetricFamily(
            "webhookd_disk_full", "1 while ingest is refused because the disk is full."
        )
        disk_full.add_metric([], 1 if self.service.store.disk_full else 0)
        healthy = GaugeMetricFamily(
            "webhookd_healthy",
            "1 while the health check /healthz runs passes (the database answers; on "
            "PostgreSQL, the leases are renewed), 0 while it fails; checked at each scrape.",
        )
        healthy.add_metric([], 0 if self.service.problem else 1)
        now = self.service.clock.now()
        count_stalled = 0
        cluster = self.service.cluster
        workers = self.service.visible_workers()
        if cluster is not None:
            workers = [w for w in workers if cluster.holds(w.name)]
            yield from _cluster_families(cluster, len(workers))
        for worker in workers:
            depth.add_metric([worker.name], worker.waiting)
            since = worker.oldest_waiting_at
            oldest.add_metric([worker.name], max(0.0, now - since) if since else 0.0)
            attempts.add_metric([worker.name], worker.row.attempts)
            parked.add_metric([worker.name], worker.parked)
            count_stalled += worker.queue_state == "stalled"
        stalled.add_metric([], count_stalled)
        yield from (depth, oldest, attempts, parked, stalled, disk_full, healthy)


def _cluster_families(
    cluster: Cluster, held: int
) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    leases = GaugeMetricFamily(
        "webhookd_leases", "Tenant leases this instance holds now (the tenants it delivers)."
    )
    leases.add_metric([], held)
    live = GaugeMetricFamily(
        "webhookd_cluster_instances", "Live instances sharing the database (this one included)."
    )
    live.add_metric([], cluster.live_instances)
    tenants = GaugeMetricFamily(
        "webhookd_cluster_tenants",
        "Tenants the instances share (one lease each), as this instance's last tick counted.",
    )
    tenants.add_metric([], cluster.tenants)
    changes = CounterMetricFamily(
        "webhookd_lease_changes",
        "Tenant leases gained (claimed), lost (claimed by another instance, or not renewed "
        "in time) and released (handed over, or back at stop) by this instance.",
        labels=["change"],
    )
    for change in ("gained", "lost", "released"):
        changes.add_metric([change], cluster.lease_changes[change])
    mismatch = GaugeMetricFamily(
        "webhookd_config_mismatch",
        "Live instances whose main-file tenants differ from this instance's (their "
        "published digests, last tick): 0 when every instance has the same tenants.",
    )
    mismatch.add_metric([], len(cluster.mismatch))
    yield from (leases, live, tenants, changes, mismatch)


class _ConnectionsCollector(Collector):
    """The API's client connections, read at scrape time from its guard."""

    def __init__(self, guard: Guard) -> None:
        self.guard = guard

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        guard = self.guard
        open_ = GaugeMetricFamily("webhookd_api_connections", "API client connections open.")
        open_.add_metric([], len(guard.live))
        limit = GaugeMetricFamily(
            "webhookd_api_connections_limit", "API client connections allowed at once."
        )
        limit.add_metric([], guard.limits.max_connections)
        closed = CounterMetricFamily(
            "webhookd_api_connections_closed",
            "API connections the daemon closed or refused: header_timeout (request head "
            "too slow), evicted (idle, closed to make room at the limit), refused (at the "
            "limit with every connection busy).",
            labels=["reason"],
        )
        for reason in ("header_timeout", "evicted", "refused"):
            closed.add_metric([reason], guard.closed[reason])
        yield from (open_, limit, closed)


# Delivery-duration histogram bounds, seconds.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class _CountsCollector(Collector):
    """The counters and the histogram, turned into Prometheus families at scrape time.

    They are plain dicts and ints on the hot path (one dict update per attempt or ingest
    request): prometheus_client's own Counter takes a lock and its Histogram walks the
    buckets in Python on every observation, which cost 3 % of the loop under load.
    """

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        m = self.metrics
        deliveries = CounterMetricFamily(
            "webhookd_deliveries",
            "Delivery attempts by tenant and outcome.",
            labels=["tenant", "outcome"],
        )
        for (tenant, outcome), count in sorted(m.deliveries.items()):
            deliveries.add_metric([tenant, outcome], count)
        delivered = CounterMetricFamily(
            "webhookd_webhooks_delivered",
            "Webhooks delivered (answered with a success status).",
            labels=["tenant"],
        )
        for tenant, count in sorted(m.delivered.items()):
            delivered.add_metric([tenant], count)
        ingested = CounterMetricFamily(
            "webhookd_ingested",
            "Ingested webhooks by tenant and status (queued, duplicate, not_subscribed, disabled).",
            labels=["tenant", "status"],
        )
        for (tenant, status), count in sorted(m.ingest.items()):
            ingested.add_metric([tenant, status], count)
        answers = CounterMetricFamily(
            "webhookd_ingest_responses",
            "Ingest requests answered, by HTTP status code.",
            labels=["code"],
        )
        for code, count in sorted(m.ingest_responses.items()):
            answers.add_metric([str(code)], count)
        duration = HistogramMetricFamily(
            "webhookd_delivery_duration_seconds",
            "Delivery request duration, connect to last byte.",
        )
        cumulative, buckets = 0, []
        for bound, count in zip((*DURATION_BUCKETS, math.inf), m.duration_counts, strict=True):
            cumulative += count
            buckets.append(("+Inf" if bound == math.inf else repr(bound), cumulative))
        duration.add_metric([], buckets, m.duration_sum)
        replayed = CounterMetricFamily(
            "webhookd_replayed", "Webhooks queued again by a replay.", labels=["tenant"]
        )
        for tenant, count in sorted(m.replays.items()):
            replayed.add_metric([tenant], count)
        pruned = CounterMetricFamily(
            "webhookd_history_pruned",
            "History records pruned: age (older than the tenant's history_retention), size "
            "(the oldest, to stay under history_max_bytes).",
            labels=["reason"],
        )
        for reason in ("age", "size"):
            pruned.add_metric([reason], m.pruned_records[reason])
        forgotten = CounterMetricFamily(
            "webhookd_ids_forgotten",
            "Producer ids forgotten after the idempotency window (they may be used again).",
        )
        forgotten.add_metric([], m.ids_forgotten)
        yield from (deliveries, delivered, duration, ingested, answers, replayed, pruned, forgotten)


class _HistoryCollector(Collector):
    """The history's size as last asked (the /metrics handler asks just before it renders)
    and the history records dropped for a full disk since start."""

    def __init__(self, service: Gauged) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        size = self.service.history_seen
        records = GaugeMetricFamily(
            "webhookd_history_records",
            "History records kept (webhooks that left a queue), every tenant together.",
        )
        records.add_metric([], size.records)
        stored = GaugeMetricFamily(
            "webhookd_history_bytes",
            "Bytes of the history as the store counts them (records and failed attempts; "
            "the database's pages and indexes add to it).",
        )
        stored.add_metric([], size.bytes)
        dropped = CounterMetricFamily(
            "webhookd_history_dropped",
            "History records not written for a full disk (the delivery itself was recorded).",
        )
        dropped.add_metric([], self.service.store.history_dropped)
        yield from (records, stored, dropped)


class Metrics:
    def __init__(self, service: Gauged) -> None:
        self.deliveries: dict[tuple[str, str], int] = {}
        self.delivered: dict[str, int] = {}
        self.ingest: dict[tuple[str, str], int] = {}
        self.ingest_responses: dict[int, int] = {}  # HTTP status -> ingest requests answered
        # Per bucket (not cumulative), the last one for +Inf.
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.replays: dict[str, int] = {}
        self.pruned_records = {"age": 0, "size": 0}
        self.ids_forgotten = 0
        self.registry = CollectorRegistry()
        self.registry.register(_CountsCollector(self))
        self.registry.register(_QueueCollector(service))
        self.registry.register(_HistoryCollector(service))
        # process_start_time_seconds and the like: a restart (by the systemd watchdog, say)
        # shows as a new start time.
        ProcessCollector(registry=self.registry)

    def watch_connections(self, guard: Guard) -> None:
        """Report the API's connections from `guard` too (the process wiring calls this
        as it builds the API; without one there are none to report)."""
        self.registry.register(_ConnectionsCollector(guard))

    def attempted(self, tenant: str, batch: list[Webhook], outcome: Outcome) -> None:
        key = (tenant, "success" if outcome.ok else "failure")
        self.deliveries[key] = self.deliveries.get(key, 0) + 1
        if outcome.ok:
            self.delivered[tenant] = self.delivered.get(tenant, 0) + len(batch)
        seconds = outcome.duration_ms / 1000
        self.duration_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
        self.duration_sum += seconds

    def ingested(self, tenant: str, status: str, count: int) -> None:
        key = (tenant, status)
        self.ingest[key] = self.ingest.get(key, 0) + count

    def replayed(self, tenant: str, count: int) -> None:
        self.replays[tenant] = self.replays.get(tenant, 0) + count

    def pruned(self, result: PruneResult) -> None:
        self.pruned_records["age"] += result.by_age
        self.pruned_records["size"] += result.by_size
        self.ids_forgotten += result.ids

    def answered_ingest(self, status: int) -> None:
        self.ingest_responses[status] = self.ingest_responses.get(status, 0) + 1

    def render(self) -> bytes:
        return generate_latest(self.registry)
