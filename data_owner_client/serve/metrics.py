"""Prometheus metrics of ``pema-client serve`` (``GET /metrics``): requests, latency, generated
tokens and time to first token per model, and each engine's load."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from shared.observe import RouteMetrics

if TYPE_CHECKING:
    from data_owner_client.serve.engine import Engine
    from data_owner_client.serve.models import ServedAdapter

SECONDS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)


class ServeMetrics:
    def __init__(self, models: Sequence[ServedAdapter]) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "pema_serve_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.latency = Histogram(
            "pema_serve_request_seconds", "HTTP request latency (a stream's: to its end)",
            ["route"], buckets=SECONDS, registry=r,
        )  # fmt: skip
        self.tokens = Counter(
            "pema_serve_generated_tokens", "New tokens of answered requests", ["model"], registry=r
        )
        self.first_token = Histogram(
            "pema_serve_time_to_first_token_seconds",
            "From a streamed request's arrival to its first token",
            ["model"], buckets=SECONDS, registry=r,
        )  # fmt: skip
        waiting = Gauge(
            "pema_serve_waiting_requests", "Requests waiting for a session", ["model"], registry=r
        )
        rows = Gauge("pema_serve_decoding_rows", "Rows being decoded", ["model"], registry=r)
        for model in models:
            waiting.labels(model.id).set_function(_load(model.engine, 0))
            rows.labels(model.id).set_function(_load(model.engine, 1))

    def install(self, app: FastAPI) -> None:
        app.add_middleware(RouteMetrics, requests=self.requests, latency=self.latency)


def _load(engine: Engine, which: int) -> Callable[[], float]:
    """A gauge's reading of the engine's load: 0 waiting requests, 1 decoding rows."""
    return lambda: engine.load[which]
