"""Prometheus metrics, one registry per app (so several apps can live in one process)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from shared.observe import RouteMetrics


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes and friends (Linux)
        self.requests = Counter(
            "pema_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "pema_request_seconds", "HTTP request latency", ["route"], registry=r
        )
        self.tokens = Counter("pema_represented_tokens", "Tokens run through the model", registry=r)
        self.key_tokens = Counter(
            "pema_key_tokens", "Tokens served per API key", ["key"], registry=r
        )
        self.queue_depth = Gauge(
            "pema_queue_depth", "Requests queued or in a model pass, by kind", ["kind"], registry=r
        )
        self.pass_jobs = Histogram(
            "pema_pass_requests",
            "Requests served by one scheduled pass, by kind (step, open, represent)",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128),
            registry=r,
        )
        self.pass_keys = Histogram(
            "pema_pass_keys",
            "API keys served by one scheduled pass, by kind",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32),
            registry=r,
        )
        self.pass_rows = Histogram(
            "pema_pass_rows",
            "Sequences in one scheduled pass, by kind",
            ["kind"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=r,
        )
        self.sessions = Gauge("pema_sessions_open", "Open generation sessions", registry=r)
        self.kv_bytes = Gauge("pema_kv_cache_bytes", "KV-cache bytes of all sessions", registry=r)
        self.evictions = Counter(
            "pema_sessions_evicted", "Sessions dropped by TTL or memory bound", registry=r
        )
        self.engine_tokens = Gauge(
            "pema_engine_session_tokens",
            "Tokens of session openings and steps that the engine read from its prefix cache "
            "(cached) or computed (the vllm backend)",
            ["source"],
            registry=r,
        )

    def watch(self, backend: Any) -> None:
        """Export the engine's prefix-cache counts, where it keeps them (the vllm backend)."""
        if hasattr(backend, "cached_tokens"):
            self.engine_tokens.labels("cached").set_function(lambda: backend.cached_tokens)
            self.engine_tokens.labels("computed").set_function(lambda: backend.computed_tokens)

    def install(self, app: FastAPI) -> None:
        """Count and time every request by its route template (not its raw path)."""
        app.add_middleware(RouteMetrics, requests=self.requests, latency=self.latency)
