"""`rayft export --format gguf`: GGUF files of the merged model, each loaded back and verified.

The check is a round trip through an independent reader: transformers' GGUF loader builds the
tokenizer and the model from the file alone, and both must reproduce the merged model (same token
ids for the verify prompts; logits within the tolerance of the file's type). A file that fails is
deleted, so `<run_dir>/export/` only ever holds verified files.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from rich.console import Console

from rayft.config import JobConfig
from rayft.export.errors import ExportError, VerificationError
from rayft.export.gguf_writer import write_gguf
from rayft.export.steps import step
from rayft.export.verify import (
    Comparison,
    compare,
    forward_logits,
    prompt_ids,
    render_prompts,
    require_pass,
    show,
)
from rayft.manifest import record_stage


def source_dir(cfg: JobConfig) -> Path:
    """What gets exported: the merged model, or the whole model of a full fine-tune."""
    src = cfg.run_path / ("model" if cfg.training.method == "full" else "merged")
    if not (src / "config.json").exists():
        stage = "rayft train" if cfg.training.method == "full" else "rayft merge"
        raise ExportError(f"{src}: no model to export (no config.json); run `{stage}` first")
    return src


def verify_gguf(
    path: Path, kind: str, ids: list[list[int]], reference: list[torch.Tensor], rendered: list[str]
) -> Comparison:
    """Load `path` with transformers' GGUF loader; compare its tokenizer and logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=str(path))
    got = [tok(text, add_special_tokens=True)["input_ids"] for text in rendered]
    if got != ids:
        bad = next(i for i, (a, b) in enumerate(zip(got, ids, strict=True)) if a != b)
        raise VerificationError(
            f"{path}: the GGUF tokenizer splits verify prompt {bad} differently from the merged "
            f"model's ({got[bad][:12]}… vs {ids[bad][:12]}…); the tokenizer metadata is wrong"
        )
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=str(path), dtype=torch.float32
    )
    return compare(f"{kind} GGUF", kind, reference, forward_logits(model, ids))


def export(cfg: JobConfig, fmt: str = "gguf") -> list[Path]:
    """Write `<run_dir>/export/<name>-<type>.gguf` for each export.gguf_types; verify each."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if fmt != "gguf":
        raise ExportError(f"--format {fmt!r}: only 'gguf' is supported")
    if not cfg.export.gguf_types:
        raise ExportError("export.gguf_types is empty; name at least one type, e.g. [f16, q8_0]")
    console = Console()
    src = source_dir(cfg)
    out_dir = cfg.run_path / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(src))
    ids = prompt_ids(tokenizer, cfg.export.verify_prompts)
    rendered = render_prompts(tokenizer, cfg.export.verify_prompts)
    with step(console, f"reference logits: {src} (float32)"):
        merged = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        reference = forward_logits(merged, ids)
        del merged

    written: dict[str, Path] = {}
    results: list[Comparison] = []
    tensor_types: dict[str, dict[str, int]] = {}
    try:
        for kind in cfg.export.gguf_types:
            tmp = out_dir / f".tmp-{os.getpid()}-{cfg.name}-{kind}.gguf"  # readers want .gguf
            written[kind] = tmp
            with step(console, f"write {kind} GGUF"):
                tensor_types[kind] = write_gguf(src, tmp, kind, cfg.name)
            with step(console, f"load {kind} GGUF back with transformers and compare"):
                results.append(verify_gguf(tmp, kind, ids, reference, rendered))
        show(
            results, f"GGUF (transformers loader) vs {src.name} model, {len(ids)} prompts", console
        )
        require_pass(
            results,
            "GGUF export",
            "A type that fails only on tolerance (q4_0 on a small model) can be dropped from "
            "export.gguf_types; a failing f32 file is a bug in the writer.",
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
        verification={r.kind: r.summary() for r in results},
    )
    sizes = ", ".join(f"{p.name} {p.stat().st_size / 2**20:.1f} MiB" for p in final)
    console.print(f"Exported {len(final)} GGUF file(s) to {out_dir}: {sizes}; all verified.")
    return final
