"""The job file: one YAML document validated by pydantic.

Every field carries its help text (`Field(description=...)`); `rayft config show` prints it and
errors quote it. Unknown keys are errors with a did-you-mean, because a misspelt key that is
silently ignored is the most expensive bug a fine-tuning config can have.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rayft.errors import RayftError


class ConfigError(RayftError):
    """A job file that cannot be used; the message says where and what to do."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# --------------------------------------------------------------------------- model


class ModelConfig(_Section):
    base: str = Field(
        "smollm2-135m-instruct",
        description="Base model: a registry name (`rayft models list`), a local HF model "
        "directory, or a hub id (needs internet and, for remote code, a pinned revision).",
    )
    revision: str | None = Field(
        None, description="Hub revision (commit sha or tag) of the base model."
    )
    trust_remote_code: bool = Field(
        False,
        description="Allow the model's own Python code. Refused unless `revision` pins it.",
    )

    @model_validator(mode="after")
    def _remote_code_needs_revision(self) -> ModelConfig:
        if self.trust_remote_code and not self.revision:
            raise ValueError(
                "model.trust_remote_code needs model.revision pinned to a commit: remote code "
                "from a moving branch can change under you"
            )
        return self


# --------------------------------------------------------------------------- data


class SplitConfig(_Section):
    validation: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for validation.")
    test: float = Field(0.1, ge=0, lt=1, description="Fraction of rows for the test split.")
    seed: int = Field(0, description="Salt of the content hash that assigns rows to splits.")

    @model_validator(mode="after")
    def _fractions(self) -> SplitConfig:
        if self.validation + self.test >= 1:
            raise ValueError("data.split.validation + data.split.test must be below 1")
        return self


class DedupeConfig(_Section):
    exact: bool = Field(
        True,
        description="Drop rows whose content (whitespace collapsed, case and punctuation kept) "
        "repeats exactly.",
    )
    near: bool = Field(
        True,
        description="Drop near-duplicates (MinHash/LSH over word shingles of the non-system turns).",
    )
    near_threshold: float = Field(
        0.85,
        gt=0,
        le=1,
        description="Estimated Jaccard similarity above which rows are duplicates.",
    )
    num_perm: int = Field(128, ge=16, description="MinHash permutations.")
    shingle_size: int = Field(5, ge=1, description="Words per shingle for near-dedupe.")


class PIIConfig(_Section):
    enabled: bool = Field(True, description="Replace PII with typed placeholders such as <EMAIL>.")
    types: list[Literal["email", "phone", "credit_card", "ip_address", "iban"]] = Field(
        default_factory=lambda: ["email", "phone", "credit_card", "ip_address", "iban"],
        description="Which kinds of PII to scrub.",
    )


class DataConfig(_Section):
    train_files: list[str] = Field(
        default_factory=list,
        description="Input files or globs (JSONL, JSON, Parquet), local or s3://.",
    )
    validation_files: list[str] = Field(
        default_factory=list,
        description="Explicit validation files; when given, no validation rows are split off.",
    )
    test_files: list[str] = Field(
        default_factory=list,
        description="Explicit test files; when given, no test rows are split off.",
    )
    format: Literal[
        "auto", "chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference"
    ] = Field("auto", description="Row format; `auto` detects it per file and says what it found.")
    on_error: Literal["fail", "skip"] = Field(
        "fail",
        description="`fail`: stop before writing any split and list the errors. `skip`: write "
        "rejected rows with their reason to rejects.jsonl and go on.",
    )
    max_seq_len: int = Field(1024, ge=16, description="Tokens per training sequence (and pack).")
    overlength: Literal["drop", "truncate"] = Field(
        "drop", description="What to do with an example longer than max_seq_len."
    )
    normalize: bool = Field(
        True,
        description="Unicode NFC, line endings, invisible/control characters, trailing whitespace; "
        "indentation kept.",
    )
    pii: PIIConfig = Field(default_factory=PIIConfig, description="PII scrubbing.")
    dedupe: DedupeConfig = Field(default_factory=DedupeConfig, description="Deduplication.")
    split: SplitConfig = Field(
        default_factory=SplitConfig, description="Train/validation/test split."
    )
    assistant_only_loss: bool = Field(
        True, description="Mask labels (-100) everywhere but assistant turns."
    )
    pack: bool = Field(True, description="Pack examples into max_seq_len sequences for training.")
    batch_size: int = Field(
        1024,
        ge=1,
        description="Rows per Ray Data batch (blocks hold 4 batches: each task costs Ray Data "
        "~0.15 s of scheduling, so small blocks leave the CPUs idle).",
    )


