"""`rayft train`: the stage entry function. Checks the setup, sizes a Ray Train TorchTrainer from
the config, streams the prepared data to its workers, and turns the last checkpoint into the
run dir's adapter/ (or model/), train_summary.json, model card and run.json."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rayft import manifest, models
from rayft.cluster.connect import local_cpus, ray_session
from rayft.cluster.watchdog import Watchdog
from rayft.config import JobConfig
from rayft.errors import RayftError
from rayft.training import early_stop
from rayft.training.artifacts import (
    export_model,
    planned_vs_measured,
    read_metrics,
    reward_summary,
    summarize,
    write_card,
)
from rayft.training.checks import TrainConfigError, objective_for, refuse_bad_combinations
from rayft.training.data import data_kind, read_splits
from rayft.training.dsconfig import deepspeed_config
from rayft.training.facts import resolve, tokenizer_facts
from rayft.training.flops import flops_per_token, mfu, parameter_count
from rayft.training.report import END_ROW, MetricsFile
from rayft.training.worker import train_loop_per_worker


class TrainingFailedError(RayftError):
    """The Ray Train run failed (after its allowed worker failures)."""


@dataclass
class TrainArtifacts:
    run_dir: Path
    output_dir: Path  # <run_dir>/adapter or <run_dir>/model
    checkpoint: str  # the Ray Train checkpoint the output came from
    metrics_path: Path
    summary: dict[str, Any]


def train(cfg: JobConfig, resume: bool = False) -> TrainArtifacts:
    """Fine-tune `cfg.model.base` on `<run_dir>/data/`; `resume` continues the latest checkpoint."""
    run_dir = Path(cfg.run_dir).resolve()
    data_dir = run_dir / "data"
    kind = data_kind(data_dir)
    refuse_bad_combinations(cfg, kind)
    objective = objective_for(cfg, kind)
    t = cfg.training
    ds_config = deepspeed_config(
        t.deepspeed.zero_stage,
        t.deepspeed.offload_optimizer,
        t.deepspeed.offload_params,
        t.deepspeed.raw_config,
    )
    base_path = models.resolve(cfg.model.base, cfg.model.revision)
    facts = resolve(cfg, ds_config, base_path)
    stage = facts["deepspeed"]["zero_stage"]
    storage = cfg.cluster.storage_path or str(run_dir / "checkpoints")
    _check_resume(storage, cfg.name, resume)

    metrics_path = run_dir / "metrics.jsonl"
    session_start = time.time()  # this session's rows: metrics.jsonl may be rewritten
    with (
        ray_session(
            cfg.cluster.address,
            num_cpus=local_cpus(cfg.cluster.num_workers, cfg.cluster.cpus_per_worker),
        ),
        _watchdog(cfg) as dog,
    ):
        splits = read_splits(data_dir, kind)
        trainer = _torch_trainer(cfg, splits, storage, run_dir, _worker_config(
            cfg, facts, objective, kind, ds_config, "validation" in splits, dog.key
        ), objective)  # fmt: skip
        print(
            f"[rayft train] {cfg.name}: {t.method} {objective} on {cfg.model.base}, "
            f"{cfg.cluster.num_workers} workers, ZeRO {stage}, "
            f"{t.max_steps} steps{' (resuming)' if resume else ''}",
            flush=True,
        )
        start = time.perf_counter()
        result = _fit(trainer, cfg)
        wall = time.perf_counter() - start

    peft = t.method != "full"
    out_dir = run_dir / ("adapter" if peft else "model")
    kept = early_stop.adapter_checkpoint(result, t.early_stopping, objective)
    with kept.as_directory() as ckpt:
        export_model(Path(ckpt), out_dir, base_path, peft)
    rows = _session_rows(run_dir, metrics_path)
    summary = summarize(
        [r for r in rows if r.get("time", 0) >= session_start],
        wall,
        method=t.method,
        objective=objective,
        num_workers=cfg.cluster.num_workers,
        zero_stage=stage,
        checkpoint=kept.path,
        workers=_workers(run_dir),
    )
    es = t.early_stopping.model_dump() if t.early_stopping else None
    summary["early_stopping"] = early_stop.summary(rows, objective, es)
    if objective == "grpo":
        summary["rewards"] = reward_summary(rows)
    if objective == "reward":
        summary["reward_accuracy"] = _held_out_accuracy(out_dir, data_dir, base_path)
    per_token = flops_per_token(parameter_count(base_path), t.method)
    summary["model_flops_per_token"] = per_token
    summary["mfu"] = mfu(
        summary["tokens_per_s"] or 0.0,
        per_token,
        [w.get("device", "cpu") for w in summary["workers"]],
    )
    summary["plan"] = planned_vs_measured(cfg, summary["workers"])
    data_hash = _data_hash(run_dir, data_dir)
    write_card(out_dir, cfg, base_path, data_hash, summary)
    (run_dir / "train_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    # The tokenizer saved with the weights: the one merge and serving find next to them.
    facts = {**facts, "tokenizer": tokenizer_facts(out_dir, run_dir)}
    manifest.record_stage(
        run_dir, "train", cfg, data_hash=data_hash, base_path=base_path, output=str(out_dir),
        metrics=summary, facts=facts,
    )  # fmt: skip
    stop = summary["early_stopping"]
    if stop and stop["stopped"]:
        print(
            f"[rayft train] stopped early at step {stop['stopped_at']} of {t.max_steps}: "
            f"{stop['reason']}; the adapter is the checkpoint of step {stop['best_step']}",
            flush=True,
        )
    print(
        f"[rayft train] done: {summary['steps']} steps, {summary['tokens']} tokens in "
        f"{wall:.0f}s, loss {summary['final_loss']}, eval loss {summary['final_eval_loss']}"
        f"{'' if summary['mfu'] is None else ', MFU {:.1%}'.format(summary['mfu'])} -> {out_dir}",
        flush=True,
    )
    return TrainArtifacts(run_dir, out_dir, kept.path, metrics_path, summary)


def _held_out_accuracy(out_dir: Path, data_dir: Path, base_path: str) -> dict | None:
    """A reward model's pairwise accuracy on the test split (chosen scored above rejected),
    with its 95% interval; scored here on the driver, so only for models up to 3B."""
    import pyarrow.parquet as pq

    from rayft.graders.reward import pairwise_accuracy

    test = data_dir / "test.parquet"
    if not test.exists() or parameter_count(base_path) > 3e9:
        return None
    rows = pq.read_table(test, columns=["prompt", "chosen", "rejected"]).to_pylist()
    return pairwise_accuracy(str(out_dir), rows) if rows else None


def _worker_config(
    cfg: JobConfig,
    facts: dict[str, Any],
    objective: str,
    kind: str,
    ds_config: dict | None,
    has_val: bool,
    progress: str | None = None,
) -> dict[str, Any]:
    """Plain values for the workers (the config object itself stays on the driver); the model
    is built from `facts`, what run.json records as trained; `progress` is the watchdog's key
    that rank 0 beats on."""
    t, c = cfg.training, cfg.cluster
    save_steps = t.save_steps or t.max_steps
    if t.early_stopping is not None and t.eval_steps:
        save_steps = t.eval_steps  # every evaluation's checkpoint can become the adapter
    hf: dict[str, Any] = {
        "max_steps": t.max_steps,
        "learning_rate": t.learning_rate,
        "lr_scheduler_type": t.lr_scheduler,
        "warmup_steps": math.ceil(t.warmup_ratio * t.max_steps),
        "weight_decay": t.weight_decay,
        "per_device_train_batch_size": t.per_device_batch_size,
        "per_device_eval_batch_size": t.per_device_batch_size,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "activation_checkpointing": t.gradient_checkpointing,
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "max_grad_norm": t.max_grad_norm,
        # mixed precision in the dtype the weights are loaded in
        "bf16": facts["compute_dtype"] == "bfloat16",
        "fp16": facts["compute_dtype"] == "float16",
        "seed": t.seed,
        "data_seed": t.seed,
        "logging_steps": t.logging_steps,
        "eval_strategy": "steps" if has_val else "no",
        "eval_steps": t.eval_steps or save_steps,
        "save_strategy": "steps",
        "save_steps": save_steps,
        # Local copies only; Ray Train keeps the real ones in storage.
        "save_total_limit": 1,
        "report_to": list(t.tracking.backends) or "none",
        "include_num_input_tokens_seen": "all" if objective == "sft" else "no",
        # A reward model's eval_loss is the pairwise loss; accuracy is logged besides it.
        "use_cpu": not c.use_gpu,
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
        "ddp_find_unused_parameters": False,
    }
    if t.tracking.backends:
        hf["run_name"] = cfg.name
    return {
        "base_path": facts["base"]["path"],
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "facts": facts,
        "objective": objective,
        "kind": kind,
        "lora": t.lora.model_dump(),
        "ds_config": ds_config,
        "use_gpu": c.use_gpu,
        "seed": t.seed,
        "has_validation": has_val,
        "dpo_beta": t.dpo_beta,
        "kto": t.kto.model_dump(),
        "grpo": t.grpo.model_dump(),
        "grader": t.grader,
        "early_stopping": t.early_stopping.model_dump() if t.early_stopping else None,
        "shard_cache_bytes": t.shard_cache_mb * 2**20,
        "max_seq_len": cfg.data.max_seq_len,
        "hf": hf,
        "fault": _fault_from_env(),
        "tracking_env": _tracking_env(cfg),
        "progress": progress,
    }


def _session_rows(run_dir: Path, metrics_path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl's rows, then HF's end-of-training row (its runtime times tokens/s)."""
    end = run_dir / END_ROW
    return read_metrics(metrics_path) + ([json.loads(end.read_text())] if end.exists() else [])


