"""The model a worker trains: the base (optionally 4-bit) and the PEFT adapter config.

Runs inside the worker, after the TrainingArguments exist: under ZeRO-3 transformers reads the
DeepSpeed config they register and builds the model already partitioned.
"""

from __future__ import annotations

from typing import Any

import torch

from rayft.dtypes import torch_dtype


def quantization_config(quant: dict[str, Any]):
    """bitsandbytes' 4-bit config for a `quantization` fact (rayft.training.facts)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant["quant_type"],
        bnb_4bit_use_double_quant=quant["double_quant"],
        bnb_4bit_compute_dtype=torch_dtype(quant["compute_dtype"]),
        bnb_4bit_quant_storage=torch_dtype(quant["storage_dtype"]),
    )


def load_base(
    path: str,
    facts: dict[str, Any],
    use_gpu: bool,
    revision: str | None = None,
    trust_remote_code: bool = False,
    head: str = "causal",
):
    """Load the base as `facts` say; 4-bit nf4/fp4 via bitsandbytes for qlora. `head`: the
    causal LM head, or `score` (one scalar per sequence: a reward model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {
        "dtype": torch_dtype(facts["compute_dtype"]),
        "revision": revision,
        "trust_remote_code": trust_remote_code,
    }
    quant = facts["quantization"]
    if quant is not None:
        kwargs["quantization_config"] = quantization_config(quant)
        kwargs["dtype"] = torch_dtype(quant["loaded_dtype"])
        if facts["deepspeed"]["zero_stage"] != 3:
            kwargs["device_map"] = {"": torch.cuda.current_device() if use_gpu else "cpu"}
    if head == "score":
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    model.config.use_cache = False
    return model


def adapter_config(method: str, lora: dict[str, Any], task_type: str = "CAUSAL_LM"):
    """PEFT LoraConfig for lora/qlora/dora; None for full fine-tuning. A SEQ_CLS adapter (a
    reward model) also trains and saves the new score head (PEFT's modules_to_save)."""
    if method == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=lora["r"],
        lora_alpha=lora["alpha"],
        lora_dropout=lora["dropout"],
        target_modules=lora["target_modules"],
        use_dora=method == "dora",
        task_type=task_type,
    )
