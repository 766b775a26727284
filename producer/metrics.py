"""/metrics for Prometheus: the cluster's counters (added by workers to Redis, see
core.metrics), gauges read at scrape time (queue depths, cache size), and this API
process's own request counts."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import redis
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from cachemgr.catalog import Catalog
from core.errors import T2IError
from core.jobstore import MetricsStore, connect
from core.metrics import cumulative_buckets, parse_field
from workers.queues import CACHE, FULL, RESUME, TRIAGE, WEBHOOKS

QUEUES = (TRIAGE, FULL, RESUME, CACHE, WEBHOOKS)

HELP = {
    "t2i_jobs_submitted_total": "jobs accepted",
    "t2i_jobs_finished_total": "jobs finished, by route and outcome",
    "t2i_triage_decisions_total": "triage routes, by generation queue and reason",
    "t2i_predictor_decisions_total": "match predictor: look up the index or skip it",
    "t2i_steps_requested_total": "denoising steps asked for by succeeded jobs",
    "t2i_steps_saved_total": "denoising steps skipped: resumed from a cached latent, or all "
                             "of them for an identical request's stored image",
    "t2i_cache_resumes_total": "succeeded jobs resumed from a cached latent, by K",
    "t2i_cache_evictions_total": "cache items evicted",
    "t2i_cache_evicted_bytes_total": "bytes of cache items evicted",
    "t2i_stage_seconds": "stage latency: triage, wait (queue), generate, total",
}


def _counter_families(values: dict[str, float]) -> Iterator[Metric]:
    counters: dict[str, list[tuple[dict[str, str], float]]] = defaultdict(list)
    histograms: dict[str, dict[tuple[tuple[str, str], ...], dict[str, float]]] = defaultdict(
        lambda: defaultdict(dict))
    for field, value in values.items():
        name, labels = parse_field(field)
        for part in ("_bucket_raw", "_sum", "_count"):
            if name.endswith(part):
                base, le = name[:-len(part)], labels.pop("le", None)
                histograms[base][tuple(sorted(labels.items()))][le or part] = value
                break
        else:
            counters[name].append((labels, value))
    for name, series in sorted(counters.items()):
        names = sorted({key for labels, _ in series for key in labels})
        family = CounterMetricFamily(name.removesuffix("_total"), HELP.get(name, name),
                                     labels=names)
        for labels, value in series:
            family.add_metric([labels.get(key, "") for key in names], value)
        yield family
    for name, by_labels in sorted(histograms.items()):
        names = sorted({key for labels in by_labels for key, _ in labels})
        histogram = HistogramMetricFamily(name, HELP.get(name, name), labels=names)
        for label_pairs, parts in by_labels.items():
            histogram.add_metric([dict(label_pairs).get(key, "") for key in names],
                                 cumulative_buckets(parts), parts.get("_sum", 0.0))
        yield histogram


class ServiceCollector(Collector):
    """Reads Redis at each scrape; an unreachable Redis gives ``t2i_up 0`` and no others."""

    def __init__(self, redis_url: str, broker_url: str) -> None:
        client = connect(redis_url)
        self.store, self.catalog = MetricsStore(client), Catalog(client)
        self.broker = client if broker_url == redis_url else connect(broker_url)

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("t2i_up", "1 when Redis answered this scrape")
        try:
            values = self.store.read()
            depths = {queue: self.broker.llen(queue) for queue in QUEUES}
            items, stored_bytes = self.catalog.item_count(), self.catalog.total_bytes()
        except (T2IError, redis.RedisError):
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from _counter_families(values)
        depth = GaugeMetricFamily("t2i_queue_depth", "messages waiting per queue",
                                  labels=["queue"])
        for queue, length in depths.items():
            depth.add_metric([queue], length)
        yield depth
        yield GaugeMetricFamily("t2i_cache_items", "cached (prompt, K) latents", value=items)
        yield GaugeMetricFamily("t2i_cache_bytes", "bytes of cached latents", value=stored_bytes)
        succeeded = sum(v for f, v in values.items()
                        if f.startswith("t2i_jobs_finished_total") and 'outcome="succeeded"' in f)
        resumed = sum(v for f, v in values.items() if f.startswith("t2i_cache_resumes_total"))
        exact = sum(v for f, v in values.items() if f.startswith("t2i_jobs_finished_total")
                    and 'route="exact"' in f and 'outcome="succeeded"' in f)
        yield GaugeMetricFamily("t2i_cache_hit_ratio",
                                "succeeded jobs resumed from the cache or served an identical "
                                "request's image / succeeded jobs",
                                value=(resumed + exact) / succeeded if succeeded else 0.0)


class ApiMetrics:
    """This API process's registry: its requests plus the service collector."""

    def __init__(self, redis_url: str, broker_url: str) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(ServiceCollector(redis_url, broker_url))
        self.requests = Counter("t2i_api_requests", "HTTP requests to the API",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("t2i_api_request_seconds", "HTTP request latency",
                                 ["method", "route"], registry=self.registry)

    def observe(self, method: str, route: str, status: int, started: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(time.perf_counter() - started)
