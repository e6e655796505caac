"""rayft.adapters, the one adapter check of merge, eval and serving: the rules that only one of
them had before it, now applied by all (serving's side here; merge's in test_export)."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rayft.adapters import (
    WEIGHTS,
    AdapterError,
    base_linears,
    check_compatible,
    resolve_adapter,
)


def _adapter(base: str, out: Path, dora: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], use_dora=dora)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _rewrite(path: Path, change) -> None:
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata={"format": "pt"})


@pytest.fixture(scope="module")
def linears(tiny_model) -> dict[str, tuple[int, int]]:
    return base_linears(tiny_model)


def test_a_dora_magnitude_that_does_not_fit_the_base_is_refused(tiny_model, tmp_path, linears):
    """Serving read only lora_A/lora_B: a DoRA magnitude vector of another width passed its
    check and failed (or broadcast) inside the engine."""
    from rayft.serving.errors import AdapterRefused

    path = _adapter(tiny_model, tmp_path / "dora", dora=True)
    assert check_compatible(path, linears, max_rank=64)["dora"]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"
    _rewrite(path, lambda t: t.update({key: t[key][:32].clone()}))
    with pytest.raises(
        AdapterError, match=r"q_proj's DoRA magnitude is \[32\] in the adapter"
    ) as e:
        check_compatible(path, linears, max_rank=64)
    refused = AdapterRefused.of(e.value)  # what the server answers: a 400 naming the field
    assert refused.status == 400 and refused.body()["error"]["param"] == "path"
    assert pickle.loads(pickle.dumps(e.value)).param == "path"  # crosses Ray processes intact


def test_a_saved_layer_weight_of_another_shape_is_refused(tiny_model, tmp_path, linears):
    """Whole weights saved with the adapter (modules_to_save) must fit the layer they replace."""
    path = _adapter(tiny_model, tmp_path / "a", dora=False)
    key = "base_model.model.model.layers.0.self_attn.o_proj.weight"
    _rewrite(path, lambda t: t.update({key: torch.zeros(64, 32)}))
    with pytest.raises(AdapterError, match=r"o_proj's saved weight is \[64, 32\] .* \[64, 64\]"):
        check_compatible(path, linears, max_rank=64)


def test_corrupted_files_are_named_with_their_line(tiny_model, tmp_path, linears):
    """Serving answered a broken adapter_config.json or a truncated weights file with a bare
    parser error; now with the file (and line) and what is wrong, as merge did."""
    path = _adapter(tiny_model, tmp_path / "a", dora=False)
    config = path / "adapter_config.json"
    good = config.read_text()
    config.write_text('{\n  "peft_type": "LORA",\n  "r": 4,,\n}')
    with pytest.raises(AdapterError, match=r"adapter_config.json:3:\d+: not valid JSON"):
        check_compatible(path, linears, max_rank=64)
    config.write_text(good)
    weights = path / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(AdapterError, match="not a readable safetensors file.*corrupted"):
        check_compatible(path, linears, max_rank=64)


def test_a_pt_pickle_is_refused_like_a_bin(tiny_model, tmp_path):
    root = tmp_path / "root"
    path = _adapter(tiny_model, root / "pt", dora=False)
    (path / WEIGHTS).unlink()
    (path / "adapter_model.pt").write_bytes(b"\x80\x04never unpickled")
    with pytest.raises(AdapterError, match="adapter_model.pt: adapter weights are a pickle"):
        resolve_adapter("pt", root, tmp_path / "cache")
