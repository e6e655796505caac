"""`rayft export --format gguf`: GGUF files of the merged model, each loaded back and verified.

The check is a round trip through an independent reader: transformers' GGUF loader builds the
tokenizer and the model from the file alone, and both must reproduce the merged model (same token
ids for the verify prompts; logits within the tolerance of the file's type). A file that fails is
deleted, so `<run_dir>/export/` only ever holds verified files.

One gap in that reader: it cannot apply llama3 rope scaling from a GGUF. llama.cpp keeps that
scaling only as the `rope_freqs.weight` tensor (no metadata key says "llama3"), and transformers'
loader reads no rope-scaling keys for llama and maps no parameter to that tensor, so it builds a
plain-rope model. The check then applies the file's own rope_freqs the way llama.cpp's rope does
(pair i rotates by pos * base^(-2i/d) / rope_freqs[i]) to the loaded model's inverse
frequencies: the logits comparison still covers what the file says, and only llama.cpp's kernel
is taken on trust.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import torch
from rich.console import Console

from rayft.config import JobConfig
from rayft.export.card import lineage
from rayft.export.errors import ExportError, VerificationError
from rayft.export.gguf_writer import rounded, shard_files, tensor_type, write_gguf
from rayft.export.steps import step
from rayft.export.verify import (
    Comparison,
    compare,
    forward_logits,
    prompt_ids,
    require_pass,
    show,
)
from rayft.manifest import read_manifest, record_stage
from rayft.training.facts import NOT_RECORDED, MissingFactsError, recorded


def source_dir(cfg: JobConfig, method: str) -> Path:
    """What gets exported: the merged model, or the whole model of a full fine-tune."""
    src = cfg.run_path / ("model" if method == "full" else "merged")
    if not (src / "config.json").exists():
        stage = "rayft train" if method == "full" else "rayft merge"
        raise ExportError(f"{src}: no model to export (no config.json); run `{stage}` first")
    shard_files(src)  # an incomplete copy fails here, not inside transformers' loader
    return src


def apply_rope_freqs(model, path: Path) -> bool:
    """Give a model loaded from `path` the file's rope_freqs (see the module docstring); True if
    the file has them. Left alone if the loader itself applied a rope scaling."""
    reader = gguf.GGUFReader(str(path))
    tensor = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if tensor is None:
        return False
    rotary = model.model.rotary_emb
    if rotary.rope_type != "default":
        return True  # a loader that learned to read it: do not scale twice
    factors = torch.from_numpy(np.asarray(tensor.data, dtype=np.float32).copy())
    if factors.shape != rotary.inv_freq.shape:
        raise VerificationError(
            f"{path}: rope_freqs.weight has {factors.numel()} values, the model rotates "
            f"{rotary.inv_freq.numel()} dimension pairs; the writer computed it for another head size"
        )
    for buffer in (rotary.inv_freq, rotary.original_inv_freq):
        buffer.copy_(buffer / factors.to(buffer.device))
    return True


def expected_logits(src: Path, kind: str, ids: list[list[int]]) -> list[torch.Tensor]:
    """What a correct `kind` file computes: the source model with each tensor rounded to the type
    the writer gives it. Rows are quantized in blocks along the input dimension, so the rounding
    commutes with the q/k row permutation and the HF layout can be rounded directly."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():  # a tied lm_head is not listed: as written
            qtype = tensor_type(name, tuple(param.shape), kind)
            param.copy_(torch.from_numpy(rounded(param.detach().cpu().numpy(), qtype)))
    return forward_logits(model, ids)


