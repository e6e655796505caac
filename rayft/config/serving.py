"""`serve`: the OpenAI-compatible API, its engines, adapters, experiments and replicas."""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from rayft.config.section import Section

# The only values vLLM's LoRAConfig.max_lora_rank takes (vllm/config/lora.py, MaxLoRARanks, in
# vLLM 0.33.0, the version docker/Dockerfile installs). Checked here because vLLM refuses any
# other rank only when the engine starts, on a GPU node, long after the config was accepted.
# It lives here, not in rayft.serving.vllm_engine: importing rayft.serving imports rayft.config.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
_RANKS = ", ".join(map(str, VLLM_LORA_RANKS))


class ExperimentConfig(Section):
    arms: dict[str, float] = Field(
        description="Model-or-adapter name -> traffic weight; `base` names the base model."
    )
    shadow: str | None = Field(None, description="Arm that gets copies of requests, never answers.")

    # The weights' one rule, for the job file and the admin API (serving.openai_api).
    @field_validator("arms")
    @classmethod
    def _weights(cls, arms: dict[str, float]) -> dict[str, float]:
        if not arms:
            raise ValueError("an experiment needs at least one arm")
        if not all(math.isfinite(w) and w >= 0 for w in arms.values()) or sum(arms.values()) <= 0:
            raise ValueError("arm weights must be finite, >= 0 and sum to more than 0")
        return arms


class AutoscalingConfig(Section):
    min_replicas: int = Field(1, ge=0, description="Fewest replicas.")
    max_replicas: int = Field(1, ge=1, description="Most replicas.")
    target_ongoing_requests: float = Field(
        4, gt=0, description="Scale to keep this many per replica."
    )


class FineTuningConfig(Section):
    """OpenAI's files and fine-tuning jobs API on the serving app (rayft/serving/ft_jobs.py)."""

    enabled: bool = Field(False, description="Serve /v1/files and /v1/fine_tuning/jobs.")
    bases: list[str] = Field(
        default_factory=list,
        description="Served bases a job may fine-tune, by served name (empty: the base).",
    )
    max_running_jobs: int = Field(1, ge=1, description="Jobs running on the cluster at once.")
    max_running_per_tenant: int = Field(
        1, ge=1, description="Jobs one tenant has running at once; the rest wait `queued`."
    )
    max_file_mb: float = Field(100, gt=0, description="Largest file an upload may be (MB).")
    max_rows: int = Field(100_000, ge=1, description="Most rows (JSONL lines) a file may have.")
    max_epochs: int = Field(10, ge=1, description="Largest `n_epochs` a job may ask.")
    max_batch_size: int = Field(64, ge=1, description="Largest `batch_size` a job may ask.")
    max_learning_rate_multiplier: float = Field(
        10, gt=0, description="Largest `learning_rate_multiplier` (times training.learning_rate)."
    )
    state: str | None = Field(
        None,
        description="Where uploaded files and job run dirs live (default <run_dir>/fine_tuning); "
        "shared storage when jobs run on other nodes.",
    )
    database: str | None = Field(
        None,
        description="SQLAlchemy URL of the service's database (default: SQLite in `state`).",
    )
    poll_s: float = Field(2.0, gt=0, description="How often running jobs are checked (s).")

    @field_validator("state")
    @classmethod
    def _local_state(cls, v: str | None) -> str | None:
        if v is not None and "://" in v:
            raise ValueError(
                "serve.fine_tuning.state must be a directory (a shared mount where jobs run on "
                "other nodes): object storage is not supported for the service's state yet"
            )
        return v


class ServeConfig(Section):
    host: str = Field("127.0.0.1", description="Address the HTTP proxy binds.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of the OpenAI-compatible API.")
    api_key: str | None = Field(None, description="Inference key (Bearer); env RAYFT_API_KEY wins.")
    api_keys: dict[str, str] = Field(
        default_factory=dict,
        description="Tenant name -> its own inference key (`env:VAR` reads the environment). "
        "The request log records each request's tenant and token usage, for charge-back; "
        "`api_key` is the one-tenant shorthand (tenant `default`).",
    )
    admin_key: str | None = Field(
        None,
        description="Admin key for /admin/* (adapters, experiments); env RAYFT_ADMIN_KEY wins.",
    )
    base_name: str | None = Field(
        None,
        description="The name /v1/models lists the base under (default: model.base, or its "
        "directory's name when it is a path); `base` always works too.",
    )
    fine_tuning: FineTuningConfig = Field(
        default_factory=FineTuningConfig, description="The fine-tuning service."
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
    log_content: bool = Field(
        False,
        description="Keep each answered chat request's messages and the answer in "
        "serve/transcripts.jsonl, for `rayft data from-feedback`; off by default: it stores "
        "users' text.",
    )
    max_loaded_adapters: int = Field(16, ge=1, description="Adapters resident per replica.")
    max_lora_rank: int = Field(
        64,
        ge=1,
        description="Largest LoRA rank an adapter may have; with engine vllm one of "
        f"{_RANKS} (the ranks vLLM accepts).",
    )
    max_n: int = Field(8, ge=1, description="Largest `n` (choices per request) a request may ask.")
    cpus_per_replica: float = Field(1, ge=0, description="CPUs reserved per engine replica.")
    gpus_per_replica: float = Field(
        0,
        ge=0,
        description="GPUs per engine replica. With engine vllm it defaults to 1 and must be at "
        "least 1 (vLLM needs a GPU); the transformers engine also runs on CPU, with 0.",
    )

    @model_validator(mode="before")
    @classmethod
    def _vllm_gets_a_gpu(cls, data: Any) -> Any:
        # 0 suits the transformers engine on CPU, but a vLLM replica without a GPU never starts;
        # only an unset value is raised, so that an explicit 0 is refused below, not overridden.
        if isinstance(data, dict) and data.get("engine") == "vllm":
            return {"gpus_per_replica": 1, **data}
        return data

    @model_validator(mode="after")
    def _vllm_limits(self) -> ServeConfig:
        if self.engine != "vllm":
            return self
        if self.gpus_per_replica < 1:
            raise ValueError(
                f"serve.gpus_per_replica={self.gpus_per_replica:g} with serve.engine=vllm: vLLM "
                "needs at least one GPU per replica; set 1 or more, or leave it unset (1)"
            )
        if self.max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"serve.max_lora_rank={self.max_lora_rank} with serve.engine=vllm: vLLM accepts "
                f"only {_RANKS}"
            )
        return self
