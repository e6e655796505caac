"""The dtype rule, once: bf16 where a GPU computes, fp32 on CPU, unless the config names one.

Training, merge, evaluation and serving all compute with it, so an adapter is evaluated, merged
and served in the dtype it was trained in. Dtypes travel between stages as names ("bfloat16"),
the form run.json records; torch is imported only where a torch dtype is needed, so the serving
ingress can use the rule without loading torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

NAMES = ("bfloat16", "float16", "float32", "uint8")
_PRECISION = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def default_dtype(use_gpu: bool) -> str:
    """bfloat16 on GPU (tensor cores, and fp32's range), float32 on CPU (CPUs have no fast bf16
    matmuls in general, and the CPU twins compare outputs to fp32 tolerances)."""
    return "bfloat16" if use_gpu else "float32"


def precision_dtype(precision: str, use_gpu: bool) -> str:
    """`training.precision` (auto | bf16 | fp16 | fp32) as a dtype name."""
    return default_dtype(use_gpu) if precision == "auto" else _PRECISION[precision]


def torch_dtype(name: str) -> torch.dtype:
    import torch

    if name not in NAMES:
        raise ValueError(f"dtype {name!r}: rayft knows {', '.join(NAMES)}")
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
