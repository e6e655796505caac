"""The vLLM engine (GPU only): base + LoRA adapters through vLLM's multi-LoRA batching.

Imported only when `serve.engine: vllm`; vLLM is an optional extra (`pip install rayft[vllm]`)
and cannot run on the CPU test machines, so this module stays a thin translation of the
engine interface onto `vllm.LLM` / `LoRARequest`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from rayft.errors import RayftError
from rayft.serving.protocol import AdapterRef, GenRequest, GenResult


class VllmMissing(RayftError):
    pass


def _import_vllm():
    try:
        import vllm
    except ImportError as e:
        raise VllmMissing(
            f"serve.engine is 'vllm' but vLLM cannot be imported ({e}). Install it on the GPU "
            "nodes with `pip install rayft[vllm]`, or set serve.engine: transformers (CPU and GPU)."
        ) from None
    return vllm


class VllmEngine:
    def __init__(
        self,
        model_path: str,
        max_loras: int = 16,
        max_lora_rank: int = 64,
        tensor_parallel_size: int = 1,
    ):
        vllm = _import_vllm()
        self._vllm = vllm
        self.llm = vllm.LLM(
            model=model_path,
            enable_lora=True,
            max_loras=max_loras,
            max_lora_rank=max_lora_rank,
            tensor_parallel_size=tensor_parallel_size,
        )
        self.adapter_kinds = self.serves()
        self._ids: dict[str, int] = {}  # adapter key -> vLLM's integer LoRA id
        self._lock = threading.Lock()

    def _lora(self, ref: AdapterRef | None):
        if ref is None:
            return None
        from vllm.lora.request import LoRARequest

        with self._lock:
            lora_id = self._ids.setdefault(ref.key, len(self._ids) + 1)
        return LoRARequest(ref.name, lora_id, ref.path)

    def _params(self, r: GenRequest):
        return self._vllm.SamplingParams(
            max_tokens=r.max_tokens,
            temperature=r.temperature,
            top_p=r.top_p,
            stop=r.stop or None,
            seed=r.seed,
        )

    def generate(self, requests: list[GenRequest]) -> list[GenResult]:
        outs = self.llm.generate(
            [{"prompt_token_ids": r.prompt_ids} for r in requests],
            [self._params(r) for r in requests],
            lora_request=[self._lora(r.adapter) for r in requests],
        )
        return [
            GenResult(
                o.outputs[0].text,
                len(r.prompt_ids),
                len(o.outputs[0].token_ids),
                "length" if o.outputs[0].finish_reason == "length" else "stop",
            )
            for r, o in zip(requests, outs, strict=True)
        ]

    def stream_batch(self, requests: list[GenRequest]) -> Iterator[list]:
        # The offline LLM class has no token stream; each answer comes in one piece.
        results = self.generate(requests)
        yield [res.text if r.stream else "" for r, res in zip(requests, results, strict=True)]
        yield results

    @staticmethod
    def serves(dora: str = "native") -> frozenset[str]:
        """Adapter kinds vLLM serves itself: its LoRA kernels have no DoRA magnitude vector, so
        DoRA adapters are merged and served as their own deployments whatever `serve.dora` says."""
        return frozenset({"lora"})

    def check_adapter(self, path: str) -> dict:
        return {"path": path}

    def loaded_adapters(self) -> list[str]:
        return list(self._ids)
