"""GPU tokens/s and MFU of a randomly initialised ~1B Llama, one GPU, LoRA (4N FLOPs/token) and
full fine-tuning (6N), bf16. Skipped (exit 0) on a machine without CUDA.

    .venv/bin/python benchmarks/bench_gpu_mfu.py [--method lora full] [--batch 8 --seq 2048]
    python benchmarks/bench_gpu_mfu.py --tiny     # the same loop on CPU, a 2-layer model: a check

The loop is what a `rayft train` worker runs per step without TRL and Ray around it (they add
no FLOPs and are not installed on the GPU lending machines): forward with labels, backward,
fused AdamW over the trainable parameters, in bf16 with SDPA attention and no gradient
checkpointing (recomputation would do FLOPs that MFU does not count). N is counted two ways:
all parameters (what train_summary.json uses) and without the input embedding, a lookup that
does no matrix multiply. The peak is the dense bf16 figure of rayft/training/flops.py.
Goal: MFU >= 40%.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _flops_module():
    """rayft/training/flops.py on its own: the package's __init__ imports Ray, which the GPU
    machines may not have."""
    spec = importlib.util.spec_from_file_location("flops", ROOT / "rayft/training/flops.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(tiny: bool):
    from transformers import LlamaConfig

    if tiny:
        return LlamaConfig(
            hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=512,
        )  # fmt: skip
    # TinyLlama-1.1B's shape: 22 layers, d 2048, GQA 32/4, SwiGLU 5632, vocab 32000.
    return LlamaConfig(
        hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
        num_key_value_heads=4, vocab_size=32000, max_position_embeddings=4096,
    )  # fmt: skip


def run(method: str, batch: int, seq: int, steps: int, warmup: int, tiny: bool) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cpu" if tiny else "cuda"
    dtype = torch.float32 if tiny else torch.bfloat16
    torch.manual_seed(0)
    cfg = _config(tiny)
    cfg.use_cache = False
    model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    n_all = sum(p.numel() for p in model.parameters())
    n_no_embed = n_all - model.get_input_embeddings().weight.numel()
    if method != "full":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear")
        )
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=not tiny)
    ids = torch.randint(0, cfg.vocab_size, (batch, seq), device=device)

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    times = []
    for _ in range(warmup + steps):
        sync()
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    tokens_per_s = batch * seq / step_s
    flops = _flops_module()
    name = "cpu" if tiny else torch.cuda.get_device_name(0)
    out = {
        "method": method,
        "device": name,
        "params": n_all,
        "step_ms": step_s * 1000,
        "tokens_per_s": tokens_per_s,
        "loss": float(loss.detach()),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if not tiny else None,
    }
    for key, n in (("mfu", n_all), ("mfu_no_embedding", n_no_embed)):
        out[key] = flops.mfu(tokens_per_s, flops.flops_per_token(n, method), [name])
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", nargs="+", default=["lora", "full"], choices=["lora", "full"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--tiny", action="store_true", help="2-layer model on CPU (a check)")
    opts = parser.parse_args()

    import torch

    if not opts.tiny and not torch.cuda.is_available():
        print("bench_gpu_mfu: no CUDA device here, skipped (run it on an H100/H200)")
        return 0
    batch, seq = (2, 64) if opts.tiny else (opts.batch, opts.seq)
    print(f"~1B Llama (random init), bf16, SDPA, batch {batch} x {seq}, median of {opts.steps}")
    print(f"{'method':6s} {'device':24s} {'params':>8s} {'ms/step':>9s} {'tokens/s':>10s} "
          f"{'MFU':>6s} {'MFU(no emb)':>12s} {'peak GiB':>9s}")  # fmt: skip
    for method in opts.method:
        r = run(method, batch, seq, opts.steps, opts.warmup, opts.tiny)

        def pct(x):
            return "n/a" if x is None else f"{x:.1%}"

        mem = "n/a" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.1f}"
        print(f"{method:6s} {r['device'][:24]:24s} {r['params'] / 1e9:7.2f}B {r['step_ms']:9.1f} "
              f"{r['tokens_per_s']:10.0f} {pct(r['mfu']):>6s} {pct(r['mfu_no_embedding']):>12s} "
              f"{mem:>9s}", flush=True)  # fmt: skip
        if opts.tiny is False and method == "full":
            torch.cuda.empty_cache()
    print("goal: MFU >= 40%")
    return 0


if __name__ == "__main__":
    sys.exit(main())