def verify_gguf(
    path: Path,
    kind: str,
    source_tokenizer,
    prompts: list[str],
    reference: list[torch.Tensor],
    expected: list[torch.Tensor] | None = None,
) -> list[Comparison]:
    """Load `path` with transformers' GGUF loader; compare its tokenizer and logits.

    The tokenizer must give the source's ids for each prompt both as a chat turn rendered with
    the file's own template (the ids the logits are compared on) and as plain text with special
    tokens (a completion request; this is what checks tokenizer.ggml.add_bos_token).

    Two logit checks. Against `expected` (the source with weights rounded to the file's types):
    a correct file holds exactly those values, so anything beyond float32 rounding is a writer
    bug, whatever the type; this is what makes q4_0 checkable at all, since its honest loss on
    a small model (0.63 relative, 60% top-1 on SmolLM2-135M) is as large as a file without the
    q/k permutation shows on another (0.79, 56% on tiny-llama). Against `reference` (the source
    itself): the loss the type costs, bounded by its THRESHOLDS entry.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    ids = prompt_ids(source_tokenizer, prompts)
    for what, got, want in (
        ("verify prompt", prompt_ids(tok, prompts), ids),
        (
            "plain-text verify prompt",
            [tok(p)["input_ids"] for p in prompts],
            [source_tokenizer(p)["input_ids"] for p in prompts],
        ),
    ):
        if got != want:
            bad = next(i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b)
            raise VerificationError(
                f"{path}: the GGUF tokenizer splits {what} {bad} differently from the source "
                f"model's ({got[bad][:12]}… vs {want[bad][:12]}…); the tokenizer metadata is wrong"
            )
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=str(path), dtype=torch.float32
    )
    apply_rope_freqs(model, path)
    logits = forward_logits(model, ids)
    checks = [compare(f"{kind} GGUF vs source", kind, reference, logits)]
    if expected is not None:
        checks.insert(
            0, compare(f"{kind} GGUF vs {kind}-rounded source", "exact", expected, logits)
        )
    return checks


def export(cfg: JobConfig, fmt: str = "gguf") -> list[Path]:
    """Write `<run_dir>/export/<name>-<type>.gguf` for each export.gguf_types; verify each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if fmt != "gguf":
        raise ExportError(f"--format {fmt!r}: only 'gguf' is supported")
    if not cfg.export.gguf_types:
        raise ExportError("export.gguf_types is empty; name at least one type, e.g. [f16, q8_0]")
    console = Console()
    manifest = read_manifest(cfg.run_path)
    try:
        facts = recorded(manifest, cfg.run_path)
    except MissingFactsError:  # trained before runs recorded it: export needs the method only
        facts = None
    if facts is None:
        console.print(f"[yellow]![/] {cfg.run_path / 'run.json'}: {NOT_RECORDED}")
    method = facts["method"] if facts else cfg.training.method
    src = source_dir(cfg, method)
    out_dir = cfg.run_path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_hash = (
        None
        if method == "full"
        else manifest.get("stages", {}).get("merge", {}).get("adapter_hash")
    )
    origin = lineage(cfg.name, cfg.model.base, cfg.model.revision, method, manifest, adapter_hash)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    prompts = cfg.export.verify_prompts
    ids = prompt_ids(tokenizer, prompts)
    with step(console, f"reference logits: {src} (float32)"):
        merged = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        reference = forward_logits(merged, ids)
        del merged

    written: dict[str, Path] = {}
    results: list[Comparison] = []
    checks: dict[str, list[Comparison]] = {}
    tensor_types: dict[str, dict[str, int]] = {}
    try:
        for kind in cfg.export.gguf_types:
            tmp = out_dir / f".tmp-{os.getpid()}-{cfg.name}-{kind}.gguf"  # readers want .gguf
            written[kind] = tmp
            with step(console, f"write {kind} GGUF"):
                tensor_types[kind] = write_gguf(src, tmp, kind, origin)
            expected = None
            if kind != "f32":
                with step(console, f"expected logits: {src.name} rounded to {kind}"):
                    expected = expected_logits(src, kind, ids)
            with step(console, f"load {kind} GGUF back with transformers and compare"):
                checks[kind] = verify_gguf(tmp, kind, tokenizer, prompts, reference, expected)
                results.extend(checks[kind])
        show(
            results, f"GGUF (transformers loader) vs {src.name} model, {len(ids)} prompts", console
        )
        require_pass(
            results,
            "GGUF export",
            "A file that fails against its rounded source (or an f32 file that fails at all) "
            "is a bug in the writer; a type that fails only against the source (q4_0 on a "
            "small model) loses too much and can be dropped from export.gguf_types.",
        )
        final = []
        for kind, tmp in written.items():
            path = out_dir / f"{cfg.name}-{kind}.gguf"
            tmp.replace(path)
            final.append(path)
    finally:
        for tmp in written.values():
            tmp.unlink(missing_ok=True)

    record_stage(
        cfg.run_path,
        "export",
        cfg,
        format=fmt,
        source=str(src),
        files=[str(p) for p in final],
        tensor_types=tensor_types,
        verification={
            kind: {"passed": all(c.passed for c in cs), "checks": [c.summary() for c in cs]}
            for kind, cs in checks.items()
        },
    )
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in final)
    console.print(f"Exported {len(final)} GGUF file(s) to {out_dir}: {sizes}; all verified.")
    return final
