"""The engine interface: what the Serve deployments need from a model runtime.

Protocols, not base classes: `hf_engine.TransformersEngine` (CPU and GPU) and
`vllm_engine.VllmEngine` (GPU) share no code, only these signatures. They answer in two styles,
and `serve.engine` decides which one a deployment drives: the transformers engine is a
`BatchEngine` (blocking calls on whole batches, which the deployment gathers with `serve.batch`
and runs in a thread), vLLM is a `RequestEngine` (a coroutine per request: it batches
continuously inside, so the deployment hands it each request as it comes).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from rayft.adapters import AdapterRef
from rayft.serving.errors import ServeError

# The seeds engines take: 64-bit integers (vLLM sends them to its engine process as msgpack
# int64; torch.manual_seed refuses larger ones). The API refuses others (openai_api).
SEED_RANGE = (-(2**63), 2**63 - 1)


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
    """What both styles have."""

    adapter_kinds: frozenset[str]  # "lora", "dora": what it serves; the rest is merged first

    @staticmethod
    def serves(dora: str = "native") -> frozenset[str]:
        """The adapter kinds an engine built with this `serve.dora` serves itself (known before
        any replica starts, so config adapters can be merged while the app is built)."""
        ...

    def check_adapter(self, path: str) -> dict:
        """Raise AdapterError unless the adapter at `path` fits this base; return its summary."""
        ...

    def loaded_adapters(self) -> list[str]:
        """Names of the adapters resident now (at most `serve.max_loaded_adapters`)."""
        ...


class BatchEngine(Engine, Protocol):
    """The transformers engine: blocking, a batch per call."""

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


class RequestEngine(Engine, Protocol):
    """The vLLM engine: a coroutine per request, on the deployment's event loop. A request that
    fails raises its ServeError (AdapterRefused, BadRequest, EngineFailed) to its caller only."""

    async def generate(self, request: GenRequest) -> GenResult: ...

    def stream(self, request: GenRequest) -> AsyncIterator[str | GenResult]:
        """Text pieces as they are produced, then the GenResult."""
        ...

    async def check_health(self) -> None:
        """Raise when the engine cannot answer any more (the replica must be replaced)."""
        ...
