"""Prometheus metrics for one engine, on a registry of its own.

Request counts and latencies are observed by the HTTP layer; everything the
actors already count (queue depths, shadow drops, live shares at each
reference edge) is read at scrape time from their ``statistics()``, so the
hot path pays nothing for it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

__all__ = ["CONTENT_TYPE", "Metrics"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Latency buckets from 250 us to 1 s: a fraud check's budget is milliseconds.
_LATENCY_BUCKETS = (
    0.00025,
    0.0005,
    0.001,
    0.002,
    0.003,
    0.005,
    0.0075,
    0.01,
    0.02,
    0.05,
    0.1,
    0.25,
    1.0,
)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096, 8192)


class Metrics:
    """Counters and histograms, plus a collector over the engine's actors."""

    def __init__(self, engine: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.requests = Counter(
            "muse_http_requests",
            "HTTP requests answered, by route and status.",
            ["route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "muse_http_request_seconds",
            "Time from request start to response, by route.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_rows = Histogram(
            "muse_scorer_batch_rows",
            "Rows per live scorer batch.",
            buckets=_BATCH_BUCKETS,
            registry=self.registry,
        )
        self.direct_lane = Counter(
            "muse_direct_lane",
            "Scoring requests answered on the direct lane ('requests'), and "
            "connections it handed to hypercorn ('handovers').",
            ["what"],
            registry=self.registry,
        )
        self.registry.register(_EngineCollector(engine))
        engine.on_batch = self.batch_rows.observe

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector:
    def __init__(self, engine: Any) -> None:
        self._engine = engine

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        stats = self._engine.statistics()
        queue = GaugeMetricFamily("muse_queue_depth", "Jobs waiting.", labels=["queue"])
        queue.add_metric(["live"], stats.live_queue)
        queue.add_metric(["shadow"], stats.shadow_queue)
        yield queue
        for name, value, text in (
            ("muse_events", stats.events, "Events accepted for scoring."),
            ("muse_overloaded", stats.overloaded, "Requests shed with 503."),
            (
                "muse_deadline_exceeded",
                stats.deadline_exceeded,
                "Requests past deadline.",
            ),
            ("muse_aborted", stats.aborted, "Requests whose client went away."),
            ("muse_shadow_jobs", stats.shadow_jobs, "Shadow jobs queued."),
            (
                "muse_shadow_dropped_events",
                stats.shadow_dropped,
                "Shadow events dropped.",
            ),
        ):
            counter = CounterMetricFamily(name, text)
            counter.add_metric([], value)
            yield counter
        yield from self._calibration()

    def _calibration(self) -> Iterator[Metric]:
        stats = self._engine.calibrator.statistics()
        sizes = GaugeMetricFamily(
            "muse_calibration_sample_size",
            "Scores held in the reservoir a mapping would be fitted from.",
            labels=["predictor", "tenant", "source"],
        )
        for key, size in stats.samples.items():
            # "predictor/tenant/source": names cannot hold a slash.
            sizes.add_metric(key.split("/"), size)
        yield sizes
        observed = GaugeMetricFamily(
            "muse_live_share_at_edge",
            "Share of served scores at or above each reference edge.",
            labels=["predictor", "tenant", "edge"],
        )
        target = GaugeMetricFamily(
            "muse_target_share_at_edge",
            "Target share of the reference curve at each edge.",
            labels=["predictor", "tenant", "edge"],
        )
        for row in stats.shares:
            for edge, goal, seen in zip(row.edges, row.targets, row.observed):
                labels = [row.predictor, row.tenant, f"{edge:g}"]
                observed.add_metric(labels, seen)
                target.add_metric(labels, goal)
        yield observed
        yield target
