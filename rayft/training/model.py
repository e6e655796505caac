"""The model a worker trains: the base (optionally 4-bit) and the PEFT adapter config.

Runs inside the worker, after the TrainingArguments exist: under ZeRO-3 transformers reads the
DeepSpeed config they register and builds the model already partitioned.
"""

from __future__ import annotations

from typing import Any

import torch

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def compute_dtype(precision: str, use_gpu: bool) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless the config says otherwise."""
    if precision == "auto":
        return torch.bfloat16 if use_gpu else torch.float32
    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[precision]


def quant_storage_dtype(quant_storage: str, zero_stage: int) -> torch.dtype | str:
    """auto: bfloat16 under ZeRO-3 (it shards by dtype and cannot handle packed uint8)."""
    if quant_storage == "auto":
        return torch.bfloat16 if zero_stage == 3 else torch.uint8
    return torch.uint8 if quant_storage == "uint8" else _DTYPES[quant_storage]


def load_base(
    path: str,
    method: str,
    dtype: torch.dtype,
    quant: dict[str, Any],
    zero_stage: int,
    use_gpu: bool,
    revision: str | None = None,
    trust_remote_code: bool = False,
):
    """Load the base causal LM; 4-bit nf4/fp4 via bitsandbytes for qlora."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
    if method == "qlora":
        qdtype = dtype if quant["compute_dtype"] == "auto" else _DTYPES[quant["compute_dtype"]]
        storage = quant_storage_dtype(quant["quant_storage"], zero_stage)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=quant["quant_type"],
            bnb_4bit_use_double_quant=quant["double_quant"],
            bnb_4bit_compute_dtype=qdtype,
            bnb_4bit_quant_storage=storage,
        )
        if isinstance(storage, torch.dtype) and storage != torch.uint8:
            # Non-quantized weights must share the storage dtype, or ZeRO-3 mixes dtypes.
            kwargs["dtype"] = storage
        if zero_stage != 3:
            kwargs["device_map"] = {"": torch.cuda.current_device() if use_gpu else "cpu"}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def adapter_config(method: str, lora: dict[str, Any]):
    """PEFT LoraConfig for lora/qlora/dora; None for full fine-tuning."""
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        use_dora=method == "dora",
        task_type="CAUSAL_LM",
    )
