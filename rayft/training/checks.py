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


# The objective `auto` picks for each kind of prepared data, and the data each objective takes.
IMPLIED = {"sft": "sft", "preference": "dpo", "prompt": "grpo", "unpaired": "kto"}
TAKES = {"sft": "sft", "dpo": "preference", "reward": "preference", "grpo": "prompt",
         "kto": "unpaired"}  # fmt: skip
DATA_HELP = {
    "sft": "chat, instruction or text rows",
    "preference": "preference pairs (prompt, chosen, rejected)",
    "prompt": "prompt-only rows (data.format: reinforcement)",
    "unpaired": "unpaired good/bad rows (data.format: kto: prompt, completion, label)",
}


def objective_for(cfg: JobConfig, data_kind: str) -> str:
    """The configured objective, or the one the prepared data implies."""
    if cfg.training.objective != "auto":
        return cfg.training.objective
    return IMPLIED.get(data_kind, "sft")


def _objective_problems(cfg: JobConfig, data_kind: str, objective: str) -> list[str]:
    t, out = cfg.training, []
    wants = TAKES[objective]
    if wants != data_kind:
        out.append(
            f"training.objective={objective} trains on {DATA_HELP[wants]}, but the prepared "
            f"data holds {DATA_HELP.get(data_kind, data_kind)}: prepare the right data, or use "
            f"objective {IMPLIED.get(data_kind, 'sft')} (or auto)"
        )
    if objective == "grpo":
        out += _grpo_problems(cfg)
    elif t.grader is not None:
        out.append(f"training.grader is set but objective {objective} has no rewards: use grpo")
    if objective == "kto" and t.per_device_batch_size < 2:
        out.append(
            "training.objective=kto needs per_device_batch_size >= 2: its KL term pairs each "
            "prompt with another row's completion from the same micro-batch"
        )
    es = t.early_stopping
    if es is not None:
        if not (cfg.data.split.validation or cfg.data.validation_files):
            out.append(
                "training.early_stopping needs a validation split to watch: set "
                "data.split.validation (e.g. 0.1) or data.validation_files"
            )
        if t.eval_steps is None:
            out.append(
                "training.early_stopping needs training.eval_steps: how often to evaluate "
                "(patience counts evaluations)"
            )
        elif t.save_steps is not None and t.save_steps != t.eval_steps:
            out.append(
                f"training.early_stopping saves a checkpoint at every evaluation so the best one "
                f"can become the adapter: leave training.save_steps unset or equal to "
                f"eval_steps ({t.eval_steps}), not {t.save_steps}"
            )
        if es.metric == "eval_reward" and objective != "grpo":
            out.append(
                "training.early_stopping.metric=eval_reward is a grader score: only grpo has one"
            )
    return out


def _grpo_problems(cfg: JobConfig) -> list[str]:
    t, g, out = cfg.training, cfg.training.grpo, []
    if t.grader is None:
        out.append(
            "training.objective=grpo needs training.grader: the reward, e.g. "
            '{type: text_similarity, input: "{{sample.output_text}}", reference: '
            '"{{item.answer}}", evaluation_metric: rouge_l} (docs/graders.md)'
        )
    else:
        from rayft.graders import GraderError, build

        try:
            build(t.grader, where="training.grader", allow_python=True, base_url=g.base_url)
        except GraderError as e:
            out.append(str(e))
    per_step = cfg.cluster.num_workers * t.per_device_batch_size * t.gradient_accumulation_steps
    if per_step % g.num_generations:
        out.append(
            f"training.grpo.num_generations ({g.num_generations}) must divide the completions "
            f"of one step: cluster.num_workers x per_device_batch_size x "
            f"gradient_accumulation_steps = {per_step}; e.g. per_device_batch_size "
            f"{g.num_generations}"
        )
    if g.use_vllm and not cfg.cluster.use_gpu:
        out.append(
            "training.grpo.use_vllm generates with vLLM, which needs a GPU: set "
            "cluster.use_gpu: true, or leave use_vllm off (the training model generates)"
        )
    if g.algorithm == "rloo" and (g.loss_type != "dapo" or g.scale_rewards != "group"):
        out.append(
            "training.grpo.loss_type and scale_rewards are GRPO's: RLOO normalises its "
            "leave-one-out advantages itself; leave them at their defaults"
        )
    return out


def problems(cfg: JobConfig, data_kind: str) -> list[str]:
    """Every known-bad combination in `cfg` for data of `data_kind` (sft | preference)."""
    t, ds, q = cfg.training, cfg.training.deepspeed, cfg.training.quantization
    out = []
    objective = objective_for(cfg, data_kind)
    out += _objective_problems(cfg, data_kind, objective)
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
