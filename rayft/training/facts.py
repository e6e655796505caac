"""What a training run trained with, resolved once: on the driver, from the config and the
DeepSpeed config it hands DeepSpeed. The workers build their model from these facts, and
`rayft train` records them in run.json (`stages.train.facts`, docs/contracts.md), so the stages
after it (merge, export) read what ran instead of recomputing it from a config that may have
changed, or whose keys a raw DeepSpeed config overrides.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from rayft.config import JobConfig
from rayft.dtypes import precision_dtype
from rayft.errors import RayftError
from rayft.training.dsconfig import deepspeed_config, zero_stage

NOT_RECORDED = (
    "no rayft training is recorded here, so the adapter came from elsewhere: its method, "
    "DeepSpeed stage, dtypes and 4-bit layout are taken from this config"
)


class MissingFactsError(RayftError):
    """A run directory trained by a rayft that did not record its facts yet."""


def resolve(cfg: JobConfig, ds_config: dict[str, Any] | None, base_path: str) -> dict[str, Any]:
    """The facts of training `cfg` under `ds_config` (a `deepspeed_config` result)."""
    t = cfg.training
    stage = zero_stage(ds_config)
    compute = precision_dtype(t.precision, cfg.cluster.use_gpu)
    return {
        "method": t.method,
        "use_dora": t.method == "dora",
        "base": {"id": cfg.model.base, "revision": cfg.model.revision, "path": base_path},
        "deepspeed": {
            "zero_stage": stage,
            **offloads(ds_config),
            "raw_config": t.deepspeed.raw_config is not None,
        },
        "compute_dtype": compute,
        "quantization": _quantization(cfg, stage, compute) if t.method == "qlora" else None,
    }


def for_config(cfg: JobConfig, base_path: str) -> dict[str, Any]:
    """The facts `cfg` implies, for an adapter that no rayft training recorded (made elsewhere)."""
    ds = cfg.training.deepspeed
    config = deepspeed_config(ds.zero_stage, ds.offload_optimizer, ds.offload_params, ds.raw_config)
    return resolve(cfg, config, base_path)


def offloads(ds_config: dict[str, Any] | None) -> dict[str, bool]:
    """What a resolved DeepSpeed config (a raw one's own sections) moves off the accelerator."""
    zero = (ds_config or {}).get("zero_optimization") or {}

    def moved(section: Any) -> bool:
        return isinstance(section, dict) and section.get("device", "none") != "none"

    return {
        "offload_optimizer": moved(zero.get("offload_optimizer")),
        "offload_params": moved(zero.get("offload_param")),
    }


def _quantization(cfg: JobConfig, stage: int, compute: str) -> dict[str, Any]:
    q = cfg.training.quantization
    storage = q.quant_storage
    if storage == "auto":  # ZeRO-3 flattens and shards parameters by dtype: no packed uint8
        storage = "bfloat16" if stage == 3 else "uint8"
    return {
        "quant_type": q.quant_type,
        "double_quant": q.double_quant,
        "compute_dtype": compute if q.compute_dtype == "auto" else q.compute_dtype,
        "storage_dtype": storage,
        # With a float storage dtype the other weights must share it, or ZeRO-3 mixes dtypes:
        # the base is loaded in it before quantizing, and the 4-bit codes and scales depend on
        # the dtype the weights were quantized from.
        "loaded_dtype": compute if storage == "uint8" else storage,
    }


def tokenizer_facts(tokenizer_dir: Path, run_dir: Path) -> dict[str, Any]:
    """The chat template (hash, and the tokenizer directory holding it) and the token ids that
    end an answer, of the tokenizer saved with the trained weights."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    template = tok.chat_template if isinstance(tok.chat_template, str) else None
    path, run_dir = Path(tokenizer_dir).resolve(), run_dir.resolve()
    return {
        # relative to the run directory, which may be copied or mounted elsewhere
        "path": str(path.relative_to(run_dir) if path.is_relative_to(run_dir) else path),
        "chat_template_sha256": template_hash(template),
        "eos_token_id": tok.eos_token_id,
        "end_of_turn_ids": end_of_turn_ids(tok),
    }


def template_hash(template: str | None) -> str | None:
    return hashlib.sha256(template.encode()).hexdigest() if template else None


def end_of_turn_ids(tok) -> list[int]:
    """The special token the chat template writes right after an answer (ChatML's <|im_end|>,
    Llama 3's <|eot_id|>), with eos: a generation that should stop at the end of its turn stops
    at these, and the turn's end is not always the tokenizer's eos."""
    from jinja2 import TemplateError

    ids = {tok.eos_token_id} - {None}
    marker = "rayft-end-of-turn-probe"
    try:
        text = tok.apply_chat_template(
            [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}],
            tokenize=False,
        )
    except (TemplateError, ValueError, TypeError):  # no template, or one that refuses this
        return sorted(ids)
    after = tok(text.split(marker, 1)[-1], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {
        i for i, t in tok.added_tokens_decoder.items() if t.special
    }
    if after and after[0] in special:
        ids.add(after[0])
    return sorted(ids)


def recorded(manifest: dict[str, Any], run_dir: Path) -> dict[str, Any] | None:
    """The facts run.json's train stage recorded; None when no rayft training wrote this run
    directory (an adapter from elsewhere)."""
    train = manifest.get("stages", {}).get("train")
    if train is None:
        return None
    if "facts" not in train:
        raise MissingFactsError(
            f"{run_dir / 'run.json'}: the train stage was recorded by a rayft that did not record "
            "what it trained with (DeepSpeed stage, dtypes, 4-bit layout), and recomputing them "
            "from the config can pick the wrong ones. Re-run `rayft train`, or, to treat the "
            "adapter as one from elsewhere (facts from the config), copy adapter/ into a new "
            "run directory"
        )
    return train["facts"]
