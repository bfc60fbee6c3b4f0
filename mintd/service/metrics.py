"""What `GET /metrics` shows, in Prometheus' format, per base model (the `model` label).

Adapter names never become labels: they belong to many owners, and there may be millions. Serving
figures (time to first token, inter-token latency, tokens, running and waiting sequences) are observed
as the engine pushes tokens; residency and training figures are read from the service when scraped.
Each server has its own registry, so several servers in one process (tests) do not collide.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from mintd.service.tinker import TinkerService

# Seconds: from a few ms (a GPU step) to a minute (a cold load behind a long queue on a CPU).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TIER_BYTES = re.compile(r"^([a-z]+)_bytes$")  # residency stats: device_bytes, host_bytes, ...
_COUNTS = {
    "hits": "requests whose adapter was already resident",
    "misses": "requests whose adapter had to be loaded",
    "evictions": "resident adapters dropped to make room",
}


class Metrics:
    def __init__(self, service: TinkerService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "mintd_http_requests",
            "HTTP requests answered, by route and status",
            ["route", "method", "status"],
            registry=r,
        )
        self.ttft = Histogram(
            "mintd_time_to_first_token_seconds",
            "OpenAI requests: from admission to the first token",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "mintd_inter_token_latency_seconds",
            "OpenAI requests: between consecutive tokens of a sequence",
            ["model"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "mintd_prompt_tokens", "OpenAI requests: prompt tokens admitted", ["model"], registry=r
        )
        self.generation_tokens = Counter(
            "mintd_generation_tokens", "OpenAI requests: tokens generated", ["model"], registry=r
        )
        self.running = Gauge(
            "mintd_sequences_running",
            "OpenAI sequences decoding (first token made, not finished)",
            ["model"],
            registry=r,
        )
        self.waiting = Gauge(
            "mintd_sequences_waiting",
            "OpenAI sequences admitted and waiting for their first token",
            ["model"],
            registry=r,
        )
        self.rejected = Counter(
            "mintd_requests_rejected",
            "OpenAI requests refused with 429 (the base model's queue was full)",
            ["model"],
            registry=r,
        )
        for name in service.models:  # every series exists from the start, at zero
            for metric in (self.ttft, self.itl, self.prompt_tokens, self.generation_tokens, self.rejected):
                metric.labels(name)
            self.running.labels(name).set(0)
            self.waiting.labels(name).set(0)
        r.register(_ServiceCollector(service))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ServiceCollector(Collector):
    """Residency and training figures, read from the service at scrape time."""

    def __init__(self, service: TinkerService) -> None:
        self.service = service

    def collect(self) -> Iterator[Metric]:
        counts = {
            key: CounterMetricFamily(f"mintd_residency_{key}", help_, labels=["model", "tier"])
            for key, help_ in _COUNTS.items()
        }
        loads = CounterMetricFamily(
            "mintd_residency_loads",
            "adapters loaded into the tier (every miss is a load)",
            labels=["model", "tier"],
        )
        used = GaugeMetricFamily(
            "mintd_residency_bytes", "adapter bytes resident, per tier", labels=["model", "tier"]
        )
        budget = GaugeMetricFamily(
            "mintd_residency_budget_bytes", "adapter byte budget, per tier", labels=["model", "tier"]
        )
        resident = GaugeMetricFamily(
            "mintd_residency_adapters", "saved adapters resident on the device", labels=["model"]
        )
        queue = GaugeMetricFamily(
            "mintd_residency_load_queue", "cold loads waiting or running", labels=["model", "state"]
        )
        steps = CounterMetricFamily("mintd_training_steps", "optimizer steps taken", labels=["model"])
        for name, stats in self.service.residency().items():
            for key, family in counts.items():
                family.add_metric([name, "device"], stats[key])
                if f"host_{key}" in stats:
                    family.add_metric([name, "host"], stats[f"host_{key}"])
            for state in ("queued", "in_flight"):
                if f"loads_{state}" in stats:
                    queue.add_metric([name, state], stats[f"loads_{state}"])
            loads.add_metric([name, "device"], stats["misses"])
            for key, value in stats.items():
                tier = _TIER_BYTES.match(key)
                if tier:
                    used.add_metric([name, tier[1]], value)
                    if f"{tier[1]}_budget_bytes" in stats:
                        budget.add_metric([name, tier[1]], stats[f"{tier[1]}_budget_bytes"])
            resident.add_metric([name], stats["resident_adapters"])
            steps.add_metric([name], self.service.training_steps[name])
        yield from (*counts.values(), loads, used, budget, resident, queue, steps)
