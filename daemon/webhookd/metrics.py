"""Prometheus metrics: counters fed by ingest and attempts, gauges read from the workers."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from webhookd.sender import Outcome
    from webhookd.service import Service
    from webhookd.store import Webhook


class _QueueCollector(Collector):
    """Per-tenant gauges read at scrape time from the workers' in-memory state (no SQL)."""

    def __init__(self, service: Service) -> None:
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
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
        now = self.service.clock.now()
        count_stalled = 0
        for worker in self.service.visible_workers():
            depth.add_metric([worker.name], worker.waiting)
            since = worker.oldest_waiting_at
            oldest.add_metric([worker.name], max(0.0, now - since) if since else 0.0)
            attempts.add_metric([worker.name], worker.row.attempts)
            parked.add_metric([worker.name], worker.parked)
            count_stalled += worker.queue_state == "stalled"
        stalled.add_metric([], count_stalled)
        yield from (depth, oldest, attempts, parked, stalled, disk_full)


class Metrics:
    def __init__(self, service: Service) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter(
            "webhookd_deliveries",
            "Delivery attempts by tenant and outcome.",
            ["tenant", "outcome"],
            registry=self.registry,
        )
        self.delivered = Counter(
            "webhookd_webhooks_delivered",
            "Webhooks delivered (answered with a success status).",
            ["tenant"],
            registry=self.registry,
        )
        self.duration = Histogram(
            "webhookd_delivery_duration_seconds",
            "Delivery request duration, connect to last byte.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.ingest = Counter(
            "webhookd_ingested",
            "Ingested webhooks by tenant and status (queued, duplicate, not_subscribed, disabled).",
            ["tenant", "status"],
            registry=self.registry,
        )
        self.registry.register(_QueueCollector(service))
        self._children: dict[tuple[object, ...], Counter] = {}

    def attempted(self, tenant: str, batch: list[Webhook], outcome: Outcome) -> None:
        outcome_label = "success" if outcome.ok else "failure"
        self._child(self.deliveries, tenant, outcome_label).inc()
        if outcome.ok:
            self._child(self.delivered, tenant).inc(len(batch))
        self.duration.observe(outcome.duration_ms / 1000)

    def ingested(self, tenant: str, status: str, count: int) -> None:
        self._child(self.ingest, tenant, status).inc(count)

    def _child(self, metric: Counter, *labels: str) -> Counter:
        """metric.labels(*labels), looked up once: labels() validates and locks every call."""
        key = (metric, *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def render(self) -> bytes:
        return generate_latest(self.registry)
