"""Combinations known to fail, refused before any worker starts (a failed 2-worker start costs
minutes on a cluster and its error rarely names the cause)."""

from __future__ import annotations

import importlib.util

from rayft.config import JobConfig
from rayft.errors import RayftError
from rayft.training.dsconfig import DeepSpeedConfigError, deepspeed_config, zero_stage
from rayft.training.facts import offloads


class TrainConfigError(RayftError):
    """A training setup that cannot work; the message lists every problem and its fix."""


def objective_for(cfg: JobConfig, data_kind: str) -> str:
    """`sft` or `dpo`: the configured objective, or the one the prepared data implies."""
    if cfg.training.objective != "auto":
        return cfg.training.objective
    return "dpo" if data_kind == "preference" else "sft"


def problems(cfg: JobConfig, data_kind: str) -> list[str]:
    """Every known-bad combination in `cfg` for data of `data_kind` (sft | preference)."""
    t, ds, q = cfg.training, cfg.training.deepspeed, cfg.training.quantization
    out = []
    objective = objective_for(cfg, data_kind)
    if objective == "dpo" and data_kind != "preference":
        out.append(
            "training.objective=dpo but the prepared data is SFT (no chosen/rejected pairs): "
            "prepare preference data (data.format: preference) or use objective sft"
        )
    if objective == "sft" and data_kind == "preference":
        out.append(
            "training.objective=sft but the prepared data holds preference pairs: use objective "
            "dpo (or auto)"
        )
    if not cfg.cluster.use_gpu and t.precision == "fp16":
        out.append(
            "training.precision=fp16 needs a GPU (no fp16 autocast/grad scaling on CPU): use "
            "fp32 or auto on CPU, or set cluster.use_gpu: true"
        )
    for backend in t.tracking.backends:
        if importlib.util.find_spec(backend) is None:
            out.append(
                f"training.tracking.backends lists {backend}, which is not installed here: "
                f"pip install {backend} (or rayft[tracking]), or leave it out"
            )
    if ds.raw_config is None:
        if ds.offload_params and ds.zero_stage != 3:
            out.append(
                f"training.deepspeed.offload_params needs zero_stage 3 (got {ds.zero_stage}): only "
                "ZeRO-3 partitions parameters, so there is nothing to offload otherwise"
            )
        if ds.offload_optimizer and ds.zero_stage == 0:
            out.append(
                "training.deepspeed.offload_optimizer needs zero_stage >= 1: without ZeRO the "
                "optimizer state is not managed by DeepSpeed"
            )
    try:
        config = deepspeed_config(
            ds.zero_stage, ds.offload_optimizer, ds.offload_params, ds.raw_config
        )
        stage = zero_stage(config)
    except DeepSpeedConfigError as e:
        out.append(str(e))
        config, stage = None, ds.zero_stage
    zero3 = stage == 3
    # a generated ZeRO-3 config always gathers: only a raw one can say false
    gathers = config is None or (config.get("zero_optimization") or {}).get(
        "stage3_gather_16bit_weights_on_model_save"
    )
    if zero3 and t.method == "full" and not gathers:
        out.append(
            "training.method=full with a raw ZeRO-3 config whose "
            "stage3_gather_16bit_weights_on_model_save is false: the saved model would hold "
            "only this rank's partition, no loadable weights; set it true"
        )
    if t.method == "qlora":
        if zero3 and q.quant_storage == "uint8":
            out.append(
                "training.method=qlora with ZeRO-3 and quantization.quant_storage=uint8: ZeRO-3 "
                "flattens and shards parameters by dtype and breaks packed uint8 4-bit weights; "
                "use quant_storage: bfloat16 (or auto)"
            )
        # The resolved config's offload (a raw one's own), besides the `offload_params` key.
        if ds.offload_params or offloads(config)["offload_params"]:
            out.append(
                "training.method=qlora with parameter offload (deepspeed.offload_params or a raw "
                "config's zero_optimization.offload_param): 4-bit bitsandbytes weights cannot be "
                "offloaded by ZeRO-3; offload the optimizer only"
            )
        if q.compute_dtype == "float16" and not cfg.cluster.use_gpu:
            out.append(
                "training.quantization.compute_dtype=float16 on CPU: use float32 or auto on CPU"
            )
    if t.eval_steps and t.save_steps and t.save_steps % t.eval_steps:
        out.append(
            f"training.save_steps ({t.save_steps}) must be a multiple of training.eval_steps "
            f"({t.eval_steps}): checkpoints are ranked by the eval loss measured when they are saved"
        )
    return out


def refuse_bad_combinations(cfg: JobConfig, data_kind: str) -> None:
    found = problems(cfg, data_kind)
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise TrainConfigError(f"refusing to start training ({cfg.name}):\n{lines}")
