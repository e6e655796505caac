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
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch
from rich.console import Console

from rayft import models
from rayft.config import JobConfig
from rayft.export.adapter import Adapter, base_shapes, check_fits_base, read_adapter
from rayft.export.card import lineage, write_card
from rayft.export.errors import ExportError
from rayft.export.steps import step
from rayft.export.verify import compare, forward_logits, prompt_ids, require_pass, show
from rayft.manifest import hash_files, read_manifest, record_stage
from rayft.training.model import quant_storage_dtype

_PRECISION = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
_PEFT_PREFIX = "base_model.model."


def merge_dtype(cfg: JobConfig) -> torch.dtype:
    """The dtype the adapter computed in during training, unless export.dtype says otherwise."""
    if cfg.export.dtype != "auto":
        return getattr(torch, cfg.export.dtype)
    quant_dtype = cfg.training.quantization.compute_dtype
    if cfg.training.method == "qlora" and quant_dtype != "auto":
        return getattr(torch, quant_dtype)
    if cfg.training.precision != "auto":
        return _PRECISION[cfg.training.precision]
    # The training side's own rule (bf16 on GPU workers, fp32 on CPU), not this machine's: an
    # adapter trained in bf16 on GPUs and merged on a CPU box stays bf16, and vice versa.
    return torch.bfloat16 if cfg.cluster.use_gpu else torch.float32


def _check_trained_base(manifest: dict, cfg: JobConfig) -> None:
    """run.json remembers the base the adapter was trained on; refuse to merge into another."""
    if "train" not in manifest.get("stages", {}):
        return
    trained = (manifest.get("base_model") or {}).get("id")
    if not trained or trained == cfg.model.base:
        return
    try:
        same = models.resolve(trained, pull_missing=False) == models.resolve(
            cfg.model.base, pull_missing=False
        )
    except models.ModelError:
        same = False
    if not same:
        raise ExportError(
            f"{cfg.run_path / 'run.json'}: the adapter was trained on base '{trained}', but "
            f"model.base is '{cfg.model.base}': mismatched base. Set model.base to '{trained}'"
        )


def _load_model(path: str, cfg: JobConfig, dtype: torch.dtype, quantized: bool):
    from transformers import AutoConfig, AutoModelForCausalLM, BitsAndBytesConfig

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
    if quantized:
        q = cfg.training.quantization
        storage = quant_storage_dtype(q.quant_storage, cfg.training.deepspeed.zero_stage)
        # Training loaded the base in the float storage dtype (bf16 under ZeRO-3) before
        # quantizing: the same here, or the nf4 codes and scales differ from those it saw.
        kwargs["dtype"] = _quantized_from(cfg, dtype)
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=q.quant_type,
            bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_storage=storage,
        )
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantized:
        _compute_like_training(model, dtype)
    return model


def _quantized_from(cfg: JobConfig, dtype: torch.dtype) -> torch.dtype:
    """The dtype training loaded the base in before quantizing it to 4 bits."""
    q = cfg.training.quantization
    storage = quant_storage_dtype(q.quant_storage, cfg.training.deepspeed.zero_stage)
    return dtype if storage == torch.uint8 else storage


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


def _untie_adapted_embeddings(model, adapter: Adapter) -> bool:
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
    keys = [k.removeprefix(_PEFT_PREFIX) for k in adapter.shapes]
    if not any(k.startswith(f"{name}.") for k in keys for name in names):
        return False
    outputs.weight = torch.nn.Parameter(inputs.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return True


def _with_adapter(model, adapter: Adapter, base: str):
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, str(adapter.path))
    except (RuntimeError, ValueError, KeyError) as e:
        raise ExportError(
            f"{adapter.path}: PEFT could not apply the adapter to base '{base}': {e}. "
            "Set model.base to the model the adapter was trained on"
        ) from None


