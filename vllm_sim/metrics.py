"""Prometheus exposition with vLLM's metric names and labels (model_name, engine="0").

Gauges and counters are read from the engine at scrape time, so the request path pays
only for the latency histograms. A private registry keeps several simulators in one
process (or a test importing this module) from colliding.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engine import Engine

# Prometheus text format 0.0.4, what vLLM's /metrics sends.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# vLLM's bucket boundaries for time to first token.
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0,
    2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)
E2E_BUCKETS = (
    0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)
LABELS = ("model_name", "engine")


class _EngineCollector(Collector):
    """Reads the engine's live state on each scrape."""

    def __init__(self, engine: Engine, model_name: str, legacy: bool) -> None:
        self._engine = engine
        self._labels = [model_name, "0"]
        self._legacy = legacy

    def collect(self) -> Iterator[Metric]:
        engine, labels = self._engine, self._labels
        stats = engine.stats
        prefix = "vllm:gpu_" if self._legacy else "vllm:"
        yield _gauge("vllm:num_requests_running", "Number of requests in model execution batches.",
                     labels, engine.running)
        yield _gauge("vllm:num_requests_waiting", "Number of requests waiting to be processed.",
                     labels, engine.waiting)
        if not self._legacy:
            # vLLM >= 0.11 splits the waiting queue by reason; the simulator's requests wait
            # only for capacity (running slots or KV blocks), never deferred.
            by_reason = GaugeMetricFamily(
                "vllm:num_requests_waiting_by_reason", "Number of requests waiting, by reason.",
                labels=[*LABELS, "reason"],
            )
            by_reason.add_metric([*labels, "capacity"], engine.waiting)
            by_reason.add_metric([*labels, "deferred"], 0)
            yield by_reason
        usage_name = "vllm:gpu_cache_usage_perc" if self._legacy else "vllm:kv_cache_usage_perc"
        yield _gauge(usage_name, "KV-cache usage. 1 means 100 percent usage.",
                     labels, engine.kv_cache_usage)
        yield _counter(f"{prefix}prefix_cache_queries",
                       "Prefix cache queries, in terms of number of queried tokens.",
                       labels, stats.prefix_queries_tokens)
        yield _counter(f"{prefix}prefix_cache_hits",
                       "Prefix cache hits, in terms of number of cached tokens.",
                       labels, stats.prefix_hits_tokens)
        yield _counter("vllm:num_preemptions", "Cumulative number of preemption from the engine.",
                       labels, stats.preemptions_total)
        yield _counter("vllm:prompt_tokens", "Number of prefill tokens processed.",
                       labels, stats.prompt_tokens_total)
        yield _counter("vllm:generation_tokens", "Number of generation tokens processed.",
                       labels, stats.generation_tokens_total)
        success = CounterMetricFamily(
            "vllm:request_success", "Count of successfully processed requests.",
            labels=[*LABELS, "finished_reason"],
        )
        for reason, count in stats.finished.items():
            success.add_metric([*labels, reason], count)
        yield success
        yield self._cache_config_info

    @property
    def _cache_config_info(self) -> GaugeMetricFamily:
        """vLLM's `vllm:cache_config_info`: the cache settings as labels, value 1."""
        pool = self._engine.pool
        info = {
            "block_size": str(pool.block_size),
            "cache_dtype": "auto",
            "enable_prefix_caching": str(pool.enable_caching),
            "engine": "0",
            "gpu_memory_utilization": "0.9",
            "num_cpu_blocks": "None",
            "num_gpu_blocks": str(pool.num_blocks),
            "num_gpu_blocks_override": str(pool.num_blocks),
            "prefix_caching_hash_algo": "sha256",
            "sliding_window": "None",
        }
        family = GaugeMetricFamily("vllm:cache_config_info", "Information of the LLMEngine CacheConfig",
                                   labels=list(info))
        family.add_metric(list(info.values()), 1.0)
        return family


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(LABELS))
    family.add_metric(labels, value)
    return family


def _counter(name: str, doc: str, labels: list[str], value: float) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(LABELS))
    family.add_metric(labels, value)
    return family


class Metrics:
    """The simulator's metrics registry."""

    def __init__(self, engine: Engine, model_name: str, *, legacy: bool = False) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(_EngineCollector(engine, model_name, legacy))
        self.ttft = Histogram(
            "vllm:time_to_first_token_seconds", "Histogram of time to first token in seconds.",
            LABELS, buckets=TTFT_BUCKETS, registry=self.registry,
        ).labels(model_name, "0")
        self.e2e = Histogram(
            "vllm:e2e_request_latency_seconds", "Histogram of e2e request latency in seconds.",
            LABELS, buckets=E2E_BUCKETS, registry=self.registry,
        ).labels(model_name, "0")

    def render(self) -> bytes:
        return generate_latest(self.registry)
