"""Prometheus metrics of the server (`GET /metrics`), named after vLLM's where one exists.

Counters and latency histograms are updated by the request handlers as events reach them (what a
client sees, minus the network); the scheduler's own state (running and waiting requests, KV slots)
is read from `scheduler.stats()` at scrape time. Each app has its own registry, so several servers
in one process (tests) do not share figures.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily

PREFIX = "picochat"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0,
                   60.0)
ITL_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)

# scheduler.stats() fields exported as gauges: stats name -> (metric name, help)
SCHEDULER_GAUGES = {
    "running": ("num_requests_running", "requests being decoded"),
    "waiting": ("num_requests_waiting", "requests queued for a slot"),
    "slots_used": ("kv_slots_used", "KV-cache rows (sequences) in use"),
    "slots_total": ("kv_slots_total", "KV-cache rows (sequences) available"),
}


def _stats_dict(stats) -> dict:
    if dataclasses.is_dataclass(stats):
        return dataclasses.asdict(stats)
    return dict(stats or {})


class _SchedulerCollector:
    """Reads the scheduler's stats at scrape time."""

    def __init__(self, stats: Callable[[], object | None]):
        self.stats = stats

    def collect(self):
        stats = _stats_dict(self.stats())
        for key, (name, help_text) in SCHEDULER_GAUGES.items():
            family = GaugeMetricFamily(f"{PREFIX}_{name}", help_text)
            family.add_metric([], float(stats.get(key, 0) or 0))
            yield family
        for key, value in stats.items():  # whatever else the scheduler reports, as gauges
            if key not in SCHEDULER_GAUGES and isinstance(value, (int, float)) and not isinstance(value, bool):
                family = GaugeMetricFamily(f"{PREFIX}_scheduler_{key}", f"scheduler.stats()['{key}']")
                family.add_metric([], float(value))
                yield family


class ServerMetrics:
    def __init__(self, stats: Callable[[], object | None]):
        r = self.registry = CollectorRegistry()
        self.prompt_tokens = Counter(f"{PREFIX}_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter(f"{PREFIX}_generation_tokens", "tokens generated", registry=r)
        self.finished = Counter(f"{PREFIX}_request_finished", "finished samples by reason (stop, length, "
                                "cancelled)", ["reason"], registry=r)
        self.http_errors = Counter(f"{PREFIX}_request_errors", "requests answered with an error, by status",
                                   ["status"], registry=r)
        self.in_progress = Gauge(f"{PREFIX}_http_requests_in_progress", "generation requests being answered",
                                 registry=r)
        self.ttft = Histogram(f"{PREFIX}_time_to_first_token_seconds", "request received -> first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.itl = Histogram(f"{PREFIX}_inter_token_latency_seconds", "gap between a request's tokens",
                             buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram(f"{PREFIX}_e2e_request_latency_seconds", "request received -> last token",
                             buckets=LATENCY_BUCKETS, registry=r)
        r.register(_SchedulerCollector(stats))
        for reason in ("stop", "length", "cancelled"):
            self.finished.labels(reason)  # present (at 0) before the first request

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def observe(self) -> "RequestObserver":
        return RequestObserver(self)


class RequestObserver:
    """Timings of one request, fed as its events reach the handler."""

    def __init__(self, metrics: ServerMetrics):
        self.m = metrics
        self.start = self.last = time.perf_counter()
        self.first_seen = False

    def tokens(self, count: int) -> None:
        """`count` tokens (over all samples) arrived together just now."""
        if count <= 0:
            return
        t = time.perf_counter()
        if not self.first_seen:
            self.m.ttft.observe(t - self.start)
            self.first_seen = True
            count -= 1
        elif count:
            gap = (t - self.last) / count  # tokens that arrive together share the gap
            for _ in range(count):
                self.m.itl.observe(gap)
        self.last = t

    def finished(self, reason: str) -> None:
        self.m.finished.labels(reason).inc()

    def done(self, prompt_tokens: int, completion_tokens: int) -> None:
        self.m.prompt_tokens.inc(prompt_tokens)
        self.m.generation_tokens.inc(completion_tokens)
        self.m.e2e.observe(time.perf_counter() - self.start)
