"""What a finished run leaves in the run dir: adapter/ or model/, the model card, the summary."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from rayft.config import JobConfig

# Files of an HF checkpoint that only resuming needs; everything else is the model.
_TRAINING_STATE = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "training_args.bin",
                   "latest", "zero_to_fp32.py", "zero_to_torch.py", "README.md")  # fmt: skip


def export_model(checkpoint_dir: Path, dest: Path, base_path: str, peft: bool) -> Path:
    """Copy the weights and tokenizer of a checkpoint into `dest` (replacing it atomically)."""
    tmp = dest.with_name(f".{dest.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for p in checkpoint_dir.iterdir():
        if p.is_file() and p.name not in _TRAINING_STATE and not p.name.startswith("rng_state"):
            shutil.copy2(p, tmp / p.name)
    if peft:
        cfg_path = tmp / "adapter_config.json"
        adapter_cfg = json.loads(cfg_path.read_text())
        # Where the base was loaded from, so PeftModel.from_pretrained finds it with no rayft code.
        adapter_cfg["base_model_name_or_path"] = base_path
        cfg_path.write_text(json.dumps(adapter_cfg, indent=2) + "\n")
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def summarize(rows: list[dict[str, Any]], wall_s: float, **extra: Any) -> dict[str, Any]:
    """train_summary.json from this session's metrics rows."""

    def last(key: str) -> float | None:
        return next((r[key] for r in reversed(rows) if key in r), None)

    steps = int(last("step") or 0)
    tokens = int(last("tokens") or 0)
    first_tokens = next((r["tokens"] for r in rows if "tokens" in r), 0)
    runtime = last("train_runtime") or wall_s
    return {
        "steps": steps,
        "tokens": tokens,
        "train_time_s": round(wall_s, 2),
        "train_runtime_s": round(runtime, 2),
        "final_loss": last("loss"),
        "final_eval_loss": last("eval_loss"),
        "final_eval_perplexity": last("eval_perplexity"),
        "tokens_per_s": round((tokens - first_tokens) / runtime, 1) if runtime else None,
        **extra,
    }


def reward_summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """GRPO: mean reward over the first and the last quarter of the logged steps, the held-out
    reward at the first and last evaluation, and how many samples the grader failed on."""
    train = [r["reward"] for r in rows if "reward" in r and "loss" in r]
    evals = [r["eval_reward"] for r in rows if "eval_reward" in r]
    q = max(len(train) // 4, 1)
    mean = lambda xs: round(sum(xs) / len(xs), 4) if xs else None  # noqa: E731
    return {
        "first_quarter_mean": mean(train[:q]),
        "last_quarter_mean": mean(train[-q:]),
        "eval_first": evals[0] if evals else None,
        "eval_last": evals[-1] if evals else None,
        "grader_errors": sum(r.get("grader_errors", 0.0) for r in rows if "loss" in r),
    }


def planned_vs_measured(cfg: JobConfig, workers: list[dict[str, Any]]) -> dict[str, Any] | None:
    """`rayft plan`'s memory per worker for this job beside the largest peak a worker reported
    (GPU: torch's allocations; CPU: the process's resident set, runtime included)."""
    from rayft.plan.job import plan
    from rayft.plan.shapes import ShapeError

    try:
        planned = plan(cfg)
    except ShapeError:
        return None
    peak = max((w.get("peak_memory_gib") or 0.0 for w in workers), default=0.0)
    per = planned["per_gpu_gib"]
    return {
        "device": planned["device"],
        "planned_gib": per,
        "measured_peak_gib": peak,
        "measured_over_planned": round(peak / per, 3) if per and peak else None,
        "measured": "torch.cuda.max_memory_allocated" if planned["device"] != "cpu"
        else "peak resident set of the worker process (Python and libraries included)",
    }  # fmt: skip


def write_card(dest: Path, cfg: JobConfig, base_path: str, data_hash: str, summary: dict) -> None:
    """Model card with lineage: base, data hash, config, results."""
    t = cfg.training
    kind = "LoRA adapter" if t.method != "full" else "fully fine-tuned model"
    loader = (
        f'PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained("{base_path}"), "{dest}")'
        if t.method != "full"
        else f'AutoModelForCausalLM.from_pretrained("{dest}")'
    )
    text = f"""---
base_model: {cfg.model.base}
library_name: {"peft" if t.method != "full" else "transformers"}
tags: [rayft, {t.method}, {summary.get("objective", "sft")}]
---
# {cfg.name}: {kind} of `{cfg.model.base}`

Fine-tuned by rayft on {time.strftime("%Y-%m-%d", time.gmtime())}.

## Lineage
| | |
|---|---|
| base model | `{cfg.model.base}` (revision `{cfg.model.revision}`), loaded from `{base_path}` |
| data | `{cfg.run_dir}/data` (hash `{data_hash}`), files {", ".join(cfg.data.train_files) or "-"} |
| config hash | `{cfg.digest()}` |
| method | {t.method}, objective {summary.get("objective")}, ZeRO stage {summary.get("zero_stage", t.deepspeed.zero_stage)} |
| LoRA | r={t.lora.r}, alpha={t.lora.alpha}, dropout={t.lora.dropout}, targets={t.lora.target_modules} |
| schedule | {t.max_steps} steps, lr {t.learning_rate} ({t.lr_scheduler}), batch {t.per_device_batch_size} x {t.gradient_accumulation_steps} x {cfg.cluster.num_workers} workers |

## Results
| steps | tokens | final loss | final eval loss | tokens/s |
|---|---|---|---|---|
| {summary["steps"]} | {summary["tokens"]} | {summary["final_loss"]} | {summary["final_eval_loss"]} | {summary["tokens_per_s"]} |

## Use
```python
from transformers import AutoModelForCausalLM
from peft import PeftModel
model = {loader}
```
"""
    (dest / "README.md").write_text(text)