def _tracking_env(cfg: JobConfig) -> dict[str, str]:
    """Where the trackers write, as the environment variables HF's callbacks read (transformers
    5 dropped `TrainingArguments.logging_dir`). Local trackers write under `run_dir/tracking/`
    unless the user's own environment already points them somewhere."""
    backends, project = cfg.training.tracking.backends, cfg.training.tracking.project or cfg.name
    root = Path(cfg.run_dir).resolve() / "tracking"
    env: dict[str, str] = {}
    if "tensorboard" in backends:
        env["TENSORBOARD_LOGGING_DIR"] = str(root / "tensorboard")
    if "mlflow" in backends:
        env["MLFLOW_EXPERIMENT_NAME"] = project
        env["MLFLOW_TRACKING_URI"] = os.environ.get("MLFLOW_TRACKING_URI") or (
            (root / "mlruns").as_uri()
        )
    if "wandb" in backends:
        env["WANDB_PROJECT"] = project
        env["WANDB_DIR"] = os.environ.get("WANDB_DIR") or str(root)
    return env


def _torch_trainer(
    cfg: JobConfig,
    splits: dict,
    storage: str,
    run_dir: Path,
    loop_config: dict,
    objective: str = "sft",
):
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    c = cfg.cluster
    run_dir.mkdir(parents=True, exist_ok=True)
    has_val = "validation" in splits
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=c.num_workers,
            use_gpu=c.use_gpu,
            resources_per_worker=_worker_resources(c),
            placement_strategy=c.placement_strategy,
        ),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=c.max_failures),
            checkpoint_config=checkpoint_config(
                cfg.training.keep_checkpoints,
                has_val,
                "eval_reward" if objective == "grpo" else "eval_loss",
            ),
            callbacks=[MetricsFile(str(run_dir), cfg.training.max_steps)],
        ),
        datasets=splits,
        # Same blocks to the same worker in the same order on every run: resume replays exactly.
        # GRPO's workers each read the whole prompt set (TRL's sampler groups the generations
        # of one prompt and accelerate splits each batch between the workers).
        dataset_config=DataConfig(
            datasets_to_split=[] if objective == "grpo" else "all",
            execution_options=ExecutionOptions(preserve_order=True),
        ),
    )


