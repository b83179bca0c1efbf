"""Prometheus metrics of one server: HTTP outcomes, latencies, and the engine's live state.

Each app gets its own ``CollectorRegistry`` (never the process-global one), so many apps can
exist in one process (tests) without "duplicated timeseries" errors.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class StatsSource(Protocol):
    def get_stats(self) -> dict[str, int | float]: ...


class EngineCollector(Collector):
    """Reads ``engine.get_stats()`` at scrape time, so gauges are never stale and cost nothing between scrapes."""

    def __init__(self, engine: StatsSource, model_name: str) -> None:
        self.engine = engine
        self.model_name = model_name

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.get_stats()
        labels = ["model"]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], value)
            return family

        def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, doc, labels=labels)
            family.add_metric([self.model_name], value)
            return family

        pool_size = stats.get("pool_size", 0) or 0
        pool_free = stats.get("pool_free", 0) or 0
        prompt_total = stats.get("prompt_tokens_total", 0) or 0
        hit_total = stats.get("cache_hit_tokens_total", 0) or 0
        yield gauge("sglite_num_running_requests", "Requests decoding now.", stats.get("num_running", 0))
        yield gauge("sglite_num_waiting_requests", "Requests queued for admission.", stats.get("num_waiting", 0))
        yield gauge("sglite_kv_pool_size_tokens", "KV slots in the pool.", pool_size)
        yield gauge(
            "sglite_kv_pool_usage_ratio",
            "Fraction of KV slots not free (running requests plus evictable radix cache).",
            (pool_size - pool_free) / pool_size if pool_size else 0.0,
        )
        yield gauge("sglite_radix_cached_tokens", "Tokens held by the radix cache.", stats.get("cached_tokens_in_tree", 0))
        yield gauge(
            "sglite_radix_cache_hit_rate",
            "Prompt tokens served from the radix cache / all prompt tokens, since start.",
            hit_total / prompt_total if prompt_total else 0.0,
        )
        yield counter("sglite_prompt_tokens", "Prompt tokens processed.", prompt_total)
        yield counter("sglite_generation_tokens", "Tokens generated.", stats.get("generation_tokens_total", 0))
        yield counter("sglite_cache_hit_tokens", "Prompt tokens reused from the radix cache.", hit_total)
        yield counter("sglite_engine_requests", "Requests finished by the engine.", stats.get("requests_total", 0))


class ServerMetrics:
    """The metrics one app records, plus the engine's, rendered by ``GET /metrics``.

        >>> class IdleEngine:
        ...     def get_stats(self):
        ...         return {"num_running": 0, "num_waiting": 0}
        >>> metrics = ServerMetrics(IdleEngine(), "tiny-llama")
        >>> metrics.ttft.observe(0.05)
        >>> body, content_type = metrics.render()
        >>> b"sglite_time_to_first_token_seconds_count 1.0" in body
        True
    """

    def __init__(self, engine: StatsSource, model_name: str) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "sglite_http_requests", "HTTP requests answered, by route and status.", ["route", "status"], registry=self.registry
        )
        self.ttft = Histogram(
            "sglite_time_to_first_token_seconds", "Streamed requests: arrival to first token.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.inter_token_latency = Histogram(
            "sglite_inter_token_latency_seconds", "Streamed requests: time between consecutive tokens.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.e2e_latency = Histogram(
            "sglite_e2e_request_latency_seconds", "Arrival to last token, per completion.",
            buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.registry.register(EngineCollector(engine, model_name))

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
