"""GRPO with a grader, KTO, a reward model and early stopping, each trained by `rayft train` in
Ray Train workers on tiny-llama (1 worker; the 2-worker ZeRO runs are in test_train_rl_zero.py).

Each test checks what would break if the objective were wired wrongly, from outside TRL where it
can: the GRPO policy's own greedy answers score higher with the same grader than the base's;
KTO's first loss is 0.5 (policy == reference with LoRA B = 0); the reward model's score head
comes back from the adapter and ranks held-out pairs; early stopping ends an overfitting run at
the step the rule says and the adapter holds that step's weights.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from train_data import chat_rows, write_preference, write_prompts, write_sft, write_unpaired

from rayft.config import JobConfig
from rayft.graders import build, grade
from rayft.training import train

pytestmark = pytest.mark.slow

DIGITS = "def grade(sample, item):\n    s = sample['output_text']\n    return sum(c.isdigit() for c in s) / max(len(s), 1)\n"
# The reward: mostly the share of digits in the answer; a tenth for containing the row's
# `answer` (read from the item), so a multi grader's parts and item templates are exercised.
GRADER = {
    "type": "multi",
    "name": "numbers",
    "graders": {
        "digits": {"type": "python", "source": DIGITS},
        "has_answer": {
            "type": "string_check",
            "input": "{{sample.output_text}}",
            "reference": "{{item.answer}}",
            "operation": "like",
        },
    },
    "calculate_output": "0.9 * digits + 0.1 * has_answer",
}


def _cfg(run_dir, **training) -> JobConfig:
    return JobConfig.model_validate(
        {
            "name": "rl",
            "run_dir": str(run_dir),
            "model": {"base": "tiny-llama"},
            "cluster": {"num_workers": 1},
            "training": {"warmup_ratio": 0.0, **training},
        }
    )


def _rows(path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _greedy(model, tok, prompt: str, n: int = 16) -> str:
    ids = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt",
        return_dict=True,
    )  # fmt: skip
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=n, do_sample=False)
    return tok.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def test_grpo_reward_rises_and_the_policy_answers_better(ray_local, tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    train_rows = [{"prompt": f"Count to {i}", "answer": "1"} for i in range(8)]
    val_rows = [{"prompt": f"Count to {i}", "answer": "1"} for i in range(8, 12)]
    write_prompts(tmp_path, {"train": train_rows, "validation": val_rows})
    art = train(
        _cfg(
            tmp_path, objective="grpo", method="full", max_steps=24, learning_rate=1e-2,
            lr_scheduler="constant", eval_steps=12, per_device_batch_size=8, grader=GRADER,
            grpo={"num_generations": 8, "max_completion_length": 16, "beta": 0.01},
        )
    )  # fmt: skip
    rows = _rows(tmp_path / "metrics.jsonl")
    steps = [r for r in rows if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 25))
    for key in ("reward", "reward_std", "rewards/numbers/mean", "kl", "completions/mean_length"):
        assert all(key in r for r in steps), (key, steps[0])
    assert all("grader/digits" in r and "grader/has_answer" in r for r in steps), steps[0]
    assert sum(r["grader_errors"] for r in steps) == 0
    rewards = art.summary["rewards"]
    assert rewards["last_quarter_mean"] > rewards["first_quarter_mean"] + 0.3, rewards
    assert rewards["eval_last"] > rewards["eval_first"], rewards
    assert [r["step"] for r in rows if "eval_reward" in r] == [12, 24]

    # Outside TRL: the saved policy's greedy answers, graded by the same grader, beat the base's.
    tok = AutoTokenizer.from_pretrained(tiny_model)
    grader = build(GRADER, allow_python=True)
    prompts = [r["prompt"] for r in val_rows]
    items = [{"answer": r["answer"]} for r in val_rows]

    def mean_score(path) -> float:
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        answers = [{"output_text": _greedy(model, tok, p)} for p in prompts]
        return sum(grade(grader, answers, items).scores) / len(prompts)

    tuned, base = mean_score(tmp_path / "model"), mean_score(tiny_model)
    assert tuned > base + 0.3, (tuned, base)


def test_grpo_refuses_a_job_it_cannot_run(tiny_model, tmp_path):
    from rayft.training.checks import problems

    write_prompts(tmp_path, {"train": [{"prompt": "hi"}]})
    found = problems(_cfg(tmp_path, objective="grpo", per_device_batch_size=3), "prompt")
    assert any("needs training.grader" in p for p in found), found
    assert any("num_generations (4) must divide" in p for p in found), found
    bad = {"type": "string_check", "name": "x", "input": "{{sample.output_text}}",
           "reference": "a", "operation": "equals"}  # fmt: skip
    found = problems(
        _cfg(tmp_path, objective="grpo", per_device_batch_size=4, grader=bad), "prompt"
    )
    assert any("training.grader.operation" in p for p in found), found
    found = problems(_cfg(tmp_path, objective="grpo"), "sft")
    assert any("trains on prompt-only rows" in p for p in found), found


def test_kto_learns_good_from_bad_completions(ray_local, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def rows(n: int, seed: int) -> list[dict]:
        out = []
        for m in chat_rows(n, seed):
            out.append({"prompt": m[0]["content"], "completion": m[1]["content"], "label": True})
            out.append({"prompt": m[0]["content"], "completion": "I do not know.", "label": False})
        return out

    write_unpaired(tmp_path, {"train": rows(16, 0), "validation": rows(4, 1)})
    art = train(
        _cfg(tmp_path, objective="auto", max_steps=12, learning_rate=1e-2, eval_steps=6,
             per_device_batch_size=4)
    )  # fmt: skip
    assert art.summary["objective"] == "kto"  # auto: unpaired rows train KTO
    steps = [r for r in _rows(tmp_path / "metrics.jsonl") if "loss" in r]
    # LoRA's B starts at 0: the policy is the reference, every implied reward is 0, and KTO's
    # loss is 1 - sigmoid(0) for every row
    assert steps[0]["loss"] == pytest.approx(0.5, abs=1e-4)
    assert steps[-1]["loss"] < 0.4 and steps[-1]["rewards/margins"] > 0.5, steps[-1]

    tok = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tuned = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tiny_model), tmp_path / "adapter"
    ).eval()
    msgs = chat_rows(4, 1)

    def margin(model) -> float:  # log p(good) - log p(bad), summed over held-out prompts
        return sum(
            _logp(model, tok, m[0]["content"], m[1]["content"])
            - _logp(model, tok, m[0]["content"], "I do not know.")
            for m in msgs
        )

    assert margin(tuned) > margin(base) + 1.0, (margin(tuned), margin(base))


def _logp(model, tok, prompt: str, answer: str) -> float:
    head = tok.apply_chat_template(
        [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
    )
    start = len(tok(head, add_special_tokens=False).input_ids)
    ids = tok(head + answer, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1].float()
    logp = logits.log_softmax(-1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    return float(logp[start - 1 :].sum())


def test_reward_model_ranks_held_out_pairs_and_grades(ray_local, tiny_model, tmp_path):
    write_preference(tmp_path, n_train=32, n_val=8)
    art = train(
        _cfg(tmp_path, objective="reward", max_steps=12, learning_rate=1e-2, eval_steps=6,
             per_device_batch_size=4)
    )  # fmt: skip
    adapter = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and "score" in str(adapter["modules_to_save"])
    acc = art.summary["reward_accuracy"]  # the 8 test pairs, scored after training
    assert acc["n"] == 8 and acc["accuracy"] > 0.5 and acc["ci95"][0] > 0.5, acc

    # As a grader: the trained answer style scores above the refusal, in its conversation.
    grader = build({"type": "reward_model", "name": "rm", "path": str(tmp_path / "adapter")})
    prompt = [{"role": "user", "content": "My order has a problem. Ticket 99."}]
    good = '{"category": "shipping", "priority": "low"}'
    scores = grade(
        grader,
        [
            {"output_text": good, "prompt": prompt},
            {"output_text": "I do not know.", "prompt": prompt},
        ],
        [{}, {}],
    )
    assert scores.scores[0] > 0.5 > scores.scores[1], scores


def test_early_stopping_ends_an_overfitting_run_at_its_best_checkpoint(
    ray_local, tiny_model, tmp_path
):
    """4 training rows, full fine-tuning at a high constant LR: the training loss keeps falling
    while the validation loss turns up; patience 2 ends the run two evaluations after its best."""
    write_sft(tmp_path, tiny_model, n_train=4, n_val=8)
    art = train(
        _cfg(tmp_path, method="full", max_steps=60, learning_rate=1e-2, lr_scheduler="constant",
             eval_steps=2, per_device_batch_size=2,
             early_stopping={"patience": 2, "min_delta": 0.001})
    )  # fmt: skip
    rows = _rows(tmp_path / "metrics.jsonl")
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    stop = art.summary["early_stopping"]
    assert stop["stopped"] and stop["stopped_at"] < 60, stop
    best_step, best = min(evals, key=lambda e: e[1])
    assert (stop["best_step"], stop["best"]) == (best_step, pytest.approx(best)), (stop, evals)
    after = [loss for step, loss in evals if step > best_step]
    assert len(after) == 2 and all(loss > best - 0.001 for loss in after), evals
    assert evals[-1][0] == stop["stopped_at"] == max(r["step"] for r in rows)
    train_loss = {r["step"]: r["loss"] for r in rows if "loss" in r}
    assert train_loss[stop["stopped_at"]] < train_loss[best_step]  # still falling: overfitting
    assert "did not fall" in stop["reason"] and f"step {best_step}" in stop["reason"]

    # The model is the best step's checkpoint, not the last one's.
    assert art.summary["checkpoint"].endswith(f"checkpoint-{best_step:06d}")
    ckpts = tmp_path / "checkpoints" / "rl"
    ours = load_file(tmp_path / "model" / "model.safetensors")
    kept = load_file(ckpts / f"checkpoint-{best_step:06d}" / "model.safetensors")
    last = load_file(ckpts / f"checkpoint-{stop['stopped_at']:06d}" / "model.safetensors")
    assert all(torch.equal(ours[k], kept[k]) for k in ours)
    assert any(not torch.equal(ours[k], last[k]) for k in ours)
    assert not math.isnan(art.summary["final_eval_loss"])
