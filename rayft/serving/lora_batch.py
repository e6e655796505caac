"""Mixed-adapter LoRA as two batched matmuls per layer (the Punica / S-LoRA idea).

PEFT's `adapter_names=` path loops over the adapters of a batch inside every LoRA layer at every
decoding step: with 8 adapters that is 8 sub-batch gathers and matmul pairs per layer per token,
and the Python overhead of that loop can cost more than the base model. Here each adapter's
A^T and (scaled) B^T are prepared once when it is loaded; per `generate` call they are stacked
per batch row (ranks zero-padded to the largest, base rows all zero), PEFT's own LoRA path is
switched off, and a forward hook adds `bmm(bmm(x, A), B)` to the base output: two matmuls per
layer whatever the number of adapters.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from functools import partial

import torch
import torch.nn.functional as F
from peft.tuners.lora.layer import Linear as LoraLinear


class LoraStacks:
    """Per-adapter, per-layer LoRA weights laid out for stacking."""

    def __init__(self):
        self._weights: dict[str, dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]]] = {}

    def add(self, peft_model: torch.nn.Module, key: str) -> bool:
        """Prepare adapter `key`; False when some layer of it is not a plain Linear LoRA (DoRA,
        LoRA bias, embeddings), which then takes PEFT's own path."""
        entries = {}
        for layer in peft_model.modules():
            if not hasattr(layer, "lora_A") or key not in layer.lora_A:
                continue
            if not isinstance(layer, LoraLinear) or layer.use_dora.get(key):
                return False
            if layer.lora_B[key].bias is not None:
                return False
            a, b = layer.lora_A[key].weight, layer.lora_B[key].weight
            entries[layer] = (a.T.contiguous(), (b.T * layer.scaling[key]).contiguous())
        self._weights[key] = entries
        return True

    def drop(self, key: str) -> None:
        self._weights.pop(key, None)

    def covers(self, keys: set[str]) -> bool:
        return all(k in self._weights for k in keys)

    @contextlib.contextmanager
    def apply(self, peft_model, rows: list[str | None]) -> Iterator[None]:
        """Run `peft_model` with row i using adapter `rows[i]` (None: the base)."""
        layers: dict[torch.nn.Module, None] = {}
        for key in dict.fromkeys(k for k in rows if k is not None):
            layers.update(dict.fromkeys(self._weights[key]))
        hooks = []
        try:
            for layer in layers:
                per_row = [self._weights[k].get(layer) if k is not None else None for k in rows]
                rank = max(w[0].shape[1] for w in per_row if w is not None)
                ref = next(w for w in per_row if w is not None)[0]
                zero_a = ref.new_zeros(layer.in_features, rank)
                zero_b = ref.new_zeros(rank, layer.out_features)
                a = torch.stack([zero_a if w is None else _pad_cols(w[0], rank) for w in per_row])
                b = torch.stack([zero_b if w is None else _pad_rows(w[1], rank) for w in per_row])
                hooks.append(layer.register_forward_hook(partial(_add_delta, a=a, b=b)))
            with peft_model.disable_adapter():
                yield
        finally:
            for h in hooks:
                h.remove()


def _pad_cols(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[1] == n else F.pad(t, (0, n - t.shape[1]))


def _pad_rows(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[0] == n else F.pad(t, (0, 0, 0, n - t.shape[0]))


def _add_delta(module, args, output, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # Two kernel calls per layer (bmm, then baddbmm fusing the add): at decode time the cost of
    # this hook is dispatch overhead, not arithmetic, so every extra op shows in the ratio.
    x = args[0]
    if x.dim() == 2:  # one position per row
        return torch.baddbmm(output.unsqueeze(1), torch.bmm(x.unsqueeze(1), a), b).squeeze(1)
    return torch.baddbmm(output, torch.bmm(x, a), b)
