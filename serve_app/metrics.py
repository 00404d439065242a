"""Prometheus metrics that stay right with many ingress replicas.

Each ingress replica records into its own prometheus-client registry and pushes the
cumulative samples to the health actor every second. The actor sums them across
replicas (counters and histograms over every replica it has heard from, gauges over
those heard from recently) and renders one exposition, so a scrape of `/metrics` on
any ingress replica returns fleet-wide figures.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from .replicas import ReplicaState, Snapshot

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
UNKNOWN_MODEL = "(unknown)"

# (sample name, sorted label pairs, value)
SampleTuple = tuple[str, tuple[tuple[str, str], ...], float]


@dataclass(frozen=True, slots=True)
class FamilyData:
    name: str
    type: str
    documentation: str
    samples: tuple[SampleTuple, ...]


class RequestMetrics:
    """What one ingress replica records on the request path (cheap: in-process counters)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "gateway_requests", "Requests answered, by model, status and replica.",
            ["model", "status", "replica"], registry=self.registry,
        )
        self.latency = Histogram(
            "gateway_request_duration_seconds", "Time from request to the last byte sent.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.ttfb = Histogram(
            "gateway_time_to_first_byte_seconds", "Time from request to the first response byte from a replica.",
            ["model"], buckets=LATENCY_BUCKETS, registry=self.registry,
        )
        self.in_flight = Gauge(
            "gateway_requests_in_flight", "Requests being served right now.", ["model"], registry=self.registry,
        )
        self.predicted_cached = Counter(
            "gateway_routing_predicted_cached_tokens", "Prompt tokens the router expected the chosen replica to hold.",
            ["model"], registry=self.registry,
        )
        self.routed_prompt = Counter(
            "gateway_routing_prompt_tokens", "Prompt tokens (estimated) of requests a cost-based router placed.",
            ["model"], registry=self.registry,
        )
        self.stream_errors = Counter(
            "gateway_stream_errors", "Streams ended with an error event after they started.",
            ["model", "replica"], registry=self.registry,
        )

    def started(self, model: str) -> None:
        self.in_flight.labels(model).inc()

    def first_byte(self, model: str, seconds: float) -> None:
        self.ttfb.labels(model).observe(seconds)

    def finished(self, model: str, status: int | str, replica: str, seconds: float) -> None:
        """Once per `started`, whatever the outcome."""
        self.in_flight.labels(model).dec()
        self.requests.labels(model, str(status), replica).inc()
        self.latency.labels(model).observe(seconds)

    def routed(self, model: str, predicted_cached_tokens: int, prompt_tokens: int) -> None:
        self.predicted_cached.labels(model).inc(predicted_cached_tokens)
        self.routed_prompt.labels(model).inc(prompt_tokens)

    def rejected(self, model: str, status: int) -> None:
        """A request refused before routing (4xx): counted, never in flight."""
        self.requests.labels(model, str(status), "").inc()

    def stream_error(self, model: str, replica: str) -> None:
        self.stream_errors.labels(model, replica).inc()

    def export(self) -> tuple[FamilyData, ...]:
        """Cumulative samples, picklable, for the actor to aggregate."""
        families = []
        for metric in self.registry.collect():
            samples = tuple(
                (s.name, tuple(sorted(s.labels.items())), float(s.value))
                for s in metric.samples
                if not s.name.endswith("_created")
            )
            families.append(FamilyData(metric.name, metric.type, metric.documentation, samples))
        return tuple(families)


class MetricsAggregator:
    """Sums what every ingress replica pushed; lives in the health actor."""

    def __init__(self, gauge_ttl_s: float = 5.0, clock=time.monotonic) -> None:
        self._latest: dict[str, tuple[float, tuple[FamilyData, ...]]] = {}
        self._gauge_ttl_s = gauge_ttl_s
        self._clock = clock

    def push(self, source_id: str, families: tuple[FamilyData, ...]) -> None:
        self._latest[source_id] = (self._clock(), families)

    def merged(self) -> list[Metric]:
        now = self._clock()
        meta: dict[str, tuple[str, str]] = {}
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for received, families in self._latest.values():
            fresh = now - received <= self._gauge_ttl_s
            for family in families:
                if family.type == "gauge" and not fresh:
                    continue  # a gone replica's in-flight count is no longer true
                meta.setdefault(family.name, (family.type, family.documentation))
                bucket = sums.setdefault(family.name, {})
                for name, labels, value in family.samples:
                    bucket[(name, labels)] = bucket.get((name, labels), 0.0) + value
        out = []
        for name, (mtype, doc) in meta.items():
            metric = Metric(name, doc, mtype)
            for (sample_name, labels), value in sums[name].items():
                metric.add_sample(sample_name, dict(labels), value)
            out.append(metric)
        return out


def replica_state_metrics(snapshot: Snapshot | None) -> Iterable[Metric]:
    counts = {state: 0 for state in ReplicaState}
    if snapshot is not None:
        for view in snapshot.replicas:
            counts[view.state] += 1
    metric = Metric("gateway_replicas", "vLLM replicas by state, as the health actor sees them.", "gauge")
    for state, count in counts.items():
        metric.add_sample("gateway_replicas", {"state": state.value}, float(count))
    return [metric]


class _FixedCollector:
    """Hands prometheus-client metric families that were built elsewhere."""

    def __init__(self, items: list[Metric]) -> None:
        self._items = items

    def collect(self) -> list[Metric]:
        return self._items


def render(metrics: Iterable[Metric]) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_FixedCollector(list(metrics)))
    return generate_latest(registry)
