"""The engine deployment: one replica = one engine (a model, its tokenizer, its resident adapters).

The two engines answer in different styles (see `protocol`), and `serve.engine` decides which
this deployment drives:

- transformers (`BatchEngine`): requests go through `serve.batch`, so requests that arrive
  together, whatever adapter they name and whether they stream or not, become one `generate`
  call. Engine calls run in a thread so the replica's event loop keeps answering Serve's health
  checks and filling the next batch meanwhile.
- vLLM (`RequestEngine`): each request goes straight to the engine's coroutines. vLLM batches
  continuously inside, across requests that arrive at any time; gathering them here first would
  only add the batch wait and hold every request of a batch until its slowest one is answered.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import replace

import ray
from ray import serve

from rayft.serving.protocol import Delta, GenRequest, GenResult


def engine_class(kind: str) -> type:
    """The engine class of `serve.engine` (importing it does not import vLLM itself)."""
    if kind == "vllm":
        from rayft.serving.vllm_engine import VllmEngine

        return VllmEngine
    from rayft.serving.hf_engine import TransformersEngine

    return TransformersEngine


@serve.deployment
class EngineServer:
    def __init__(
        self,
        kind: str,
        model_path: str,
        max_loaded_adapters: int,
        max_lora_rank: int,
        max_batch_size: int,
        batch_wait_s: float,
        threads: int,
        gpus: float = 0,
        dora: str = "native",
    ):
        import torch

        # Replicas share the machine's cores with each other: oversubscribed BLAS threads thrash.
        torch.set_num_threads(max(1, threads))
        self.per_request = kind == "vllm"  # a RequestEngine; otherwise a BatchEngine
        if self.per_request:
            self.engine = engine_class(kind).start(
                model_path,
                max_loras=max_loaded_adapters,
                max_lora_rank=max_lora_rank,
                tensor_parallel_size=max(1, int(gpus)),  # a replica's GPUs shard the model
            )
        else:
            self.engine = engine_class(kind)(
                model_path, max_loaded_adapters, max_lora_rank, dora=dora
            )
            self.generate_batch.set_max_batch_size(max_batch_size)
            self.generate_batch.set_batch_wait_timeout_s(batch_wait_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both set in __init__
    async def generate_batch(self, requests: list[GenRequest]):
        """BatchEngine only. Streaming and plain requests share batches. A batch without streams
        is one plain `generate`; with streams, each request gets its entries as they come (see
        `stream_batch`) and plain ones wait for their last."""
        if not any(r.stream for r in requests):
            yield await asyncio.to_thread(self.engine.generate, requests)
            return
        steps = self.engine.stream_batch(requests)
        done = object()
        while (out := await asyncio.to_thread(next, steps, done)) is not done:
            yield [StopIteration if x is None else x for x in out]  # None: that one is over

    async def generate(self, request: GenRequest) -> GenResult:
        if self.per_request:
            return await self.engine.generate(request)
        result = None
        async for item in self.generate_batch(replace(request, stream=False)):
            result = item  # the last entry: its GenResult (the others are empty Deltas)
        if isinstance(result, Exception):  # this request alone failed (see engine.generate)
            raise result
        return result

    async def stream(self, request: GenRequest) -> AsyncIterator[Delta | GenResult]:
        if self.per_request:
            async for piece in self.engine.stream(request):
                yield piece
            return
        async for piece in self.generate_batch(replace(request, stream=True)):
            if isinstance(piece, Exception):
                raise piece
            if not isinstance(piece, Delta) or piece.text or piece.logprobs:
                yield piece  # (empty Deltas while others in the batch produce text)

    async def check_health(self) -> None:
        """Serve calls this every health_check_period_s and replaces the replica when it raises.
        A BatchEngine runs in this process (the replica's own liveness is its health); vLLM runs
        its engine in processes of its own, which can die under a live replica."""
        if self.per_request:
            await self.engine.check_health()

    def loaded_adapters(self) -> list[str]:
        return self.engine.loaded_adapters()

    def actor_name(self) -> str:
        """This replica's Ray actor name (tests kill replicas by it)."""
        return ray.get_runtime_context().get_actor_name()

    def pid(self) -> int:
        return os.getpid()
