"""The engine interface: what the Serve deployments need from a model runtime.

A Protocol, not a base class: `hf_engine.TransformersEngine` (CPU and GPU) and
`vllm_engine.VllmEngine` (GPU) share no code, only these signatures.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from rayft.serving.errors import ServeError


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as engines see it: `key` changes whenever the files behind `name` change, so a
    replica never keeps serving stale weights under a reused name."""

    name: str
    path: str
    key: str


@dataclass
class GenRequest:
    prompt_ids: list[int]
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    adapter: AdapterRef | None = None
    seed: int | None = None
    stream: bool = False  # set by the engine deployment: wants its text as it is produced


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"


class Engine(Protocol):
    adapter_kinds: frozenset[str]  # "lora", "dora": what it serves; the rest is merged first

    @staticmethod
    def serves(dora: str = "native") -> frozenset[str]:
        """The adapter kinds an engine built with this `serve.dora` serves itself (known before
        any replica starts, so config adapters can be merged while the app is built)."""
        ...

    def generate(self, requests: list[GenRequest]) -> list[GenResult | ServeError]:
        """Answer a batch; requests may name different adapters. An entry is a ServeError when
        that request alone failed (its adapter could not be loaded)."""
        ...

    def stream_batch(
        self, requests: list[GenRequest]
    ) -> Iterator[list[str | GenResult | ServeError | None]]:
        """`generate` for a batch in which some requests stream: each yield has one entry per
        request: text pieces (for streaming requests; '' otherwise), then its GenResult or
        ServeError once, then None."""
        ...

    def check_adapter(self, path: str) -> dict:
        """Raise AdapterRefused unless the adapter at `path` fits this base; return its summary."""
        ...

    def loaded_adapters(self) -> list[str]: ...
