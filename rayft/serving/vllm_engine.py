"""The vLLM engine (GPU only): vLLM's async engine, one call per request.

vLLM batches continuously itself (a request joins the running batch at its next step and leaves
when done), so the deployment hands it each request as it arrives, with no `serve.batch`, and a
stream gets its text token by token. Imported only when `serve.engine: vllm`; vLLM is an
optional extra (`pip install rayft[vllm]`) that cannot run on the CPU test machines, so this
module only translates: rayft's requests and adapters into vLLM's (`SamplingParams`,
`LoRARequest`), vLLM's outputs and errors back into rayft's. tests/test_vllm_contract.py holds
these translations to the pinned vLLM's real classes and signatures.
"""

from __future__ import annotations

import asyncio
import itertools
import uuid
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator
from contextlib import aclosing
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

from rayft.adapters import base_linears, check_compatible
from rayft.errors import RayftError
from rayft.serving.errors import AdapterRefused, BadRequest, EngineFailed
from rayft.serving.protocol import (
    SEED_RANGE,
    AdapterRef,
    Delta,
    GenRequest,
    GenResult,
    TokenLogprob,
)

if TYPE_CHECKING:
    from vllm.logprobs import Logprob
    from vllm.lora.request import LoRARequest

# vLLM's finish reasons (vllm.v1.engine.FINISH_REASON_STRINGS) that end an answer. The others
# cut it short: `abort` and `error` (the engine gave up on it) and `repetition` (a detector
# rayft never turns on); their text is not an answer and is never passed off as one.
ANSWERED = ("stop", "length")

# vLLM's structured outputs backend (GenRequest.grammar): llguidance, the library the
# transformers engine constrains its answers with (rayft.serving.grammar), so both engines take
# the same schemas and allow the same answers. vLLM's default ("auto") picks xgrammar per
# request and falls back to llguidance or outlines for what xgrammar refuses.
GRAMMAR_BACKEND = "guidance"


class VllmMissing(RayftError):
    pass


def _import_vllm():
    """vLLM, or VllmMissing saying how to install it. A vLLM whose pinned torch is not the one
    installed counts as missing: its compiled kernels do not load on another torch (this is how
    the CPU test environment has it, for tests/test_vllm_contract.py)."""
    try:
        import torch
        import vllm
        from packaging.requirements import Requirement
    except ImportError as e:
        raise VllmMissing(
            f"serve.engine is 'vllm' but vLLM cannot be imported ({e}). Install it on the GPU "
            "nodes with `pip install rayft[vllm]`, or set serve.engine: transformers (CPU and GPU)."
        ) from None
    for req in map(Requirement, metadata.requires("vllm") or []):
        if req.name == "torch" and not req.specifier.contains(torch.__version__, prereleases=True):
            raise VllmMissing(
                f"serve.engine is 'vllm' but vLLM {vllm.__version__} needs {req} and this "
                f"environment has torch {torch.__version__}. Install it on the GPU nodes with "
                "`pip install rayft[vllm]` (it brings its own torch), or set serve.engine: "
                "transformers (CPU and GPU)."
            )
    return vllm


def engine_args(
    model_path: str, max_loras: int, max_lora_rank: int, tensor_parallel_size: int
) -> dict:
    """Keyword arguments of vLLM's AsyncEngineArgs."""
    from vllm.config import StructuredOutputsConfig

    return {
        "model": model_path,
        "enable_lora": True,
        "max_loras": max_loras,
        # The resident set below mirrors vLLM's adapter cache only while both hold the same
        # number: vLLM would otherwise drop adapters on its own, in flight or not.
        "max_cpu_loras": max_loras,
        "max_lora_rank": max_lora_rank,
        "tensor_parallel_size": tensor_parallel_size,
        "enable_log_requests": False,  # a line per request: the ingress logs requests itself
        "disable_log_stats": True,  # rayft's metrics count requests; vLLM's would duplicate them
        # The model's own log-probabilities (before temperature, penalties, bias and grammar),
        # as GenRequest.logprobs promises; vLLM's default today, named so a new default cannot
        # change them. Its max_logprobs (20) is left as it is: the API asks for 20 at most.
        "logprobs_mode": "raw_logprobs",
        # No whitespace between JSON tokens, as the transformers engine (rayft.serving.grammar
        # says why). vLLM takes this for xgrammar and guidance only, and per engine only.
        "structured_outputs_config": StructuredOutputsConfig(
            backend=GRAMMAR_BACKEND, disable_any_whitespace=True
        ),
    }