# --------------------------------------------------------------------------- training


class LoraConfig(_Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="LoRA dropout.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Modules to adapt: a list of names or `all-linear`."
    )


class QuantConfig(_Section):
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


class DeepSpeedConfig(_Section):
    zero_stage: Literal[0, 1, 2, 3] = Field(0, description="DeepSpeed ZeRO stage (0 = plain DDP).")
    offload_optimizer: bool = Field(False, description="Offload optimizer states to CPU.")
    offload_params: bool = Field(False, description="Offload parameters to CPU (ZeRO-3 only).")
    raw_config: str | dict[str, Any] | None = Field(
        None,
        description="Expert escape hatch: a DeepSpeed JSON config (path or mapping) used as is.",
    )


class TrackingConfig(_Section):
    backends: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list, description="Experiment trackers to report to."
    )
    project: str | None = Field(None, description="Project / experiment name for the trackers.")


class TrainingConfig(_Section):
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
        description="Keep each worker's training shard in memory after the first epoch when it "
        "fits in this many MiB (later epochs then skip a Ray Data re-read); 0 streams every epoch.",
    )
    lora: LoraConfig = Field(default_factory=LoraConfig, description="LoRA / DoRA / QLoRA adapter.")
    quantization: QuantConfig = Field(default_factory=QuantConfig, description="QLoRA 4-bit base.")
    deepspeed: DeepSpeedConfig = Field(
        default_factory=DeepSpeedConfig, description="DeepSpeed ZeRO."
    )
    dpo_beta: float = Field(0.1, gt=0, description="DPO temperature beta.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="Trackers.")


# --------------------------------------------------------------------------- cluster


class K8sConfig(_Section):
    namespace: str = Field("default", description="Kubernetes namespace of rendered manifests.")
    image: str = Field("rayft/rayft:0.1.0", description="Container image for head and workers.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Worker node selector.")
    tolerations: list[dict[str, Any]] = Field(
        default_factory=list, description="Worker tolerations."
    )
    storage: str = Field(
        "pvc:rayft-runs",
        description="Shared storage for run dirs: `pvc:<claim-name>` or an s3:// prefix.",
    )
    head_cpus: int = Field(4, ge=1, description="CPUs of the head pod.")
    head_memory: str = Field("16Gi", description="Memory of the head pod.")
    worker_cpus: int = Field(8, ge=1, description="CPUs per worker pod.")
    worker_memory: str = Field("64Gi", description="Memory per worker pod.")
    ray_version: str = Field(
        "2.60.0",
        description="Ray version inside `image` (KubeRay rayVersion; token auth needs >= 2.52).",
    )
    auth_secret: str | None = Field(
        None,
        description="Secret (key `auth_token`) with the Ray token; None: KubeRay generates one "
        "per Ray cluster. Name one to keep the token stable across RayService upgrades.",
    )
    env_secret: str | None = Field(
        "rayft-env",
        description="Secret whose keys become env vars in every pod (HF_TOKEN, AWS_*, "
        "RAYFT_API_KEY); optional: pods start without it.",
    )
    service_account: str | None = Field(None, description="ServiceAccount of the Ray pods.")
    image_pull_secrets: list[str] = Field(
        default_factory=list, description="Secrets for pulling `image` from a private registry."
    )
    storage_size: str = Field("500Gi", description="Size of the rendered PVC (pvc: storage).")
    storage_class: str | None = Field(
        None, description="StorageClass of the rendered PVC (None: the cluster default)."
    )
    backoff_limit: int = Field(
        2, ge=0, description="RayJob retries, each on a fresh Ray cluster; train resumes."
    )
    ttl_seconds_after_finished: int = Field(
        3600, ge=0, description="Seconds the finished RayJob's Ray cluster lingers for logs."
    )


class ClusterConfig(_Section):
    address: str | None = Field(
        None, description="Ray address of an existing cluster; None starts an embedded local Ray."
    )
    num_workers: int = Field(
        2, ge=1, description="Ray Train workers (one per GPU on GPU clusters)."
    )
    use_gpu: bool = Field(False, description="Give each worker a GPU.")
    gpus_per_node: int = Field(1, ge=1, description="GPUs per node (sizes KubeRay worker groups).")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs reserved per training worker.")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="Placement group strategy of the training workers."
    )
    max_failures: int = Field(
        0, ge=-1, description="Worker failures to recover from (-1: unlimited)."
    )
    storage_path: str | None = Field(
        None, description="Checkpoint storage (local dir or s3://); default <run_dir>/checkpoints."
    )
    k8s: K8sConfig = Field(default_factory=K8sConfig, description="KubeRay rendering.")


