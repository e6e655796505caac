"""One TRL trainer per objective: its TrainingArguments subclass and its constructor call.

Runs inside the Ray Train worker. The worker builds the model, the datasets and the callbacks;
this module only knows what each TRL trainer takes: SFT and DPO as before, GRPO (and RLOO) with
a grader as the reward function, KTO from unpaired rows, and a reward model (a sequence
classification head) from preference pairs.
"""

from __future__ import annotations

import json
from typing import Any

# Objectives whose TRL trainer tokenizes its whole dataset up front (a finite Dataset per
# worker); sft streams, grpo holds the full prompt set on every worker (see `datasets`).
FINITE = ("dpo", "kto", "reward")


def training_args(objective: str, config: dict[str, Any], output_dir: str):
    hf = dict(config["hf"], output_dir=output_dir, deepspeed=config["ds_config"])
    if config.get("early_stopping"):
        # The stop rule's state (best value, evaluations since) travels with each checkpoint.
        hf["restore_callback_states_from_checkpoint"] = True
    if objective == "dpo":
        from trl import DPOConfig

        # Preference rows are text: DPOTrainer applies the chat template and tokenizes them.
        # With PEFT the reference model is the base with the adapter disabled (no second copy).
        return DPOConfig(
            **hf, beta=config["dpo_beta"], max_length=config["max_seq_len"], dataset_num_proc=None
        )
    if objective == "kto":
        from trl import KTOConfig

        k = config["kto"]
        return KTOConfig(
            **hf,
            beta=k["beta"],
            desirable_weight=k["desirable_weight"],
            undesirable_weight=k["undesirable_weight"],
            max_length=config["max_seq_len"],
            dataset_num_proc=None,
        )
    if objective == "reward":
        from trl import RewardConfig

        return RewardConfig(**hf, max_length=config["max_seq_len"], dataset_num_proc=None)
    if objective == "grpo":
        return _grpo_args(hf, config)
    from trl import SFTConfig

    # Rows are already tokenized, masked and packed by `rayft prepare`: TRL must not redo it.
    return SFTConfig(**hf, dataset_kwargs={"skip_prepare_dataset": True})


def _grpo_args(hf: dict[str, Any], config: dict[str, Any]):
    g = config["grpo"]
    # An evaluation batch of one full group per worker always divides evenly between groups.
    hf["per_device_eval_batch_size"] = g["num_generations"]
    common = {
        "num_generations": g["num_generations"],
        "max_completion_length": g["max_completion_length"],
        "temperature": g["temperature"],
        "top_p": g["top_p"],
        "beta": g["beta"],
        "use_vllm": g["use_vllm"],
        "log_completions": False,
    }
    if g["use_vllm"]:
        common["vllm_mode"] = "colocate"
    if g["algorithm"] == "rloo":
        from trl import RLOOConfig

        return RLOOConfig(**hf, **common)
    from trl import GRPOConfig

    return GRPOConfig(**hf, **common, loss_type=g["loss_type"], scale_rewards=g["scale_rewards"])


def build(objective: str, common: dict[str, Any], config: dict[str, Any], collate=None):
    """The TRL trainer for `objective` from the keyword arguments every trainer takes."""
    if objective == "dpo":
        from trl import DPOTrainer

        return DPOTrainer(**common)
    if objective == "kto":
        from trl import KTOTrainer

        return KTOTrainer(**common)
    if objective == "reward":
        from trl import RewardTrainer

        return RewardTrainer(**common)
    if objective == "grpo":
        reward = grader_reward(config["grader"], config["grpo"])
        if config["grpo"]["algorithm"] == "rloo":
            from trl import RLOOTrainer

            return RLOOTrainer(**common, reward_funcs=[reward])
        from trl import GRPOTrainer

        return GRPOTrainer(**common, reward_funcs=[reward])
    from datasets import Dataset
    from trl import SFTTrainer

    # SFTTrainer reads the first row of its train dataset to detect images; on the Ray
    # shard that starts a Ray Data execution of the split, which it then abandons (6-9 s of
    # the quickstart's start-up). So it is built over a one-row stand-in and handed the
    # shard after; rayft's own loaders (worker._read_own_shard) read `trainer.train_dataset`.
    train_ds = common["train_dataset"]
    feats = train_ds.features
    stand_in = Dataset.from_list([{c: [0] for c in feats}], features=feats)
    trainer = SFTTrainer(**{**common, "train_dataset": stand_in}, data_collator=collate)
    trainer.train_dataset = train_ds
    return trainer


def grader_reward(spec: dict[str, Any], grpo: dict[str, Any]):
    """The grader as a TRL reward function: one score per completion, graded against the row's
    `item`. A sample the grader fails on scores 0 and is counted (`grader_errors`), and each
    part of a `multi` grader is logged as `grader/<name>` beside TRL's own reward metrics."""
    import os

    from rayft.graders import build as build_grader
    from rayft.graders import grade

    key = os.environ.get(grpo["api_key_env"]) if grpo.get("api_key_env") else None
    # A job file is the user's own: its python grader runs here (the fine-tuning service
    # refuses python graders before a job exists).
    grader = build_grader(
        spec, where="training.grader", allow_python=True, base_url=grpo.get("base_url"),
        api_key=key,
    )  # fmt: skip

    def reward(prompts, completions, item=None, log_metric=None, **_: Any) -> list[float]:
        texts = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        items = [json.loads(x) if x else {} for x in item] if item else [{} for _ in texts]
        # The prompt rides along for graders that read the whole conversation (reward_model).
        samples = [{"output_text": t, "prompt": p} for t, p in zip(texts, prompts, strict=True)]
        scores = grade(grader, samples, items)
        if log_metric is not None:
            log_metric("grader_errors", float(scores.error_count))
            if len(scores.parts) > 1:
                for name, values in scores.parts.items():
                    log_metric(f"grader/{name}", sum(values) / max(len(values), 1))
        return [float(s) for s in scores.scores]

    # TRL logs each reward function's mean and std under its name: rewards/<grader name>/mean
    reward.__name__ = grader.name or grader.type
    return reward
