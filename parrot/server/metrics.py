"""Prometheus metrics of the manager, read at scrape time from live state."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from parrot.manager.graph import Call
from parrot.manager.manager import Manager


class ManagerCollector:
    def __init__(self, manager: Manager):
        self.manager = manager

    def collect(self):
        states = GaugeMetricFamily("parrot_calls", "calls by state", labels=["state"])
        counts: dict[str, int] = {}
        for session in self.manager.sessions.values():
            for call in session.graph.calls.values():
                counts[call.state.value] = counts.get(call.state.value, 0) + 1
        for state, count in sorted(counts.items()):
            states.add_metric([state], count)
        yield states
        yield GaugeMetricFamily("parrot_sessions", "open sessions", value=len(self.manager.sessions))
        yield CounterMetricFamily("parrot_sessions_expired", "sessions closed after the idle timeout", value=self.manager.expired_sessions)
        running = GaugeMetricFamily("parrot_engine_running_jobs", "jobs running on each engine (batch size)", labels=["engine"])
        kv_used = GaugeMetricFamily("parrot_engine_kv_blocks_used", "KV blocks in use", labels=["engine"])
        kv_peak = GaugeMetricFamily("parrot_engine_kv_blocks_peak_batch", "most KV blocks one forward step's batch used", labels=["engine"])
        kv_cached = GaugeMetricFamily("parrot_engine_kv_blocks_cached", "KV blocks held only by cached prefixes (reclaimable)", labels=["engine"])
        contexts = GaugeMetricFamily("parrot_engine_contexts", "live contexts on each engine (cached prefixes not counted)", labels=["engine"])
        kv_total = GaugeMetricFamily("parrot_engine_kv_blocks_total", "KV blocks in the pool", labels=["engine"])
        tokens = CounterMetricFamily("parrot_engine_tokens", "tokens processed (prefill and decode)", labels=["engine"])
        for engine in self.manager.engines:
            stats = engine.stats()
            running.add_metric([stats.name], stats.running_jobs)
            kv_used.add_metric([stats.name], stats.kv_blocks_total - stats.kv_blocks_free)
            kv_total.add_metric([stats.name], stats.kv_blocks_total)
            kv_peak.add_metric([stats.name], stats.peak_batch_blocks)
            kv_cached.add_metric([stats.name], stats.kv_blocks_cached)
            contexts.add_metric([stats.name], stats.contexts)
            tokens.add_metric([stats.name], stats.tokens_processed)
        yield from (running, kv_used, kv_peak, kv_cached, contexts, kv_total, tokens)


class ManagerMetrics:
    def __init__(self, manager: Manager):
        self.registry = CollectorRegistry()
        self.registry.register(ManagerCollector(manager))
        self.call_latency = Histogram(
            "parrot_call_seconds", "time from dispatch to last output, by deduced objective", ["objective"],
            registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        manager.executor.on_complete.append(self._observe)

    def _observe(self, call: Call, seconds: float) -> None:
        self.call_latency.labels(call.objective.value).observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