# --------------------------------------------------------------------------- evaluation


class CheckConfig(_Section):
    name: str = Field(description="Name of the task check in the report.")
    kind: Literal["regex", "json_keys", "contains"] = Field(description="What the check tests.")
    pattern: str | None = Field(None, description="Regex (kind=regex) or substring (contains).")
    keys: list[str] = Field(default_factory=list, description="Required keys (kind=json_keys).")

    @model_validator(mode="after")
    def _complete(self) -> CheckConfig:
        if self.kind in ("regex", "contains") and not self.pattern:
            raise ValueError(f"check '{self.name}' (kind={self.kind}) needs a pattern")
        if self.kind == "json_keys" and not self.keys:
            raise ValueError(f"check '{self.name}' (kind=json_keys) needs keys")
        if self.kind == "regex":
            try:
                re.compile(self.pattern or "")
            except re.error as e:
                raise ValueError(f"check '{self.name}': bad regex {self.pattern!r}: {e}") from None
        return self


class JudgeConfig(_Section):
    base_url: str = Field(description="OpenAI-compatible endpoint of the judge.")
    model: str = Field(description="Judge model name.")
    api_key_env: str = Field("OPENAI_API_KEY", description="Environment variable with its key.")


class EvalConfig(_Section):
    candidates: list[str] = Field(
        default_factory=lambda: ["adapter"],
        description="Fine-tuned arms: `adapter` / `merged` (this run) or paths to adapters/models.",
    )
    max_examples: int | None = Field(None, ge=1, description="Cap on test examples (None: all).")
    max_new_tokens: int = Field(128, ge=1, description="Generation budget per answer.")
    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    temperature: float = Field(0.7, gt=0, description="Sampling temperature (do_sample only).")
    batch_size: int = Field(8, ge=1, description="Prompts per generation batch.")
    num_replicas: int = Field(
        1,
        ge=1,
        description="Model replicas in the Ray Data actor pool (1 CPU each; 1 GPU each with "
        "cluster.use_gpu).",
    )
    checks: list[CheckConfig] = Field(default_factory=list, description="Task checks.")
    judge: JudgeConfig | None = Field(None, description="Optional LLM-as-judge (pairwise).")
    forgetting: bool = Field(
        True, description="Also compare perplexity on rayft's shipped general-text set."
    )
    max_report_examples: int = Field(
        50, ge=0, description="Examples where the arms differ shown side by side in report.html."
    )
    bootstrap_samples: int = Field(2000, ge=100, description="Bootstrap resamples for CIs.")
    seed: int = Field(0, description="Seed of bootstrap and sampling.")


# --------------------------------------------------------------------------- serving


class ExperimentConfig(_Section):
    arms: dict[str, float] = Field(
        description="Model-or-adapter name -> traffic weight; `base` names the base model."
    )
    shadow: str | None = Field(None, description="Arm that gets copies of requests, never answers.")

    @model_validator(mode="after")
    def _weights(self) -> ExperimentConfig:
        if not self.arms:
            raise ValueError("an experiment needs at least one arm")
        if any(w < 0 for w in self.arms.values()) or sum(self.arms.values()) <= 0:
            raise ValueError("arm weights must be >= 0 and sum to more than 0")
        return self


class AutoscalingConfig(_Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        4, gt=0, description="Scale to keep this many per replica."
    )


class ServeConfig(_Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    api_key: str | None = Field(None, description="Inference key (Bearer); env RAYFT_API_KEY wins.")
    admin_key: str | None = Field(
        None,
        description="Admin key for /admin/* (adapters, experiments); env RAYFT_ADMIN_KEY wins.",
    )
    engine: Literal["transformers", "vllm"] = Field("transformers", description="Inference engine.")
    dora: Literal["native", "merge"] = Field(
        "native",
        description="DoRA adapters: `native` serves them on the engine where it can "
        "(transformers); `merge` merges each into the base and serves it as its own deployment "
        "under the adapter's name. vLLM has no DoRA, so there DoRA adapters are always merged.",
    )
    adapters: dict[str, str] = Field(
        default_factory=dict, description="Adapter name -> path (run dir, adapter dir or s3://)."
    )
    models: dict[str, str] = Field(
        default_factory=dict, description="Extra (merged) model name -> model directory."
    )
    adapter_root: str | None = Field(
        None, description="Admin-loaded adapters must live under this directory (default run_dir)."
    )
    experiments: dict[str, ExperimentConfig] = Field(
        default_factory=dict, description="A/B experiments: name -> arms."
    )
    num_replicas: int = Field(1, ge=1, description="Engine replicas (without autoscaling).")
    autoscaling: AutoscalingConfig | None = Field(None, description="Autoscaling bounds.")
    max_ongoing_requests: int = Field(8, ge=1, description="Requests a replica works on at once.")
    max_queued_requests: int = Field(32, ge=0, description="Requests queued before 503.")
    max_batch_size: int = Field(8, ge=1, description="Requests batched into one forward pass.")
    batch_wait_ms: float = Field(
        50,
        ge=0,
        description="How long a replica waits to fill a batch (generation takes far longer).",
    )
    max_tokens_limit: int = Field(1024, ge=1, description="Largest max_tokens a request may ask.")
    max_loaded_adapters: int = Field(16, ge=1, description="Adapters resident per replica.")
    max_lora_rank: int = Field(64, ge=1, description="Largest LoRA rank an adapter may have.")
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request) a request may ask.")
    cpus_per_replica: float = Field(1, ge=0, description="CPUs reserved per engine replica.")
    gpus_per_replica: float = Field(0, ge=0, description="GPUs per engine replica (vllm: >= 1).")