def _worker_resources(c) -> dict[str, float]:
    return {"CPU": c.cpus_per_worker, **({"GPU": 1} if c.use_gpu else {})}


def _watchdog(cfg: JobConfig) -> Watchdog:
    """Stops a run whose workers take what the Ray Data tasks feeding them need (on a
    cluster of 2 CPUs, 2 workers of 1 CPU each): steps come from rank 0's `beat`."""
    c = cfg.cluster
    return Watchdog(
        c.stall_timeout,
        "training step",
        stage="train",
        autoscaling=c.autoscaling,
        holders={"the training workers' placement group": [_worker_resources(c)] * c.num_workers},
        fix="fewer workers (cluster.num_workers) or a smaller cluster.cpus_per_worker, so that "
        "the Ray Data tasks feeding the workers get CPUs of their own; or nodes with more of "
        "what waits",
    )


def checkpoint_config(keep: int, has_validation: bool, metric: str = "eval_loss"):
    """Keep the `keep` best checkpoints by the validation loss (GRPO: the held-out grader
    reward) that `RayReport` puts at the top level of each checkpoint report; without a
    validation split, the latest ones."""
    from ray.train import CheckpointConfig

    return CheckpointConfig(
        num_to_keep=keep,
        checkpoint_score_attribute=metric if has_validation else None,
        checkpoint_score_order="max" if metric == "eval_reward" else "min",
    )


