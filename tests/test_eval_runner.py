"""The Ray Data callable class of eval, called in-process: NLL, left padding, sampling seed,
adapter arms (LoRA and DoRA) scored with the adapter the engine serves."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_serve_units import make_adapter, native_answer
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayft.adapters import fingerprint
from rayft.evaluation.generate import ArmRunner


def _runner(model: str, adapter=None, **kw) -> ArmRunner:
    args = {"max_new_tokens": 10, "do_sample": False, "temperature": 1.0, "seed": 0, **kw}
    return ArmRunner(model, adapter, max_lora_rank=64, **args)


def _batch(prompts: list[str], refs: list[str], kinds: list[str] | None = None) -> dict:
    kinds = kinds or ["test"] * len(prompts)
    return {
        "idx": np.arange(len(prompts)),
        "kind": np.array(kinds, dtype=object),
        "prompt": np.array(
            [json.dumps([{"role": "user", "content": p}]) if p else "" for p in prompts],
            dtype=object,
        ),
        "reference": np.array(refs, dtype=object),
    }


def test_nll_scores_only_the_answer_tokens(tiny_model):
    out = _runner(tiny_model)(
        _batch(
            ["short?", "a much longer question here?", ""],
            ["yes", "no, it is not", "The sea."],
            ["test", "test", "text"],
        )
    )
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    for i, (q, a) in enumerate(
        [("short?", "yes"), ("a much longer question here?", "no, it is not")]
    ):
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        p = tok(text, add_special_tokens=False)["input_ids"]
        t = tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            mean = model(
                input_ids=torch.tensor([p + t]), labels=torch.tensor([[-100] * len(p) + t])
            ).loss.item()
        assert out["n_tokens"][i] == len(t)
        assert out["nll_sum"][i] == pytest.approx(mean * len(t), rel=1e-4)
    # Plain text: every token but the first is predicted from the ones before it.
    ids = tok("The sea.", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        mean = model(input_ids=torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert out["n_tokens"][2] == len(ids) - 1
    assert out["nll_sum"][2] == pytest.approx(mean * (len(ids) - 1), rel=1e-4)
    assert out["answer"][2] == ""  # general text is scored, not answered


def test_batched_left_padded_generation_matches_one_by_one(tiny_model):
    runner = _runner(tiny_model)
    prompts = ["hi", "where is my order number 12345 please tell me", "refund?"]
    batched = runner(_batch(prompts, ["x"] * 3))["answer"]
    alone = [runner(_batch([p], ["x"]))["answer"][0] for p in prompts]
    assert list(batched) == alone
    assert len(set(alone)) > 1  # the prompts really lead to different answers


def test_sampling_is_seeded(tiny_model):
    batch = _batch(["hello there", "my order"], ["x", "x"])
    first = _runner(tiny_model, do_sample=True, seed=3)(batch)["answer"]
    again = _runner(tiny_model, do_sample=True, seed=3)(batch)["answer"]
    other = _runner(tiny_model, do_sample=True, seed=4)(batch)["answer"]
    greedy = _runner(tiny_model)(batch)["answer"]
    assert list(first) == list(again)
    assert list(first) != list(other) and list(first) != list(greedy)


@pytest.mark.parametrize("dora", [False, True])
def test_adapter_arm_answers_and_scores_with_its_adapter(tiny_model, tmp_path, dora):
    """The NLL pass must see the adapter the answers came from: LoRA layers run through the
    engine's batched hooks and DoRA through its merged copy, neither of which `engine.model`
    alone applies."""
    from peft import PeftModel

    path = make_adapter(tiny_model, tmp_path / "a", seed=5, dora=dora)
    prompts, refs = ["where is my order?", "refund please"], ["it shipped", "done"]
    out = _runner(tiny_model, fingerprint("a", path))(_batch(prompts, refs))
    base = _runner(tiny_model)(_batch(prompts, refs))
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), path)
    for i, (q, a) in enumerate(zip(prompts, refs, strict=True)):
        text = tok.apply_chat_template(
            [{"role": "user", "content": q}], add_generation_prompt=True, tokenize=False
        )
        p = tok(text, add_special_tokens=False)["input_ids"]
        t = tok(a, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            mean = model.eval()(
                input_ids=torch.tensor([p + t]), labels=torch.tensor([[-100] * len(p) + t])
            ).loss.item()
        assert out["nll_sum"][i] == pytest.approx(mean * len(t), rel=1e-4)
        assert out["nll_sum"][i] != pytest.approx(base["nll_sum"][i], rel=1e-3)
        assert out["answer"][i] == native_answer(tiny_model, path, p, 10)