def sampling_args(r: GenRequest, stream: bool) -> dict:
    """Keyword arguments of vLLM's SamplingParams for request `r`."""
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    if r.seed is not None and not SEED_RANGE[0] <= r.seed <= SEED_RANGE[1]:
        raise BadRequest(f"seed={r.seed} does not fit in 64 bits, as vLLM needs", "seed")
    return {
        "max_tokens": r.max_tokens,
        "temperature": r.temperature,
        "top_p": r.top_p,
        "stop": r.stop,
        "seed": r.seed,
        "top_k": r.top_k,  # 0 is off for vLLM too
        "min_p": r.min_p,
        "presence_penalty": r.presence_penalty,
        "frequency_penalty": r.frequency_penalty,
        "repetition_penalty": r.repetition_penalty,
        "logit_bias": r.logit_bias,
        "logprobs": r.logprobs,
        "prompt_logprobs": r.prompt_logprobs,
        "skip_special_tokens": r.skip_special_tokens,  # False with tools: markers may be special
        "structured_outputs": None
        if r.grammar is None
        else StructuredOutputsParams(**grammar_args(r.grammar)),
        # DELTA: each output holds the text and tokens that are new since the last one;
        # FINAL_ONLY: one output at the end, with everything.
        "output_kind": RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY,
    }


def grammar_args(grammar: dict) -> dict:
    """Keyword arguments of vLLM's StructuredOutputsParams for GenRequest.grammar."""
    if grammar["type"] == "json_object":
        return {"json_object": True}
    if grammar["type"] == "json_schema":
        return {"json": grammar["schema"]}
    raise ValueError(f"GenRequest.grammar of unknown type {grammar['type']!r}")


def lora_args(ref: AdapterRef, lora_id: int) -> dict:
    """Keyword arguments of vLLM's LoRARequest for adapter `ref`, under integer id `lora_id`.

    Its name is the adapter's key, not its name: vLLM collects a batch's adapters in a set,
    which tells LoRARequests apart by name only, so two ids under one name (an adapter reloaded
    with new files while a request still uses the old ones) lose one id and the model step dies
    on a KeyError; its prefix cache is keyed on the name too, and would serve the old weights'
    cached prompts to the new ones. The key changes with the files, and each key has one id."""
    return {"lora_name": ref.key, "lora_int_id": lora_id, "lora_path": ref.path}


def finish_reason(reason: str | None) -> str:
    """rayft's finish_reason of a finished vLLM output, or EngineFailed for one cut short."""
    if reason in ANSWERED:
        return reason
    raise EngineFailed(f"vLLM ended the request without answering it (finish_reason={reason!r})")


def token_logprob(position: dict[int, Logprob], k: int) -> TokenLogprob:
    """rayft's TokenLogprob of one position of vLLM's logprobs, asked with k alternatives.

    vLLM's position is {token id: Logprob}: the chosen (or prompt) token first, then its k most
    likely, which hold ranks 1..k. The chosen token is one of those k exactly when its own rank
    is at most k (a rank counts the tokens at least as likely); it is then listed once, under its
    rank among them. Ranks, not the dict's order, give the alternatives' order."""
    token, chosen = next(iter(position.items()))
    top = sorted((lp.rank, t, lp.logprob) for t, lp in position.items() if lp.rank <= k)
    return TokenLogprob(token, chosen.logprob, [(t, lp) for _, t, lp in top])


