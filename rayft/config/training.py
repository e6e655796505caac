"""`training`: the method, optimizer, adapter, 4-bit base, DeepSpeed and trackers."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from rayft.config.section import Section


class LoraConfig(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: a list of names or `all-linear`."
    )


class QuantConfig(Section):
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="bitsandbytes 4-bit type.")
    double_quant: bool = Field(True, description="Quantize the quantization constants too.")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Compute dtype of 4-bit layers; auto: bf16 on GPU, fp32 on CPU."
    )
    quant_storage: Literal["auto", "uint8", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Storage dtype of packed 4-bit weights; auto picks what ZeRO-3 needs "
        "(bfloat16) and uint8 otherwise.",
    )


class DeepSpeedConfig(Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0 = plain DDP).")
    offload_optimizer: bool = Field(False, description="Offload optimizer states to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    raw_config: str | dict[str, Any] | None = Field(
        None,
        description="Expert escape hatch: a DeepSpeed JSON config (path or mapping) used as is.",
    )


class TrackingConfig(Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers to report to."
    )
    project: str | None = Field(None, description="Project / experiment name for the trackers.")


class TrainingConfig(Section):
    method: Literal["full", "lora", "qlora", "dora"] = Field(
        "lora", description="Fine-tuning method."
    )
    objective: Literal["auto", "sft", "dpo"] = Field(
        "auto", description="Training objective; auto: dpo for preference data, else sft."
    )
    max_steps: int = Field(100, ge=1, description="Optimizer steps in total.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "cosine", description="Learning-rate schedule."
    )
    warmup_ratio: float = Field(0.03, ge=0, lt=1, description="Fraction of steps for warmup.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    per_device_batch_size: int = Field(1, ge=1, description="Sequences per worker per micro-step.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations to save memory.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping norm.")
    precision: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="Mixed precision; auto: bf16 on GPU, fp32 on CPU."
    )
    seed: int = Field(42, description="Seed for weights init of adapters, dropout and data order.")
    logging_steps: int = Field(1, ge=1, description="Log metrics every N steps.")
    eval_steps: int | None = Field(
        None, ge=1, description="Evaluate every N steps (None: at the end)."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (None: at the end)."
    )
    keep_checkpoints: int = Field(
        2,
        ge=1,
        description="Keep the N best checkpoints by eval loss (with a validation split; else the N latest), plus the latest, which restores and --resume continue from.",
    )
    shard_cache_mb: int = Field(
        512,
        ge=0,
        description="Keep each worker's training shard in memory after the first epoch, and its "
        "validation rows after the first evaluation, when each fits in this many MiB (later "
        "passes then skip a Ray Data re-read); 0 streams every pass.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA / DoRA / QLoRA adapter.")
    quantization: QuantConfig = Field(default_factory=QuantConfig, description="QLoRA 4-bit base.")
    deepspeed: DeepSpeedConfig = Field(
        default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO."
    )
    dpo_beta: float = Field(0.1, gt=0, description="DPO temperature beta.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Trackers.")
