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


class EarlyStoppingConfig(Section):
    patience: int = Field(
        3, ge=1, description="Evaluations in a row without improvement before the run stops."
    )
    min_delta: float = Field(
        0.0, ge=0, description="Smallest change of the metric that counts as an improvement."
    )
    metric: Literal["auto", "eval_loss", "eval_reward"] = Field(
        "auto",
        description="What must improve: auto is the held-out grader score (eval_reward, higher "
        "is better) for grpo and the validation loss (lower is better) for every other objective.",
    )


class GrpoConfig(Section):
    algorithm: Literal["grpo", "rloo"] = Field(
        "grpo",
        description="grpo: group-normalised advantages (TRL GRPOTrainer); rloo: leave-one-out "
        "baseline (TRL RLOOTrainer), same settings.",
    )
    num_generations: int = Field(
        4,
        ge=2,
        description="Completions sampled per prompt; workers x per_device_batch_size x "
        "gradient_accumulation_steps must be a multiple of it.",
    )
    max_completion_length: int = Field(64, ge=1, description="Longest completion, in tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the rollouts.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling of the rollouts.")
    beta: float = Field(
        0.0,
        ge=0,
        description="KL coefficient against the starting model; 0 loads no reference model "
        "(with an adapter the reference is the base with the adapter switched off).",
    )
    loss_type: Literal["grpo", "dr_grpo", "dapo", "bnpo"] = Field(
        "dapo", description="How token losses are aggregated (TRL's loss_type)."
    )
    scale_rewards: Literal["group", "batch", "none"] = Field(
        "group", description="Divide advantages by the reward std of the group, the batch, or not."
    )
    use_vllm: bool = Field(
        False,
        description="GPU only: generate the rollouts with vLLM colocated in each worker "
        "(TRL vllm_mode=colocate); off: the training model generates.",
    )
    base_url: str | None = Field(
        None,
        description="OpenAI-compatible endpoint (e.g. a `rayft serve` URL) for score_model and "
        "label_model graders.",
    )
    api_key_env: str | None = Field(
        None, description="Environment variable holding that endpoint's API key (never the key)."
    )


class KtoConfig(Section):
    beta: float = Field(0.1, gt=0, description="KTO temperature beta.")
    desirable_weight: float = Field(
        1.0, gt=0, description="Loss weight of good (label true) examples."
    )
    undesirable_weight: float = Field(
        1.0,
        gt=0,
        description="Loss weight of bad examples; TRL advises keeping "
        "desirable_weight x good / (undesirable_weight x bad) between 1 and 4/3.",
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
    objective: Literal["auto", "sft", "dpo", "grpo", "kto", "reward"] = Field(
        "auto",
        description="Training objective; auto: dpo for preference data, grpo for prompt-only "
        "data, kto for unpaired good/bad data, else sft. reward trains a reward model "
        "(sequence-classification head) on preference data.",
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
    grader: dict[str, Any] | None = Field(
        None,
        description="grpo: the reward, as an OpenAI grader object (string_check, "
        "text_similarity, score_model, label_model, multi) or rayft's json_keys, regex and "
        "python graders; docs/graders.md.",
    )
    grpo: GrpoConfig = Field(default_factory=GrpoConfig, description="GRPO / RLOO rollouts.")
    kto: KtoConfig = Field(default_factory=KtoConfig, description="KTO weights.")
    early_stopping: EarlyStoppingConfig | None = Field(
        None,
        description="Stop when the held-out metric stops improving; the best checkpoint "
        "becomes the adapter. Needs a validation split.",
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Trackers.")
