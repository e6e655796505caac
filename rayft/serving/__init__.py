"""Serving on Ray Serve: an OpenAI-compatible API for the base, merged models and adapters,
with A/B experiments. `serve(cfg)` blocks; `start(cfg)` returns once the app answers."""

from rayft.serving.ab import ab_report
from rayft.serving.app import build_app, serve, start, stop

__all__ = ["ab_report", "build_app", "serve", "start", "stop"]