def _fit(trainer, cfg: JobConfig):
    import ray.train

    try:
        return trainer.fit()
    except ray.train.TrainingFailedError as e:
        raise TrainingFailedError(
            f"training of '{cfg.name}' failed after {cfg.cluster.max_failures} allowed worker "
            f"failure(s): {e}\nThe worker traceback is above. Fix the cause, then continue from "
            f"the last checkpoint with `rayft train CONFIG --resume` (cluster.max_failures "
            f"retries automatically)."
        ) from e


def _check_resume(storage: str, name: str, resume: bool) -> None:
    """A fresh run must not silently continue old checkpoints, nor --resume silently restart."""
    import pyarrow.fs

    fs, root = pyarrow.fs.FileSystem.from_uri(
        storage if "://" in storage else os.path.abspath(storage)
    )
    snapshot = f"{root}/{name}/checkpoint_manager_snapshot.json"
    exists = fs.get_file_info(snapshot).type != pyarrow.fs.FileType.NotFound
    if exists and not resume:
        raise TrainConfigError(
            f"{storage}/{name} holds checkpoints of an earlier run of '{name}': continue it with "
            "`rayft train CONFIG --resume`, or delete that directory (or change `name`) to start "
            "over"
        )
    if resume and not exists:
        print(f"[rayft train] nothing to resume in {storage}/{name}: starting fresh", flush=True)


def _workers(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "workers.json"
    return json.loads(path.read_text()) if path.exists() else []


def _data_hash(run_dir: Path, data_dir: Path) -> str:
    """The data hash prepare recorded, else a hash of the Parquet files train read."""
    prepared = manifest.read_manifest(run_dir).get("stages", {}).get("prepare", {})
    if prepared.get("data_hash"):
        return prepared["data_hash"]
    return manifest.hash_files(sorted(p for p in data_dir.rglob("*.parquet") if p.is_file()))


def _fault_from_env() -> dict[str, Any] | None:
    """Fault injection for the fault-tolerance tests (RAYFT_TRAIN_FAULT, a JSON object)."""
    raw = os.environ.get("RAYFT_TRAIN_FAULT")
    return json.loads(raw) if raw else None
