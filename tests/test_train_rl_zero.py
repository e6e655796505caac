"""GRPO on 2 CPU workers under DeepSpeed: LoRA with ZeRO-2, and QLoRA with ZeRO-3, each losing a
worker after its first checkpoint and restored from it (the `--resume` path).

A GRPO step groups the generations of one prompt across both workers (2 per worker, 4 per
group) and gathers their rewards before the advantages: with the group split wrongly, or a
worker's rollouts graded against another prompt's item, TRL raises or the steps do not line up.
Each run must log steps 1-4 exactly once across the restore, record the DeepSpeed stage and the
4-bit base that really ran, carry the grader's reward in every step, and leave an adapter whose
LoRA B matrices moved.
"""

from __future__ import annotations

import json

import pytest
from train_data import write_prompts

from rayft.config import JobConfig
from rayft.training import train

pytestmark = pytest.mark.slow

GRADER = {
    "type": "text_similarity",
    "name": "close",
    "input": "{{sample.output_text}}",
    "reference": "{{item.answer}}",
    "evaluation_metric": "fuzzy_match",
}


@pytest.mark.parametrize(("method", "zero"), [("lora", 2), ("qlora", 3)])
def test_grpo_two_workers_under_zero_restored(
    ray_local, tiny_model, tmp_path, monkeypatch, method, zero
):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rows = [{"prompt": f"Spell {w}", "answer": w} for w in ("apple", "pear", "plum", "fig")]
    write_prompts(tmp_path, {"train": rows * 2})
    fault = {"sigkill": {"step": 3, "rank": 1, "marker": str(tmp_path / "killed")}}
    monkeypatch.setenv("RAYFT_TRAIN_FAULT", json.dumps(fault))
    cfg = JobConfig.model_validate(
        {
            "name": f"grpo-{method}-z{zero}",
            "run_dir": str(tmp_path),
            "model": {"base": "tiny-llama"},
            "cluster": {"num_workers": 2, "max_failures": 1},
            "training": {
                "objective": "grpo",
                "method": method,
                "max_steps": 4,
                "save_steps": 2,
                "learning_rate": 1e-2,
                "warmup_ratio": 0.0,
                "per_device_batch_size": 2,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "deepspeed": {"zero_stage": zero},
                "grader": GRADER,
                "grpo": {"num_generations": 4, "max_completion_length": 8},
            },
        }
    )
    art = train(cfg)
    metrics = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in metrics if "loss" in r]
    assert (tmp_path / "killed").exists(), "the worker was never killed"
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    assert [(r["step"], r["resumed_from"]) for r in metrics if "resumed_from" in r] == [(3, 2)]
    assert all(0.0 <= r["rewards/close/mean"] <= 1.0 and "reward_std" in r for r in steps)
    assert art.summary["objective"] == "grpo" and art.summary["steps"] == 4
    for w in json.loads((tmp_path / "workers.json").read_text()):
        assert w["deepspeed_stage"] == zero, w
        assert w["quantized_4bit"] == (method == "qlora"), w

    adapter = tmp_path / "adapter"
    base = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter)
    lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