def _tokenizer(adapter: Adapter, base_path: str):
    from transformers import AutoTokenizer

    # Training may have saved its tokenizer (e.g. with a pad token) next to the adapter: prefer it.
    has_own = (adapter.path / "tokenizer_config.json").exists()
    tok = AutoTokenizer.from_pretrained(str(adapter.path) if has_own else base_path)
    if has_own and not tok.chat_template:
        tok.chat_template = AutoTokenizer.from_pretrained(base_path).chat_template
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
    run_dir, method = cfg.run_path, cfg.training.method
    if method == "full":
        raise ExportError(
            "training.method is 'full': <run_dir>/model/ already holds the whole model and there "
            "is no adapter to merge; `rayft export` reads it directly"
        )
    adapter = read_adapter(run_dir / "adapter")
    manifest = read_manifest(run_dir)
    _check_trained_base(manifest, cfg)
    base_path = models.resolve(cfg.model.base, cfg.model.revision)
    shapes = base_shapes(Path(base_path)) if Path(base_path).is_dir() else {}
    check_fits_base(adapter, shapes, cfg.model.base)

    dtype = merge_dtype(cfg)
    kind = str(dtype).removeprefix("torch.")
    quantized = method == "qlora"
    # A base quantized from bf16 weights dequantizes to bf16 values, and bitsandbytes' fused
    # inference kernel rounds differently from its training path: the reference is only defined
    # to bf16 precision then, so the check uses bf16 tolerances.
    check_kind = str(_quantized_from(cfg, dtype) if quantized else dtype).removeprefix("torch.")
    tokenizer = _tokenizer(adapter, base_path)
    ids = prompt_ids(tokenizer, cfg.export.verify_prompts)
    tmp = run_dir / f".merged.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    ref_label = "4-bit base + adapter" if quantized else "base + adapter"
    try:
        with step(console, f"reference logits: {ref_label} ({kind})"):
            reference_model = _with_adapter(
                _load_model(base_path, cfg, dtype, quantized), adapter, cfg.model.base
            )
            reference = forward_logits(reference_model, ids)
            del reference_model
        with step(console, f"merge {method} adapter into {cfg.model.base} ({kind})"):
            base = _load_model(base_path, cfg, dtype, quantized)
            if quantized:
                # See the module docstring: deq(Q(W)) + BA. `.to` upcasts what training held in
                # the storage dtype (embeddings, norms under ZeRO-3); bf16 -> fp32 is exact.
                base = base.dequantize(dtype=dtype).to(dtype)
            untied = _untie_adapted_embeddings(base, adapter)
            merged = _with_adapter(base, adapter, cfg.model.base).merge_and_unload()
        if untied:
            console.print(
                "[yellow]![/] the adapter changes the embedding matrix the base ties to its "
                "output projection: the merged model keeps two (tie_word_embeddings: false)"
            )
        with step(console, f"save safetensors (shards ≤ {cfg.export.max_shard_size})"):
            merged.save_pretrained(tmp, max_shard_size=cfg.export.max_shard_size)
            tokenizer.save_pretrained(tmp)
            del merged, base
        with step(console, "reload the saved model and compare logits"):
            saved = _load_model(str(tmp), cfg, dtype, quantized=False)
            result = compare(f"merged ({kind})", check_kind, reference, forward_logits(saved, ids))
            del saved
        show([result], f"merged vs {ref_label}, {len(ids)} prompts", console)
        require_pass(
            [result],
            f"merge of {adapter.path}",
            "The merged weights do not compute what base + adapter does. Check that model.base "
            "and training.method (lora / dora / qlora) match the training run.",
        )

        verification = {"reference": ref_label, **result.summary()}
        adapter_hash = hash_files([p for p in adapter.path.iterdir() if p.is_file()])
        write_card(
            tmp,
            lineage=lineage(
                cfg.name, cfg.model.base, cfg.model.revision, method, manifest, adapter_hash
            ),
            adapter=adapter.path,
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
