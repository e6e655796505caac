"""Prometheus metrics of the ingress, served at /metrics (one registry per ingress replica)."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rayft_requests",
            "Requests answered, by arm and HTTP status.",
            ["arm", "status", "shadow"],
            registry=self.registry,
        )
        self.errors = Counter(
            "rayft_errors", "Requests answered with status >= 500.", ["arm"], registry=self.registry
        )
        self.latency = Histogram(
            "rayft_request_latency_seconds", "End-to-end latency.", ["arm"], registry=self.registry
        )
        self.tokens = Counter(
            "rayft_tokens", "Tokens processed.", ["arm", "kind"], registry=self.registry
        )

    def observe(
        self, arm: str, status: int, latency: float, prompt: int, completion: int, shadow: bool
    ) -> None:
        self.requests.labels(arm, str(status), str(shadow).lower()).inc()
        if status >= 500:
            self.errors.labels(arm).inc()
        if not shadow:
            self.latency.labels(arm).observe(latency)
        self.tokens.labels(arm, "prompt").inc(prompt)
        self.tokens.labels(arm, "completion").inc(completion)

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
