"""The plan as the readable table `rayft plan` prints."""

from __future__ import annotations

from typing import Any


def _gib(v: float) -> str:
    return f"{v:8.2f} GiB"


def _count(n: float) -> str:
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def render(plan: dict[str, Any]) -> str:
    p = plan
    lines = [
        f"model      {p['model']}: {_count(p['params'])} parameters "
        f"({p['params']:,}), {_count(p['trainable_params'])} trainable ({p['method']})",
        f"job        ZeRO-{p['zero_stage']}, {p['num_workers']} workers x {p['micro_batch']} "
        f"x {p['max_seq_len']} tokens, gradient checkpointing "
        f"{'on' if p['gradient_checkpointing'] else 'off'}",
        f"device     {p['device']} ({p['device_memory_gib']:.1f} GiB each)",
        "",
        "memory per device",
    ]
    for part, gib in p["breakdown"].items():
        lines.append(f"  {part:14s}{_gib(gib)}")
    lines.append(f"  {'total':14s}{_gib(p['per_gpu_gib'])}")
    if p["cpu_ram_gib_per_node"]:
        lines.append(f"  {'CPU RAM/node':14s}{_gib(p['cpu_ram_gib_per_node'])}  (offloaded)")
    verdict = "fits" if p["fits"] else "DOES NOT FIT"
    lines += [
        "",
        f"verdict    {verdict}: {p['per_gpu_gib']:.2f} of {p['device_memory_gib']:.1f} GiB",
    ]
    m = p["min_cluster"]
    lines.append(
        "smallest   "
        + (
            f"{m['num_workers']} workers: {m['nodes']} node(s) x {m['gpus_per_node']} "
            f"({m['per_gpu_gib']:.2f} GiB each)"
            if m
            else "no data-parallel size fits this setup (stage 0 and offloads replicate)"
        )
    )
    if p["fixes"]:
        lines.append("changes    (each alone; cheapest first)")
        for f in p["fixes"]:
            mark = "fits" if f["fits"] else "no  "
            lines.append(f"  {mark} {f['change']:52s}{_gib(f['per_gpu_gib'])}  --set {f['set']}")
    if p.get("tokens_per_s"):
        lines += [
            "",
            f"throughput {p['tokens_per_s']:,.0f} tokens/s at MFU {p['mfu']:.0%} "
            f"({p['mfu_source']}); {p['flops_per_token'] / 1e9:.1f} GFLOPs/token",
            f"time       {p['train_tokens']:,.0f} tokens ({p['tokens_source']}): "
            f"{p['hours']:.2f} h, {p['gpu_hours']:.1f} GPU-hours"
            + (f", ${p['cost_usd']:,.2f}" if p["cost_usd"] is not None else ""),
        ]
        if p.get("epochs"):
            lines.append(f"           {p['epochs']:.2f} epochs of {p['dataset_tokens']:,} tokens")
    s = p.get("serving")
    if s:
        lines += [
            "",
            f"serving    {'fits' if s['fits'] else 'DOES NOT FIT'}: {s['per_gpu_gib']:.2f} GiB per "
            f"GPU (weights {s['weights_gib']:.2f}, KV cache {s['kv_cache_gib']:.2f} for "
            f"{s['concurrency']} x {s['max_model_len']} tokens); at most "
            f"{s['max_concurrency']} sequences of {s['max_model_len']}",
        ]
    return "\n".join(lines)
