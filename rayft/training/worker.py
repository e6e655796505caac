"""The per-worker training function: TRL inside a Ray Train worker. Reads top to bottom."""

from __future__ import annotations

import functools
import os
import tempfile
from typing import Any

import numpy as np
import ray.train
from torch.utils.data import DataLoader
from torch.utils.data import IterableDataset as Stream

from rayft.cluster.watchdog import beat
from rayft.training import objectives
from rayft.training.data import collator, endless_rows, features, one_pass
from rayft.training.early_stop import EarlyStop, metric_for
from rayft.training.model import adapter_config, load_base
from rayft.training.objectives import FINITE
from rayft.training.report import RayReport


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Train in a scratch output dir: HF writes each checkpoint there before Ray Train copies it
    to storage, so the local copies can go when the worker ends."""
    with tempfile.TemporaryDirectory(prefix="rayft-train-") as output_dir:
        _train(config, output_dir)


def _train(config: dict[str, Any], output_dir: str) -> None:
    """Build TrainingArguments, model, this worker's data streams and the TRL trainer; train,
    resuming from the latest Ray Train checkpoint when there is one."""
    from datasets import Dataset, IterableDataset
    from transformers import AutoTokenizer
    from transformers.trainer_callback import PrinterCallback

    objective, kind = config["objective"], config["kind"]
    beat(config["progress"])  # the driver's watchdog: this worker started
    os.environ.update(config["tracking_env"])  # read by HF's tracker callbacks
    if config["ds_config"]:
        _join_deepspeed(config["use_gpu"])
    else:
        _alone_without_ddp()
    # TrainingArguments first: under ZeRO-3 they register the DeepSpeed config that
    # from_pretrained needs to build the model partitioned.
    args = objectives.training_args(objective, config, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(config["base_path"], revision=config["revision"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = load_base(
        config["base_path"],
        config["facts"],
        config["use_gpu"],
        revision=config["revision"],
        trust_remote_code=config["trust_remote_code"],
        head="score" if objective == "reward" else "causal",
    )
    if objective == "reward":  # the score head reads the last non-padding token
        model.config.pad_token_id = tokenizer.pad_token_id

    seed, feats = config["seed"], features(kind)
    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("validation") if config["has_validation"] else None
    if objective in FINITE or objective == "grpo":
        # These trainers tokenize their datasets up front, and a second reader of a
        # streaming_split shard would wait forever for the other workers: hold this worker's
        # shard (and only it) as a finite dataset; HF's sampler then handles epochs and the
        # resume position. GRPO's driver hands every worker the whole prompt set instead (its
        # sampler repeats each prompt num_generations times and accelerate splits the batch).
        train_ds = Dataset.from_list(list(one_pass(train_shard, kind)), features=feats)
        eval_ds = None
        if eval_shard is not None:
            eval_ds = Dataset.from_list(list(one_pass(eval_shard, kind)), features=feats)
    else:
        train_ds = IterableDataset.from_generator(
            functools.partial(
                endless_rows, train_shard, kind, seed, cache_bytes=config["shard_cache_bytes"]
            ),
            features=feats,
        )
        eval_ds = None
        if eval_shard is not None:
            eval_ds = IterableDataset.from_generator(
                functools.partial(one_pass, eval_shard, kind), features=feats
            )

    callbacks = [
        RayReport(config.get("fault"), config["hf"]["max_steps"], objective, config["progress"])
    ]
    es = config.get("early_stopping")
    if es:
        metric, mode = metric_for(objective, es["metric"])
        callbacks.append(EarlyStop(metric, mode, es["patience"], es["min_delta"]))
    common = {
        "model": model,
        "args": args,
        "train_dataset": train_ds,
        "eval_dataset": eval_ds,
        "processing_class": tokenizer,
        "peft_config": adapter_config(
            config["facts"]["method"],
            config["lora"],
            "SEQ_CLS" if objective == "reward" else "CAUSAL_LM",
        ),
        "callbacks": callbacks,
    }
    trainer = objectives.build(objective, common, config, collator(tokenizer.pad_token_id))
    # HF's PrinterCallback prints every log dict on every rank; RayReport prints rank 0's line.
    trainer.remove_callback(PrinterCallback)
    if objective != "grpo":  # GRPO's own sampler must see the whole prompt set
        _read_own_shard(trainer, config["shard_cache_bytes"])

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.train()
        return
    with checkpoint.as_directory() as ckpt_dir:
        trainer.train(resume_from_checkpoint=ckpt_dir)


def _join_deepspeed(use_gpu: bool) -> None:
    """Hand DeepSpeed the process group Ray Train set up, before ZeRO-3 partitions the model at
    load time (its config would otherwise see a world of one)."""
    import deepspeed
    import deepspeed.ops

    if not use_gpu:
        # DeepSpeed JIT-compiles a shared-memory all-reduce op (~3 min) the first time it starts
        # on CPU; it only speeds up intra-node reductions that gloo does correctly.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")


def _alone_without_ddp() -> None:
    """A world of one trains as a single process. Ray Train sets up a process group and the
    torchrun variables even for one worker, and Accelerate then wraps the model in a
    DistributedDataParallel of one, whose gradient all-reduce costs time for nothing (about a
    fifth of a tiny-llama LoRA step on CPU, benchmarks/bench_train_overhead.py). Ray Train
    itself does not use the group: its reports synchronise through the controller."""
    import torch.distributed as dist

    if ray.train.get_context().get_world_size() != 1:
        return
    for var in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "NODE_RANK"):
        os.environ.pop(var, None)
    if dist.is_initialized():
        dist.destroy_process_group()


def _read_own_shard(trainer, cache_bytes: int = 0) -> None:
    """Give the trainer plain DataLoaders over this worker's Ray shard.

    Accelerate would wrap an iterable dataset in IterableDatasetShard and keep only every N-th
    batch of what Ray already split between the workers (the same fix as Ray's own
    `prepare_trainer`, which only handles Ray iterables, not the datasets TRL requires).
    """
    from datasets import IterableDataset

    bs_train = trainer.args.per_device_train_batch_size
    bs_eval = trainer.args.per_device_eval_batch_size
    collate = trainer.data_collator
    validation = trainer.eval_dataset
    if isinstance(validation, IterableDataset):  # a Ray shard: read once if it fits
        validation = _KeptRows(validation, cache_bytes)

    def train_loader() -> DataLoader:
        return DataLoader(trainer.train_dataset, batch_size=bs_train, collate_fn=collate)

    def eval_loader(eval_dataset=None) -> DataLoader:
        # HF's evaluate() passes its own eval_dataset back in: that one is the shard too.
        ours = eval_dataset is None or eval_dataset is trainer.eval_dataset
        ds = validation if ours or isinstance(eval_dataset, str) else eval_dataset
        return DataLoader(ds, batch_size=bs_eval, collate_fn=collate)

    trainer.get_train_dataloader = train_loader
    trainer.get_eval_dataloader = eval_loader


class _KeptRows(Stream):
    """The validation rows of this worker, kept (as int32 arrays, as the training shard cache
    keeps its rows) after the first evaluation when they fit in `limit` bytes: every pass over
    a Ray shard starts a Ray Data execution (seconds on a small machine, more than evaluating
    a small validation split takes), and the rows never change."""

    def __init__(self, source, limit: int):
        self.source, self.limit = source, limit
        self.rows: list[dict] | None = None

    def __iter__(self):
        if self.rows is not None:
            for row in self.rows:
                yield {k: v.tolist() for k, v in row.items()}
            return
        kept: list[dict] | None = [] if self.limit > 0 else None
        size = 0
        for row in self.source:
            if kept is not None:
                arrays = {k: np.asarray(v, dtype=np.int32) for k, v in row.items()}
                size += sum(a.nbytes for a in arrays.values())
                if size <= self.limit:
                    kept.append(arrays)
                else:
                    kept = None
            yield row
        self.rows = kept  # only a pass read to its end is kept
