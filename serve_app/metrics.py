"""Prometheus metrics that stay right with many ingress replicas.

Each ingress replica records into its own prometheus-client registry and pushes the
cumulative samples to the health actor every second. The actor sums them across
replicas (counters and histograms over every replica it has heard from, gauges over
those heard from recently) and renders one exposition, so a scrape of `/metrics` on
any ingress replica returns fleet-wide figures.

Both label sets that churn are bounded. A vLLM replica's series (`replica` label) are
dropped once it has been gone from the replica table for `metrics.replica_series_ttl_s`:
first from the fleet aggregate, later (with a margin) from each ingress replica's own
registry, so no scrape sees a series go down before it goes away. An ingress replica
that stopped pushing for `metrics.retire_ingress_after_s` is folded into one retired
total: its counters stay in the fleet sums (which never go down), its entry goes.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

from .replicas import ReplicaState, Snapshot

log = logging.getLogger("ray.serve")

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
        self._gone_since: dict[str, float] = {}  # vLLM replicas with series here that left the view

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

    def forget_replicas(self, live: Iterable[str], ttl_s: float, now: float | None = None) -> int:
        """Drop the series of vLLM replicas gone from the view for longer than `ttl_s`.

        The `replica` label would otherwise grow with every pod ever seen. Returns how many
        label sets were removed.
        """
        now = time.monotonic() if now is None else now
        live = set(live)
        gone_since = self._gone_since
        still_gone: dict[str, float] = {}
        removed = 0
        for counter in (self.requests, self.stream_errors):
            names = counter._labelnames
            for metric in counter.collect():
                seen: set[tuple[str, ...]] = set()
                for sample in metric.samples:
                    replica = sample.labels.get("replica", "")
                    if not replica or replica in live:
                        continue
                    since = still_gone[replica] = gone_since.get(replica, now)
                    values = tuple(sample.labels[name] for name in names)
                    if now - since > ttl_s and values not in seen:
                        seen.add(values)
                        counter.remove(*values)
                        removed += 1
        self._gone_since = still_gone
        return removed

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


MAX_RETIRED_SOURCES = 4096  # ids remembered so a retired ingress replica is not counted twice


class MetricsAggregator:
    """Sums what every ingress replica pushed; lives in the health actor."""

    def __init__(
        self,
        gauge_ttl_s: float = 5.0,
        clock=time.monotonic,
        *,
        retire_after_s: float = 600.0,
        replica_series_ttl_s: float = 600.0,
    ) -> None:
        self._latest: dict[str, tuple[float, tuple[FamilyData, ...]]] = {}
        self._gauge_ttl_s = gauge_ttl_s
        self._clock = clock
        self._retire_after_s = retire_after_s
        self._replica_ttl_s = replica_series_ttl_s
        # Counters and histograms of ingress replicas that went silent, summed into one.
        self._retired: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        self._retired_meta: dict[str, tuple[str, str]] = {}
        self._retired_ids: OrderedDict[str, None] = OrderedDict()
        self._live: frozenset[str] | None = None  # vLLM replicas in the table (None: not told yet)
        self._gone_since: dict[str, float] = {}

    @property
    def sources(self) -> int:
        """Ingress replicas whose figures are kept one by one (the retired ones are summed)."""
        return len(self._latest)

    def push(self, source_id: str, families: tuple[FamilyData, ...]) -> None:
        if source_id in self._retired_ids:
            # Silent for longer than retire_after_s, folded, and back: its cumulative figures
            # are already in the retired sum. Counting them again would double them.
            log.warning("ingress replica %s pushed metrics after it was retired; ignored", source_id)
            return
        self._latest[source_id] = (self._clock(), families)

    def replicas_live(self, replica_ids: Iterable[str]) -> None:
        """The vLLM replicas in the table now; series of others go `replica_series_ttl_s` after they left.

        Called often (every push), so a departure is timed from when it happened, not from
        the next scrape: ingress replicas, which drop their own copies a margin later, then
        never drop a series before the aggregate has.
        """
        now = self._clock()
        live = frozenset(replica_ids)
        if self._live is not None:
            for replica in self._live - live:
                self._gone_since.setdefault(replica, now)
        for replica in live:
            self._gone_since.pop(replica, None)
        for replica, since in list(self._gone_since.items()):
            if now - since > 2 * self._replica_ttl_s:  # long gone from every registry too
                del self._gone_since[replica]
        self._live = live

    def _retire_silent(self, now: float) -> None:
        for source_id, (received, families) in list(self._latest.items()):
            if now - received <= self._retire_after_s:
                continue
            del self._latest[source_id]
            self._retired_ids[source_id] = None
            while len(self._retired_ids) > MAX_RETIRED_SOURCES:
                self._retired_ids.popitem(last=False)
            for family in families:
                if family.type == "gauge":
                    continue
                self._retired_meta.setdefault(family.name, (family.type, family.documentation))
                bucket = self._retired.setdefault(family.name, {})
                for name, labels, value in family.samples:
                    bucket[(name, labels)] = bucket.get((name, labels), 0.0) + value

    def _keep(self, labels: tuple[tuple[str, str], ...], now: float) -> bool:
        """False for a series of a vLLM replica gone from the table for longer than the TTL."""
        if self._live is None:
            return True
        replica = next((value for key, value in labels if key == "replica"), "")
        if not replica or replica in self._live:
            return True
        since = self._gone_since.setdefault(replica, now)  # (never seen live: gone from now on)
        return now - since <= self._replica_ttl_s

    def merged(self) -> list[Metric]:
        now = self._clock()
        self._retire_silent(now)
        meta: dict[str, tuple[str, str]] = dict(self._retired_meta)
        sums: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
        for name, bucket in self._retired.items():
            for key in [key for key in bucket if not self._keep(key[1], now)]:
                del bucket[key]  # the retired sum forgets gone replicas too
            sums[name] = dict(bucket)
        for received, families in self._latest.values():
            fresh = now - received <= self._gauge_ttl_s
            for family in families:
                if family.type == "gauge" and not fresh:
                    continue  # a gone replica's in-flight count is no longer true
                meta.setdefault(family.name, (family.type, family.documentation))
                bucket = sums.setdefault(family.name, {})
                for name, labels, value in family.samples:
                    if self._keep(labels, now):
                        bucket[(name, labels)] = bucket.get((name, labels), 0.0) + value
        out = []
        for name, (mtype, doc) in meta.items():
            metric = Metric(name, doc, mtype)
            for (sample_name, labels), value in sums.get(name, {}).items():
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
