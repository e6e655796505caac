"""`rayft merge`: fold a LoRA / DoRA / QLoRA adapter into its base, save it, prove it.

Order of work, chosen so only one model is in memory at a time and nothing unverified is left
in `<run_dir>/merged/`: reference logits from base + adapter, then a fresh base, merge, save to a
temporary directory, reload what was saved, compare, and only then rename it into place.

QLoRA: the adapter was trained against the dequantized nf4 weights deq(Q(W)), never against W:
every training forward computed x @ (deq(Q(W)) + BA)^T, and BA was fitted to that base, partly
correcting its quantization error. W + BA is therefore a different function from the one that
was trained (on tiny-llama: ~0.1 relative logit drift, 80% top-1, versus 1e-6 for the right
target), and merging into the 4-bit weights would re-quantize the deltas away. The merge
target is deq(Q(W)) in the compute dtype, which reproduces the trained function.

What training ran with (method, dtypes, DeepSpeed stage, 4-bit layout, tokenizer) is read from
run.json's train facts, never recomputed from the config: a raw DeepSpeed config decides the
ZeRO stage and with it the dtype the base was quantized from, and the config may have changed
since. Only an adapter that no rayft training recorded takes them from the config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console

from rayft import models
from rayft.adapters import AdapterError, base_linears, check_compatible, tensor_shapes, vet
from rayft.config import JobConfig
from rayft.dtypes import dtype_name, torch_dtype
from rayft.export.card import lineage, write_card
from rayft.export.errors import ExportError
from rayft.export.steps import step
from rayft.export.verify import (
    THRESHOLDS,
    compare,
    forward_logits,
    prompt_ids,
    require_pass,
    show,
)
from rayft.manifest import hash_files, read_manifest, record_stage
from rayft.training.facts import NOT_RECORDED, for_config, recorded, template_hash
from rayft.training.model import quantization_config

_PEFT_PREFIX = "base_model.model."


def merge_dtype(export_dtype: str, facts: dict) -> str:
    """The dtype the adapter computed in during training, unless export.dtype says otherwise.

    The training side's dtype as recorded, not this machine's: an adapter trained in bf16 on
    GPUs and merged on a CPU box stays bf16, and vice versa."""
    if export_dtype != "auto":
        return export_dtype
    quant = facts["quantization"]
    return quant["compute_dtype"] if quant else facts["compute_dtype"]


def _check_trained_base(facts: dict, cfg: JobConfig) -> None:
    """The base the adapter was trained on, as recorded; refuse to merge into another."""
    trained, revision = facts["base"]["id"], facts["base"]["revision"]
    where = cfg.run_path / "run.json"
    if revision != cfg.model.revision:
        raise ExportError(
            f"{where}: the adapter was trained on revision {revision!r} of '{trained}', but "
            f"model.revision is {cfg.model.revision!r}: mismatched base. Set model.revision "
            f"to {revision!r}"
        )
    if trained == cfg.model.base:
        return
    try:
        same = models.resolve(trained, pull_missing=False) == models.resolve(
            cfg.model.base, pull_missing=False
        )
    except models.ModelError:
        same = False
    if not same:
        raise ExportError(
            f"{where}: the adapter was trained on base '{trained}', but model.base is "
            f"'{cfg.model.base}': mismatched base. Set model.base to '{trained}'"
        )


def _load_model(path: str, cfg: JobConfig, dtype: torch.dtype, quant: dict | None):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs: dict = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.revision and not Path(path).exists():
        kwargs["revision"] = cfg.model.revision
    config = AutoConfig.from_pretrained(path, **kwargs)
    stale = getattr(config, "quantization_config", None) or {}
    if isinstance(stale, dict) and stale.get("quant_method") == "gguf":
        # A safetensors model converted from GGUF (the registry's SmolLM2) can keep the GGUF
        # marker in config.json; its weights are plain, and the marker makes save_pretrained
        # refuse the merged model.
        del config.quantization_config
    kwargs.update(config=config, dtype=dtype)
    if torch.cuda.is_available():
        kwargs["device_map"] = "auto"  # a large base spreads over the GPUs (and CPU) present
    if quant is not None:
        # Loaded in the dtype training quantized from (bf16 storage under ZeRO-3), with its
        # 4-bit layout, or the nf4 codes and scales differ from those it trained against.
        kwargs["dtype"] = torch_dtype(quant["loaded_dtype"])
        kwargs["quantization_config"] = quantization_config(
            {**quant, "compute_dtype": dtype_name(dtype)}
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quant is not None:
        _compute_like_training(model, dtype)
    return model


def _compute_like_training(model, dtype: torch.dtype) -> None:
    """Make the 4-bit reference compute what the training forward computed, in `dtype`.

    bitsandbytes' CPU inference kernel (AVX512-BF16) runs 4-bit layers in bf16, while training
    dequantizes and multiplies in the compute dtype: the shortcut is switched off. Weights that
    training held in the storage dtype (embeddings, norms under ZeRO-3) are upcast, exactly, so
    activations are not rounded to bf16 between layers; the merged model does the same.
    """
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    for param in model.parameters():
        if not isinstance(param, bnb.nn.Params4bit) and param.dtype != dtype:
            param.data = param.data.to(dtype)


def _untie_adapted_embeddings(model, adapter_keys: list[str]) -> bool:
    """Give the output projection its own copy of a tied embedding matrix when the adapter
    changes either side (LoRA on lm_head or embed_tokens, or either in modules_to_save).

    Base + adapter computes the lookup with E (+ its own delta) and the logits with E + ΔW; a
    merge into the one shared matrix would put ΔW into the lookup as well (measured on a tied
    tiny-llama with LoRA on lm_head: 2.2 relative logit drift, 12% top-1), and a saved model that
    still says `tie_word_embeddings` would drop one side. Untied, the merge is exact and the
    merged model is saved with both matrices. True if it untied.
    """
    inputs, outputs = model.get_input_embeddings(), model.get_output_embeddings()
    if outputs is None or outputs.weight is not inputs.weight:
        return False
    names = {n for n, m in model.named_modules() if m is inputs or m is outputs}
    keys = [k.removeprefix(_PEFT_PREFIX) for k in adapter_keys]
    if not any(k.startswith(f"{name}.") for k in keys for name in names):
        return False
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def _with_adapter(model, adapter: Path, base: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(
            f"{adapter}: PEFT could not apply the adapter to base '{base}': {e}. "
            "Set model.base to the model the adapter was trained on"
        ) from None


def _tokenizer(facts: dict, run_dir: Path, adapter: Path, base_path: str):
    """The tokenizer the adapter was trained with: where training recorded it, with the chat
    template it recorded; for an adapter from elsewhere, its own, else the base's."""
    from transformers import AutoTokenizer

    recorded_tok = facts.get("tokenizer")
    if recorded_tok is None:
        has_own = (adapter / "tokenizer_config.json").exists()
        tok = AutoTokenizer.from_pretrained(str(adapter) if has_own else base_path)
        if has_own and not tok.chat_template:
            tok.chat_template = AutoTokenizer.from_pretrained(base_path).chat_template
        return tok
    where = run_dir / recorded_tok["path"]  # an absolute recorded path stays itself
    tok = AutoTokenizer.from_pretrained(str(where))
    if template_hash(tok.chat_template) != recorded_tok["chat_template_sha256"]:
        raise ExportError(
            f"{where}: its chat template is not the one `rayft train` recorded in run.json "
            f"(sha256 {recorded_tok['chat_template_sha256']}): the tokenizer files were changed "
            "after training. Restore them from <run_dir>/checkpoints"
        )
    return tok


