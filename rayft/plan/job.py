"""`plan`: will this job fit, on how many GPUs, how long and at what cost; from the job file alone,
offline. The verdict for the configured cluster, the smallest cluster that fits, the cheapest
change that makes it fit, throughput and cost, and whether `serve` fits.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from rayft.config import JobConfig
from rayft.dtypes import precision_dtype
from rayft.errors import RayftError
from rayft.plan import gpus, memory
from rayft.plan.memory import Setup
from rayft.plan.shapes import Shape, ShapeError, resolve

# Changes tried when a job does not fit, cheapest first: what each costs is time (recompute,
# PCIe traffic), model quality (4 bits, shorter context) or money (more GPUs).
FIXES = (
    ("gradient checkpointing", "training.gradient_checkpointing=true", {"checkpointing": True}),
    ("ZeRO-1", "training.deepspeed.zero_stage=1", {"zero_stage": 1}),
    ("ZeRO-2", "training.deepspeed.zero_stage=2", {"zero_stage": 2}),
    ("ZeRO-3", "training.deepspeed.zero_stage=3", {"zero_stage": 3}),
    (
        "ZeRO-3 + checkpointing",
        "training.deepspeed.zero_stage=3 training.gradient_checkpointing=true",
        {"zero_stage": 3, "checkpointing": True},
    ),
    (
        "offload optimizer",
        "training.deepspeed.offload_optimizer=true",
        {"offload_optimizer": True, "zero_stage": None},
    ),
    (
        "ZeRO-3 + offload params and optimizer + checkpointing",
        "training.deepspeed.zero_stage=3 training.deepspeed.offload_params=true "
        "training.deepspeed.offload_optimizer=true training.gradient_checkpointing=true",
        {"zero_stage": 3, "offload_params": True, "offload_optimizer": True, "checkpointing": True},
    ),
    ("QLoRA", "training.method=qlora", {"method": "qlora"}),
    (
        "QLoRA + checkpointing",
        "training.method=qlora training.gradient_checkpointing=true",
        {"method": "qlora", "checkpointing": True},
    ),
)


def setup_for(cfg: JobConfig, on_gpu: bool) -> Setup:
    t, c = cfg.training, cfg.cluster
    dtype = precision_dtype(t.precision, on_gpu)
    targets = t.lora.target_modules
    return Setup(
        method=t.method,
        zero_stage=t.deepspeed.zero_stage,
        offload_optimizer=t.deepspeed.offload_optimizer and t.deepspeed.zero_stage > 0,
        offload_params=t.deepspeed.offload_params and t.deepspeed.zero_stage == 3,
        world=c.num_workers,
        gpus_per_node=c.gpus_per_node if on_gpu else c.num_workers,
        micro_batch=t.per_device_batch_size,
        seq_len=cfg.data.max_seq_len,
        checkpointing=t.gradient_checkpointing,
        dtype_bytes=4 if dtype == "float32" else 2,
        lora_r=t.lora.r,
        lora_targets=targets if isinstance(targets, str) else tuple(targets),
        lora_dropout=t.lora.dropout,
        double_quant=t.quantization.double_quant,
        dpo=_objective(cfg) == "dpo",
    )


def _objective(cfg: JobConfig) -> str:
    """training.objective; `auto` is what the prepared data holds (SFT when not prepared)."""
    if cfg.training.objective != "auto":
        return cfg.training.objective
    report = _data(cfg)
    return "dpo" if report and report.get("kind") == "preference" else "sft"


def _ram_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / memory.GIB


def _fits(shape: Shape, s: Setup, limit_gib: float) -> tuple[bool, float]:
    per_gpu = memory.training(shape, s)["per_gpu_gib"]
    return per_gpu <= limit_gib, per_gpu


def min_cluster(shape: Shape, s: Setup, limit_gib: float, most: int = 4096) -> dict | None:
    """The fewest workers (powers of two, whole nodes of `gpus_per_node`) at which the same job
    fits; None when none does (stage 0 and offloads replicate what does not fit)."""
    world = 1
    while world <= most:
        fits, per_gpu = _fits(shape, s.but(world=world), limit_gib)
        if fits:
            nodes = math.ceil(world / s.gpus_per_node)
            return {
                "nodes": nodes,
                "gpus_per_node": min(s.gpus_per_node, world),
                "num_workers": world,
                "per_gpu_gib": round(per_gpu, 2),
            }
        world *= 2
    return None


def fixes(shape: Shape, s: Setup, limit_gib: float) -> list[dict]:
    """Each change tried alone on the configured cluster, with its per-GPU figure; then a
    shorter sequence and more nodes."""
    out = []
    for name, override, change in FIXES:
        change = dict(change)
        if change.get("zero_stage", 0) is None:
            change["zero_stage"] = max(s.zero_stage, 1)
        if "method" in change and s.method not in ("lora", "dora"):
            continue
        if all(getattr(s, k) == v for k, v in change.items()):
            continue
        if "zero_stage" in change and change["zero_stage"] < s.zero_stage:
            continue
        fits, per_gpu = _fits(shape, s.but(**change), limit_gib)
        out.append(
            {"change": name, "set": override, "per_gpu_gib": round(per_gpu, 2), "fits": fits}
        )
    seq = s.seq_len // 2
    while seq >= 128:
        fits, per_gpu = _fits(shape, s.but(seq_len=seq), limit_gib)
        if fits:
            out.append(
                {
                    "change": f"max_seq_len {seq}",
                    "set": f"data.max_seq_len={seq}",
                    "per_gpu_gib": round(per_gpu, 2),
                    "fits": True,
                }
            )
            break
        seq //= 2
    more = min_cluster(shape, s, limit_gib)
    if more and more["num_workers"] > s.world:
        out.append(
            {
                "change": f"{more['num_workers']} workers on {more['nodes']} nodes",
                "set": f"cluster.num_workers={more['num_workers']}",
                "per_gpu_gib": more["per_gpu_gib"],
                "fits": True,
            }
        )
    return out


def flops_per_token(shape: Shape, s: Setup) -> dict:
    """Model FLOPs per trained token: 6N for a full fine-tune; for adapters the frozen weights
    still pay forward (2N) and the input gradients (2N), the adapters all three (6 x theirs);
    causal attention's score and value products (2 x 2 x seq x q_dim per layer forward, halved
    by the mask, x3 for backward). Mixtral counts its active experts only. Recomputation under
    gradient checkpointing is another forward, reported apart (not model FLOPs)."""
    n = shape.params()
    if shape.experts > 1:
        per_expert = 3 * shape.hidden * shape.intermediate * shape.layers
        n -= per_expert * (shape.experts - shape.experts_per_token)
    embed = shape.vocab * shape.hidden  # a lookup, not a matmul
    dense = n - embed if not shape.tied else n
    attention = 2 * 2 * s.seq_len * shape.q_dim * shape.layers / 2
    if s.method == "full":
        model = 6 * dense + 3 * attention
    else:
        model = 4 * dense + 6 * memory.adapter_params(shape, s) + 3 * attention
    recompute = (2 * dense + attention) if s.checkpointing else 0.0
    return {"model": model, "recompute": recompute}


def _data(cfg: JobConfig) -> dict[str, Any] | None:
    path = cfg.run_path / "data" / "data_report.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# JSONL training files hold about this many bytes per token of the text in them: ~4 characters a
# token for English BPE vocabularies, plus the JSON keys and quoting around every message.
BYTES_PER_TOKEN = 4.5


def _estimated_tokens(cfg: JobConfig) -> float | None:
    """The training files' tokens, estimated from their size (local files only; before
    `rayft prepare` has counted them)."""
    import glob

    total = 0
    for pattern in cfg.data.train_files:
        if "://" in pattern:
            return None
        for path in glob.glob(os.path.expanduser(pattern)):
            total += os.path.getsize(path)
    return total / BYTES_PER_TOKEN if total else None


def _measured_mfu(cfg: JobConfig) -> float | None:
    try:
        return json.loads((cfg.run_path / "train_summary.json").read_text()).get("mfu")
    except (OSError, ValueError):
        return None


def throughput(
    cfg: JobConfig, shape: Shape, s: Setup, gpu: gpus.Gpu, mfu: float | None, price: float | None
) -> dict:
    flops = flops_per_token(shape, s)
    measured = _measured_mfu(cfg)
    used = mfu or measured or gpu.mfu
    source = "--mfu" if mfu else "train_summary.json" if measured else f"default for {gpu.name}"
    per_gpu = used * gpu.peak_tflops * 1e12 / (flops["model"] + flops["recompute"])
    tokens_per_s = per_gpu * s.world
    t = cfg.training
    report = _data(cfg)
    fill = 1.0
    dataset_tokens = None if report else _estimated_tokens(cfg)
    if report:
        dataset_tokens = report.get("tokens", {}).get("train")
        if cfg.data.pack and report.get("packing_efficiency"):
            fill = report["packing_efficiency"]
        elif report.get("rows_out", {}).get("train") and dataset_tokens:
            fill = min(dataset_tokens / report["rows_out"]["train"] / s.seq_len, 1.0)
    sequences = t.max_steps * t.per_device_batch_size * t.gradient_accumulation_steps * s.world
    tokens = sequences * s.seq_len * fill
    hours = tokens / tokens_per_s / 3600
    return {
        "flops_per_token": flops["model"],
        "recompute_flops_per_token": flops["recompute"],
        "mfu": used,
        "mfu_source": source,
        "tokens_per_s": tokens_per_s,
        "train_tokens": tokens,
        "dataset_tokens": dataset_tokens,
        "epochs": tokens / dataset_tokens if dataset_tokens else None,
        "tokens_source": "data_report.json"
        if report
        else f"train files' bytes / {BYTES_PER_TOKEN} (not prepared yet)"
        if dataset_tokens
        else "max_steps x batch x max_seq_len",
        "hours": hours,
        "gpu_hours": hours * s.world,
        "cost_usd": hours * s.world * price if price is not None else None,
    }


def plan(
    cfg: JobConfig,
    gpu: str | None = None,
    price: float | None = None,
    mfu: float | None = None,
    concurrency: int | None = None,
    max_model_len: int | None = None,
) -> dict:
    """The plan of `cfg` on `gpu` (a GPU table name; None: the default GPU when the cluster uses
    GPUs, else this machine's RAM as one CPU node)."""
    shape = resolve(cfg.model.base)
    gpu = gpu or (cfg.cluster.gpu_type if cfg.cluster.use_gpu else None)
    on_gpu = gpu is not None or cfg.cluster.use_gpu
    card = gpus.find(gpu) if on_gpu else None
    s = setup_for(cfg, on_gpu)
    limit = card.memory_gib if card else _ram_gib() / max(s.world, 1)
    mem = memory.training(shape, s)
    fits = mem["per_gpu_gib"] <= limit
    out: dict[str, Any] = {
        "model": shape.name,
        "shape_source": shape.source,
        "params": shape.params(),
        "trainable_params": mem["trainable"],
        "method": s.method,
        "zero_stage": s.zero_stage,
        "device": card.name if card else "cpu",
        "device_memory_gib": round(limit, 2),
        "num_workers": s.world,
        "gpus_per_node": s.gpus_per_node,
        "micro_batch": s.micro_batch,
        "max_seq_len": s.seq_len,
        "gradient_checkpointing": s.checkpointing,
        "fits": fits,
        "per_gpu_gib": round(mem["per_gpu_gib"], 2),
        "breakdown": {k: round(v, 3) for k, v in mem["breakdown"].items()},
        "cpu_ram_gib_per_node": round(mem["cpu_ram_gib_per_node"], 2),
        "min_cluster": min_cluster(shape, s, limit),
        "fixes": [] if fits else fixes(shape, s, limit),
    }
    if card:
        out |= throughput(cfg, shape, s, card, mfu, price)
        length = max_model_len or min(
            shape.max_positions, cfg.data.max_seq_len + cfg.serve.max_tokens_limit
        )
        out["serving"] = memory.serving(
            shape,
            2,
            length,
            concurrency or cfg.serve.max_ongoing_requests,
            int(math.ceil(cfg.serve.gpus_per_replica)) or 1,
            card.memory_gib,
        )
    else:
        out |= {"tokens_per_s": None, "hours": None, "cost_usd": None, "serving": None}
    out["cheapest_fix"] = next((f for f in out["fixes"] if f["fits"]), None)
    return out


def check(cfg: JobConfig, gpu: str | None = None, what: str = "the job") -> dict | None:
    """The pre-launch check: the plan, raising when the job does not fit; None (with a notice)
    when the model's shape is unknown, which a launch should not be refused for."""
    from rayft.plan.render import render

    try:
        result = plan(cfg, gpu)
    except ShapeError as e:
        print(f"[rayft plan] not checked: {e}", flush=True)
        return None
    if not result["fits"]:
        fix = result["cheapest_fix"]
        sets = " ".join(f"--set {x}" for x in fix["set"].split()) if fix else ""
        hint = f"; cheapest fix: {fix['change']} ({sets})" if fix else ""
        raise RayftError(
            f"{what} does not fit: {result['per_gpu_gib']} GiB per "
            f"{'GPU' if result['device'] != 'cpu' else 'worker'} on {result['device']} "
            f"({result['device_memory_gib']} GiB){hint}. Run `rayft plan` for the options, or "
            "pass --no-plan-check to launch anyway.\n" + render(result)
        )
    return result