# --------------------------------------------------------------------------- export


class ExportConfig(_Section):
    gguf_types: list[Literal["f32", "f16", "q8_0", "q4_0"]] = Field(
        default_factory=lambda: ["f16", "q8_0"],
        description="GGUF tensor types to write, one verified file each: "
        "<run_dir>/export/<name>-<type>.gguf.",
    )
    max_shard_size: str = Field("5GB", description="Largest safetensors shard of merged models.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="Dtype the base is loaded, merged and saved in; auto: the training compute "
        "dtype (training.precision / quantization.compute_dtype; bf16 on GPU, fp32 on CPU).",
    )
    verify_prompts: list[str] = Field(
        default_factory=lambda: [
            "Hello! What can you do?",
            "Write one sentence about the sea.",
            "What is 17 times 3?",
        ],
        description="Fixed prompts used to verify merges and exports.",
    )


# --------------------------------------------------------------------------- job


class JobConfig(_Section):
    name: str = Field("run", description="Run name (used in manifests and job names).")
    run_dir: str = Field("runs/run", description="Directory every stage reads from and writes to.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    data: DataConfig = Field(default_factory=DataConfig, description="Data preparation.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description="Fine-tuning.")
    cluster: ClusterConfig = Field(default_factory=ClusterConfig, description="Where it runs.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Serving.")
    export: ExportConfig = Field(default_factory=ExportConfig, description="Merge and export.")

    @property
    def run_path(self) -> Path:
        return Path(self.run_dir)

    def digest(self) -> str:
        """Stable hash of the resolved config (goes into every manifest)."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Known field names of the section that `loc` (a pydantic error location) points into."""
    model: type[BaseModel] | None = JobConfig
    for part in loc[:-1]:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        ann = model.model_fields[part].annotation
        model = next((a for a in _model_types(ann)), None)
    return list(model.model_fields) if model else []


def _model_types(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in getattr(annotation, "__args__", ()) for m in _model_types(arg)]


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid job config"]
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "extra_forbidden":
            key = str(e["loc"][-1])
            close = difflib.get_close_matches(key, _fields_at(e["loc"]), n=1, cutoff=0.6)
            hint = f" — did you mean '{close[0]}'?" if close else ""
            lines.append(f"  {where}: unknown key{hint}")
        else:
            lines.append(f"  {where}: {e['msg']}")
    lines.append("See `rayft config show --help-fields` for every key and its meaning.")
    return "\n".join(lines)


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. training.max_steps=20")
    key, raw = assignment.split("=", 1)
    parts = key.strip().split(".")
    node = data
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{part}' is a value, not a section")
        node = child
    node[parts[-1]] = yaml.safe_load(raw) if raw != "" else ""


def load_config(
    path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()
) -> JobConfig:
    """Read a job file (or start from defaults), apply `--set` overrides, validate."""
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text()
        except OSError as e:
            raise ConfigError(f"{path}: cannot read job file ({e.strerror})") from e
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(
                f"{path}: a job file is a mapping of sections, got {type(loaded).__name__}"
            )
        data = loaded or {}
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        return JobConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e, source)) from None


def dump_config(cfg: JobConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)


def field_help(model: type[BaseModel] = JobConfig, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, default, description) for every field, sections expanded."""
    rows = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        sub = _model_types(field.annotation)
        if sub and field.default_factory is not None:
            rows.append((key, "", field.description or ""))
            rows.extend(field_help(sub[0], key + "."))
        else:
            default = field.get_default(call_default_factory=True)
            rows.append((key, json.dumps(default, default=str), field.description or ""))
    return rows
