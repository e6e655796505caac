"""DPO with LoRA on 2 CPU workers, on preference data written by the real `rayft prepare`.

One run covers the objective end to end: prepare (preference format) -> DPOTrainer in Ray Train
workers -> a worker SIGKILLed after the first checkpoint -> restored from it -> a PEFT adapter.
Checks that would fail if DPO were wired wrongly:
- step 1 loss is ln 2: with LoRA B = 0 the policy equals the reference (the base with the adapter
  disabled), so every pair's implicit reward margin is 0 and -log sigmoid(0) = ln 2;
- the loss goes down and every step is logged exactly once across the restore;
- the saved adapter, loaded with plain PEFT, prefers the chosen answers over the rejected ones
  by more than the base does (measured here, outside TRL, on sequence log-probabilities).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from rayft.config import JobConfig
from rayft.data import prepare
from rayft.training import train

pytestmark = pytest.mark.slow

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "data" / "support.jsonl"
REJECTED = "Sorry, I cannot help with that."


def _pairs(n: int) -> list[dict[str, str]]:
    out = []
    for line in EXAMPLES.read_text().splitlines()[:n]:
        msgs = json.loads(line)["messages"]
        user = next(m["content"] for m in msgs if m["role"] == "user")
        answer = next(m["content"] for m in msgs if m["role"] == "assistant")
        out.append({"prompt": user, "chosen": answer, "rejected": REJECTED})
    return out


def _seq_logp(model, tok, prompt: str, answer: str) -> float:
    head = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    prompt_ids = tok(head, add_special_tokens=False).input_ids
    ids = tok(head + answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[len(prompt_ids) - 1 :].sum())


def test_dpo_lora_prepare_train_restore(ray_local, tiny_model, tmp_path, monkeypatch):
    pairs = _pairs(60)
    src = tmp_path / "prefs.jsonl"
    src.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    cfg = JobConfig.model_validate(
        {
            "name": "dpo",
            "run_dir": str(tmp_path),
            "model": {"base": "tiny-llama"},
            "data": {
                "train_files": [str(src)],
                "format": "auto",
                "max_seq_len": 256,
                "split": {"validation": 0.15, "test": 0.0},
            },
            "training": {
                "method": "lora",
                "max_steps": 6,
                "save_steps": 3,
                "learning_rate": 2e-2,
                "warmup_ratio": 0.0,
                "per_device_batch_size": 2,
                "dpo_beta": 0.1,
                "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            },
            "cluster": {"num_workers": 2, "max_failures": 1},
        }
    )
    assert prepare(cfg).report["kind"] == "preference"
    fault = {"sigkill": {"step": 4, "rank": 1, "marker": str(tmp_path / "killed")}}
    monkeypatch.setenv("RAYFT_TRAIN_FAULT", json.dumps(fault))
    art = train(cfg)

    assert (tmp_path / "killed").exists(), "the worker was never killed"
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4, 5, 6]
    assert [(r["step"], r["resumed_from"]) for r in rows if "resumed_from" in r] == [(4, 3)]
    assert losses[0][1] == pytest.approx(math.log(2), abs=1e-3)
    assert losses[-1][1] < losses[0][1] - 0.05, losses
    assert any("eval_loss" in r for r in rows)
    assert art.summary["objective"] == "dpo"
    assert art.summary["steps"] == 6
    # Tokens come from TRL's own DPO count (HF's counter sees no input_ids in DPO batches);
    # no perplexity: exp of a preference loss is not one.
    assert art.summary["tokens"] > 0 and art.summary["tokens_per_s"] > 0, art.summary
    assert all("eval_perplexity" not in r for r in rows)
    assert art.summary["final_eval_perplexity"] is None

    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    adapter_dir = tmp_path / "adapter"
    base_path = json.loads((adapter_dir / "adapter_config.json").read_text())[
        "base_model_name_or_path"
    ]
    tok = AutoTokenizer.from_pretrained(base_path)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), adapter_dir)
    model.eval()
    gains = []
    for p in pairs[:8]:
        tuned = _seq_logp(model, tok, p["prompt"], p["chosen"]) - _seq_logp(
            model, tok, p["prompt"], p["rejected"]
        )
        with model.disable_adapter():
            base = _seq_logp(model, tok, p["prompt"], p["chosen"]) - _seq_logp(
                model, tok, p["prompt"], p["rejected"]
            )
        gains.append(tuned - base)
    assert sum(gains) / len(gains) > 0.5, gains
