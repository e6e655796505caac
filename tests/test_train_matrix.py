"""{LoRA, QLoRA, full} x DeepSpeed ZeRO {0, 2, 3}, and DoRA, on 2 CPU workers, each fresh and
resumed in one run.

Every run loses a worker (SIGKILL at step 3) and has max_failures=1, so Ray Train restarts the
workers from the step-2 checkpoint: the same restore path as `--resume` (ray.train.get_checkpoint
-> HF resume_from_checkpoint), at the cost of one run instead of two. Each run must: finish all
steps exactly once after the restore (resume continues at the right step), lower the loss, and
leave an adapter/model that loads with plain transformers/PEFT.

Riders on single cells, so they cost no extra run:
- LoRA x ZeRO-2 trains with gradient accumulation (2 micro-batches), gradient checkpointing and
  a warmup: the learning rate ramps then holds, and each optimizer step consumes two micro-batches
  of data (more tokens than four of the largest packed rows could hold).
- Full x ZeRO-3 offloads the optimizer and the parameters to CPU (DeepSpeed's offload path).
- QLoRA x ZeRO-3 and DoRA x ZeRO-3 adapters, as `rayft train` wrote them, go through `rayft merge`
  and its logits verification against base + adapter.
- QLoRA x ZeRO-3 runs under a raw DeepSpeed config (the zero_stage key stays 0): the stage, and
  with it the bf16 storage the 4-bit base was quantized from, come from that config, are
  recorded in run.json, and the merge rebuilds the base from the record.
"""

from __future__ import annotations

import json

import pytest
import torch
from train_data import write_sft

from rayft.config import JobConfig
from rayft.manifest import read_manifest
from rayft.training import train
from rayft.training.dsconfig import deepspeed_config

pytestmark = pytest.mark.slow


def _run(run_dir, method: str, zero: int, lr: float = 1e-2, **training):
    deepspeed = {"zero_stage": zero}
    if (method, zero) == OFFLOAD:
        deepspeed.update(offload_optimizer=True, offload_params=True)
    if (method, zero) == RAW:
        deepspeed = {"raw_config": deepspeed_config(zero)}
    fault = {"sigkill": {"step": 3, "rank": 1, "marker": str(run_dir / "killed")}}
    cfg = JobConfig.model_validate(
        {
            "name": f"{method}-z{zero}",
            "run_dir": str(run_dir),
            "model": {"base": "tiny-llama"},
            "training": {
                "method": method,
                "max_steps": 4,
                "save_steps": 2,
                "learning_rate": lr,
                "warmup_ratio": 0.0,
                "per_device_batch_size": 2,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
                "deepspeed": deepspeed,
                **training,
            },
            "cluster": {"num_workers": 2, "max_failures": 1},
        }
    )
    return cfg, fault


def _check_run(run_dir, art) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert (run_dir / "killed").exists(), "the worker was never killed"
    assert [s for s, _ in losses] == [1, 2, 3, 4]  # restored at step 2, nothing lost or repeated
    # restored from checkpoint 2, not restarted from step 0 (seeded, that would log the same)
    assert [(r["step"], r["resumed_from"]) for r in rows if "resumed_from" in r] == [(3, 2)]
    assert losses[-1][1] < losses[0][1], losses
    assert art.summary["steps"] == 4
    return rows


def _load_adapter(adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), adapter_dir)


MATRIX = [(m, z) for m in ("lora", "qlora", "full") for z in (0, 2, 3)] + [("dora", 0), ("dora", 3)]
ACCUMULATE = ("lora", 2)
OFFLOAD = ("full", 3)
RAW = ("qlora", 3)
MERGE = {("qlora", 3), ("dora", 3)}
ACCUMULATION = {
    "gradient_accumulation_steps": 2,
    "gradient_checkpointing": True,
    "lr_scheduler": "constant_with_warmup",
    "warmup_ratio": 0.5,
}


def _check_accumulation(run_dir, rows: list[dict]) -> None:
    """Warmup over 2 of 4 steps: HF logs the LR each step ran with, 0 then half, then the full
    LR from step 3 on (after the restore at step 2: the scheduler came back). 2 workers x 2 micro-batches x 2 rows
    per step: more tokens at step 1 than the 4 largest packed rows hold."""
    import pyarrow.parquet as pq

    train = [r for r in rows if "loss" in r]
    assert [r["learning_rate"] for r in train] == pytest.approx([0.0, 5e-3, 1e-2, 1e-2])
    lengths = sorted(
        len(ids)
        for ids in pq.read_table(run_dir / "data" / "packed" / "train.parquet")[
            "input_ids"
        ].to_pylist()
    )
    assert train[0]["tokens"] > sum(lengths[-4:]), (train[0]["tokens"], lengths[-4:])


@pytest.mark.parametrize(("method", "zero"), MATRIX)
def test_method_x_zero_fresh_and_resumed(
    ray_local, tiny_model, tmp_path, monkeypatch, method, zero
):
    write_sft(tmp_path, tiny_model, n_train=64, n_val=0)
    extra = ACCUMULATION if (method, zero) == ACCUMULATE else {}
    cfg, fault = _run(tmp_path, method, zero, lr=1e-3 if method == "full" else 1e-2, **extra)
    monkeypatch.setenv("RAYFT_TRAIN_FAULT", json.dumps(fault))
    art = train(cfg)
    rows = _check_run(tmp_path, art)
    # what ran, as DeepSpeed, bitsandbytes and transformers report it in each worker
    offloaded = ["offload_optimizer", "offload_param"] if (method, zero) == OFFLOAD else []
    for w in json.loads((tmp_path / "workers.json").read_text()):
        assert w["deepspeed_stage"] == (zero or None), w
        assert w["deepspeed_offload"] == offloaded, w
        assert w["quantized_4bit"] == (method == "qlora"), w
        assert w["gradient_checkpointing"] == bool(extra), w
    if extra:
        _check_accumulation(tmp_path, rows)
    facts = read_manifest(tmp_path)["stages"]["train"]["facts"]
    assert (facts["method"], facts["deepspeed"]["zero_stage"]) == (method, zero), facts
    assert facts["deepspeed"]["raw_config"] == ((method, zero) == RAW)
    assert facts["tokenizer"]["path"] == ("model" if method == "full" else "adapter")
    if method == "qlora":
        storage = "bfloat16" if zero == 3 else "uint8"
        assert facts["quantization"]["storage_dtype"] == storage, facts
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    if method == "full":
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tmp_path / "model")
        base = AutoModelForCausalLM.from_pretrained(tiny_model)
        assert not torch.allclose(model(ids).logits, base(ids).logits)
    else:
        model = _load_adapter(tmp_path / "adapter")
        assert model.peft_config["default"].use_dora == (method == "dora")
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and all(p.abs().sum() > 0 for p in lora_b)
    if (method, zero) in MERGE:
        from rayft.export import merge

        merged = merge(cfg)  # raises VerificationError if merged != base + adapter
        stage = read_manifest(tmp_path)["stages"]["merge"]
        assert stage["verification"]["passed"], stage
        assert stage["facts_from"] == "train"
        if method == "qlora":  # quantized from the recorded bf16 storage, as training did
            assert stage["quantized_from"] == "bfloat16", stage
        assert (merged / "config.json").exists() and list(merged.glob("*.safetensors"))
