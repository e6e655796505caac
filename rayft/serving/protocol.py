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
    top_k: int = 0  # 0: off
    min_p: float = 0.0
    # OpenAI's penalties count the answer's own tokens (presence: once a token has appeared;
    # frequency: per appearance), vLLM's repetition_penalty (1 = off) the prompt's too.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # Log-probabilities: None asks for none; k >= 0 asks for each chosen token's and the k most
    # likely alternatives'. They are the model's own (log-softmax of its logits, before
    # temperature, penalties, bias or grammar), as vLLM reports them.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)
    # Constrained decoding (`grammar`): {"type": "json_object"} or
    # {"type": "json_schema", "schema": {...}}. The answer is a complete match, or finishes
    # with "length".
    grammar: dict | None = None
    # False when tools are offered: a family's call markers may be special tokens (Qwen's
    # <tool_call>), and the parser must see them, as vLLM's tool parsers do.
    skip_special_tokens: bool = True


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)  # the k most likely, best first


@dataclass
class GenResult:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length"
    # One per generated token, when asked, as vLLM reports them: the end token and the tokens
    # of a stop string included (the text leaves them out); completion_tokens counts them too.
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # one per prompt token; first None
    cached_tokens: int | None = None  # prompt tokens served from a prefix cache, where known


@dataclass
class Delta:
    """A streamed piece: new text (maybe '') and the log-probabilities of the tokens produced
    since the last piece (when asked). Text and tokens need not line up: the text of a token
    that could still become part of a stop string is held back, its log-probability is not."""

    text: str
    logprobs: list[TokenLogprob] = field(default_factory=list)


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
    ) -> Iterator[list[Delta | GenResult | ServeError | None]]:
        """`generate` for a batch in which some requests stream: each yield has one entry per
        request: Deltas (for streaming requests; an empty one otherwise), then its GenResult or
        ServeError once, then None."""
        ...


class RequestEngine(Engine, Protocol):
    """The vLLM engine: a coroutine per request, on the deployment's event loop. A request that
    fails raises its ServeError (AdapterRefused, BadRequest, EngineFailed) to its caller only."""

    async def generate(self, request: GenRequest) -> GenResult: ...

    def stream(self, request: GenRequest) -> AsyncIterator[Delta | GenResult]:
        """Deltas as they are produced, then the GenResult."""
        ...

    async def check_health(self) -> None:
        """Raise when the engine cannot answer any more (the replica must be replaced)."""
        ...