class VllmEngine:
    def __init__(self, llm, max_loras: int, max_lora_rank: int, linears: dict):
        """`llm`: a vLLM AsyncLLM (see `start`); `linears`: the base's linear layers (name ->
        (in_features, out_features)), which adapters are checked against."""
        self.llm = llm
        self.adapter_kinds = self.serves()
        self.max_loras = max_loras
        self.max_rank = max_lora_rank
        self.linears = linears
        # Adapter key -> its LoRARequest for the engine's life (a few strings per adapter version
        # ever served): ids are never reused, so an id never names two sets of weights.
        self._loras: dict[str, LoRARequest] = {}
        self._ids = itertools.count(1)  # vLLM refuses id 0
        self._resident: OrderedDict[str, str] = OrderedDict()  # key -> name, least recent first
        self._busy: Counter[str] = Counter()  # key -> requests using it now
        self._slots = asyncio.Condition()  # loads and evictions, one at a time

    @classmethod
    def start(
        cls,
        model_path: str,
        max_loras: int = 16,
        max_lora_rank: int = 64,
        tensor_parallel_size: int = 1,
    ) -> VllmEngine:
        _import_vllm()
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = engine_args(model_path, max_loras, max_lora_rank, tensor_parallel_size)
        llm = AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
        return cls(llm, max_loras, max_lora_rank, base_linears(model_path))

    @staticmethod
    def serves(dora: str = "native") -> frozenset[str]:
        """Adapter kinds vLLM serves itself: its LoRA kernels have no DoRA magnitude vector, so
        DoRA adapters are merged and served as their own deployments whatever `serve.dora` says."""
        return frozenset({"lora"})

    def check_adapter(self, path: str) -> dict:
        """Rank (against max_lora_rank) and target modules (the base's linear layers, which are
        the layers vLLM puts LoRA on) from the adapter files' headers; vLLM's own checks run
        when `add_lora` loads it."""
        return check_compatible(Path(path), self.linears, self.max_rank)

    def loaded_adapters(self) -> list[str]:
        return list(self._resident.values())

    async def check_health(self) -> None:
        """Raise once vLLM's engine is dead (it does not come back: Serve replaces the replica)."""
        await self.llm.check_health()

    async def generate(self, r: GenRequest) -> GenResult:
        result = None
        async for item in self._answer(r, stream=False):  # one item: the GenResult
            result = item
        if result is None:
            raise EngineFailed("vLLM ended the request without a finished output", None)
        return result

    def stream(self, r: GenRequest) -> AsyncIterator[Delta | GenResult]:
        """Deltas as vLLM produces them, then the GenResult."""
        return self._answer(r, stream=True)

    async def _answer(self, r: GenRequest, stream: bool) -> AsyncIterator[Delta | GenResult]:
        from vllm import SamplingParams
        from vllm.exceptions import VLLMClientError, VLLMValidationError
        from vllm.inputs import TokensPrompt

        try:
            params = SamplingParams(**sampling_args(r, stream))
        except VLLMValidationError as e:
            raise BadRequest(f"{e}", e.parameter) from None
        lora = await self._acquire(r.adapter)
        text, tokens, logprobs, prompt_logprobs = [], 0, [], []
        try:
            prompt = TokensPrompt(prompt_token_ids=r.prompt_ids)
            # Closed with this generator: a client that leaves mid-stream aborts its request in
            # vLLM at once, rather than whenever the garbage collector gets to it.
            async with aclosing(
                self.llm.generate(prompt, params, uuid.uuid4().hex, lora_request=lora)
            ) as outputs:
                async for out in outputs:
                    # Each output holds what is new since the last one (DELTA), or everything
                    # (FINAL_ONLY, a single output), so appending gathers the whole answer.
                    piece = out.outputs[0]
                    tokens += len(piece.token_ids)
                    text.append(piece.text)
                    new = []
                    if r.logprobs is not None:
                        new = [token_logprob(p, r.logprobs) for p in piece.logprobs]
                        logprobs += new
                    # The prompt's come whole with one output (the first, or the only one).
                    if r.prompt_logprobs is not None and out.prompt_logprobs:
                        prompt_logprobs += [
                            None if p is None else token_logprob(p, r.prompt_logprobs)
                            for p in out.prompt_logprobs
                        ]
                    if stream and (piece.text or new):
                        yield Delta(piece.text, new)
                    if out.finished:
                        yield GenResult(
                            "".join(text),
                            len(r.prompt_ids),
                            tokens,
                            finish_reason(piece.finish_reason),
                            logprobs=None if r.logprobs is None else logprobs,
                            prompt_logprobs=None if r.prompt_logprobs is None else prompt_logprobs,
                            cached_tokens=out.num_cached_tokens,  # vLLM's prefix cache
                        )
        except VLLMClientError as e:  # the request's fault, e.g. longer than the model's context
            param = e.parameter if isinstance(e, VLLMValidationError) else None
            raise BadRequest(f"{e}", param) from None
        finally:
            await self._release(r.adapter)

    # ------------------------------------------------------------------ adapters

    async def _acquire(self, ref: AdapterRef | None) -> LoRARequest | None:
        """The LoRARequest of `ref`, loaded into vLLM and held until `_release`."""
        if ref is None:
            return None
        if ref.key not in self._loras:
            self.check_adapter(ref.path)
            from vllm.lora.request import LoRARequest

            self._loras[ref.key] = LoRARequest(**lora_args(ref, next(self._ids)))
        lora = self._loras[ref.key]
        # Without the lock: requests for resident adapters never wait for another one's load.
        if ref.key in self._resident:
            self._resident.move_to_end(ref.key)
            self._busy[ref.key] += 1
            return lora
        async with self._slots:
            # Room comes from adapters no request uses; when every slot is in use, wait for one:
            # vLLM could not batch one more adapter than it holds either.
            await self._slots.wait_for(
                lambda: (
                    ref.key in self._resident
                    or len(self._resident) < self.max_loras
                    or any(not self._busy[k] for k in self._resident)
                )
            )
            if ref.key not in self._resident:
                if len(self._resident) >= self.max_loras:
                    idle = next(k for k in self._resident if not self._busy[k])
                    del self._resident[idle]  # first: the lock-free path above must not take it
                    await self.llm.remove_lora(self._loras[idle].lora_int_id)
                await self._load(ref, lora)
            self._resident.move_to_end(ref.key)
            self._busy[ref.key] += 1
        return lora

    async def _load(self, ref: AdapterRef, lora: LoRARequest) -> None:
        # Loaded here, not by the first request's model step: a failure there kills the engine
        # (and every request in the batch), here it refuses this adapter's requests only.
        try:
            await self.llm.add_lora(lora)
        except Exception as e:
            if self.llm.errored:
                raise
            raise AdapterRefused(
                f"adapter {ref.name!r} ({ref.path}) could not be loaded by vLLM: {e}", "model"
            ) from None
        self._resident[ref.key] = ref.name

    async def _release(self, ref: AdapterRef | None) -> None:
        if ref is None:
            return
        self._busy[ref.key] -= 1
        async with self._slots:
            self._slots.notify_all()