def _replace_dir(tmp: Path, final: Path) -> None:
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def merge(cfg: JobConfig) -> Path:
    """Merge `<run_dir>/adapter/` into the base, verify, write `<run_dir>/merged/`."""
    console = Console()
    run_dir = cfg.run_path
    manifest = read_manifest(run_dir)
    facts = recorded(manifest, run_dir)
    method = facts["method"] if facts else cfg.training.method
    if method == "full":
        raise ExportError(
            "training.method is 'full': <run_dir>/model/ already holds the whole model and there "
            "is no adapter to merge; `rayft export` reads it directly"
        )
    adapter = run_dir / "adapter"
    if not adapter.is_dir():
        raise ExportError(f"{adapter}: no adapter directory; run `rayft train` first")
    if facts:
        _check_trained_base(facts, cfg)
    base_path = models.resolve(cfg.model.base, cfg.model.revision)
    if facts is None:
        console.print(f"[yellow]![/] {run_dir / 'run.json'}: {NOT_RECORDED}")
        facts = for_config(cfg, base_path)
    try:
        vet(adapter)
        check_compatible(adapter, base_linears(base_path, cfg.model.trust_remote_code))
        adapter_keys = list(tensor_shapes(adapter))
    except AdapterError as e:
        raise ExportError(e.message) from None

    kind = merge_dtype(cfg.export.dtype, facts)
    dtype = torch_dtype(kind)
    quant = facts["quantization"]
    # A base quantized from bf16 weights dequantizes to bf16 values, and bitsandbytes' fused
    # inference kernel rounds differently from its training path: the reference is only defined
    # to the precision of the coarser dtype, and the check uses its tolerances.
    check_kind = kind
    if quant is not None:
        check_kind = max(kind, quant["loaded_dtype"], key=lambda k: THRESHOLDS[k].max_rel_diff)
    tokenizer = _tokenizer(facts, run_dir, adapter, base_path)
    ids = prompt_ids(tokenizer, cfg.export.verify_prompts)
    tmp = run_dir / f".merged.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ref_label = "4-bit base + adapter" if quant else "base + adapter"
    try:
        with step(console, f"reference logits: {ref_label} ({kind})"):
            reference_model = _with_adapter(
                _load_model(base_path, cfg, dtype, quant), adapter, cfg.model.base
            )
            reference = forward_logits(reference_model, ids)
            del reference_model
        with step(console, f"merge {method} adapter into {cfg.model.base} ({kind})"):
            base = _load_model(base_path, cfg, dtype, quant)
            if quant is not None:
                # See the module docstring: deq(Q(W)) + BA. `.to` upcasts what training held in
                # the storage dtype (embeddings, norms under ZeRO-3); bf16 -> fp32 is exact.
                base = base.dequantize(dtype=dtype).to(dtype)
            untied = _untie_adapted_embeddings(base, adapter_keys)
            merged = _with_adapter(base, adapter, cfg.model.base).merge_and_unload()
        if untied:
            console.print(
                "[yellow]![/] the adapter changes the embedding matrix the base ties to its "
                "output projection: the merged model keeps two (tie_word_embeddings: false)"
            )
        stops = (facts.get("tokenizer") or {}).get("end_of_turn_ids")
        if stops:  # generation stops where the trained template ends an answer
            merged.generation_config.eos_token_id = stops
        with step(console, f"save safetensors (shards ≤ {cfg.export.max_shard_size})"):
            merged.save_pretrained(tmp, max_shard_size=cfg.export.max_shard_size)
            tokenizer.save_pretrained(tmp)
            del merged, base
        with step(console, "reload the saved model and compare logits"):
            saved = _load_model(str(tmp), cfg, dtype, quant=None)
            result = compare(f"merged ({kind})", check_kind, reference, forward_logits(saved, ids))
            del saved
        show([result], f"merged vs {ref_label}, {len(ids)} prompts", console)
        require_pass(
            [result],
            f"merge of {adapter}",
            "The merged weights do not compute what base + adapter does. Check that model.base "
            "is the model the adapter was trained on.",
        )

        verification = {"reference": ref_label, **result.summary()}
        adapter_hash = hash_files([p for p in adapter.iterdir() if p.is_file()])
        write_card(
            tmp,
            lineage=lineage(
                cfg.name, cfg.model.base, cfg.model.revision, method, manifest, adapter_hash
            ),
            adapter=adapter,
            training=cfg.training.model_dump(mode="json"),
            manifest=manifest,
            verification=verification,
            eval_report=run_dir / "eval" / "report.json",
        )
        final = run_dir / "merged"
        _replace_dir(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    shards = sorted(p.name for p in final.glob("*.safetensors"))
    size_mb = sum(p.stat().st_size for p in final.glob("*.safetensors")) / 2**20
    record_stage(
        run_dir,
        "merge",
        cfg,
        method=method,
        dtype=kind,
        # what the 4-bit reference was built from: the recorded facts, or this config's
        facts_from="train" if "train" in manifest.get("stages", {}) else "config",
        quantized_from=quant["loaded_dtype"] if quant else None,
        merged_dir=str(final),
        adapter_hash=adapter_hash,
        shards=shards,
        untied_embeddings=untied,
        verification=verification,
    )
    console.print(
        f"Merged {method} adapter into {cfg.model.base}: {final} ({len(shards)} shard(s), "
        f"{size_mb:.1f} MiB, {kind}); max |Δlogit| {result.max_abs_diff:.1e}, top-1 agreement "
        f"{result.top1:.0%} on {len(ids)} prompts."
    )
    return final
