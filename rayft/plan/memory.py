"""Training and serving memory per GPU, as a breakdown, from a model's shape and a setup.

What is modelled (bytes per parameter, per token), and why:
- weights: the compute dtype (bf16 on GPU, fp32 on CPU) for full/LoRA/DoRA; for QLoRA the decoder
  layers' linear weights in 4 bits plus bitsandbytes' constants (one fp32 absmax per 64 weights,
  0.0625 B/param; with double quantization an 8-bit absmax plus one fp32 per 256 blocks,
  1/64 + 4/16384 B/param, the QLoRA paper's section 3), the rest (embeddings, norms, LM head) in
  the compute dtype.
- adapters: LoRA A and B (r x (in + out) per adapted linear layer), DoRA's magnitude vectors.
  PEFT keeps them in fp32 over a bf16 base (autocast_adapter_dtype) except under DeepSpeed, whose
  engine casts the whole module to bf16 and keeps fp32 masters in the optimizer.
- gradients and AdamW: without DeepSpeed (stage 0) the HF Trainer steps the parameters in their
  own dtype: grads and two moments in it (bf16 full fine-tunes keep no fp32 master). Under
  DeepSpeed ZeRO 1-3 the ZeRO paper's mixed-precision Adam: 16-bit grads, fp32 master, momentum
  and variance (12 B/param). ZeRO-1 divides the optimizer by the data-parallel size, ZeRO-2 the
  gradients too, ZeRO-3 the parameters too; offload moves the optimizer (with its fp32 gradient
  partition) or the parameters to the node's CPU RAM.
- activations: what autograd saves per decoder layer per token for transformers' Llama layout with
  SDPA (no seq x seq scores): two RMSNorms (an fp32 upcast and the normalized output), q/k/v,
  the attention output and o_proj's input, the MLP's gate, up, activation and product; plus
  LoRA dropout's copies of the adapted layers' inputs (and their masks). With gradient
  checkpointing only each layer's input is kept, plus one layer recomputed at a time.
- logits: vocab x tokens in the compute dtype, their fp32 upcast and fp32 log-softmax for the loss.
- allowance: CUDA context, cuBLAS workspaces, NCCL buffers (ALLOWANCE_GIB), and allocator
  fragmentation (FRAGMENTATION of the rest); on CPU none (the bench measures above a baseline).
- ZeRO buffers: DeepSpeed's reduce/all-gather buckets (5e8 elements by default, never more than the
  trainable parameters), ZeRO-3's gathered layers (the current and the prefetched one); DDP's
  gradient buckets (a second copy of the gradients) when stage 0 runs on several workers.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from rayft.plan.shapes import Shape

GIB = 1024**3
ALLOWANCE_GIB = 1.0
FRAGMENTATION = 0.05
BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size / allgather_bucket_size
NF4 = 0.5 + 4 / 64  # 4-bit codes + one fp32 absmax per 64-weight block
NF4_DOUBLE = 0.5 + 1 / 64 + 4 / (64 * 256)  # 8-bit absmax + one fp32 per 256 blocks


@dataclass(frozen=True)
class Setup:
    """One training job as the memory model sees it."""

    method: str = "lora"  # full | lora | qlora | dora
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    world: int = 1  # data-parallel workers, one per GPU
    gpus_per_node: int = 1
    micro_batch: int = 1
    seq_len: int = 1024
    checkpointing: bool = False
    dtype_bytes: int = 2  # compute dtype: 2 (bf16/fp16) on GPU, 4 (fp32) on CPU
    lora_r: int = 16
    lora_targets: tuple[str, ...] | str = "all-linear"
    lora_dropout: float = 0.05
    double_quant: bool = True
    adapter_bytes: int | None = None  # None: what PEFT and DeepSpeed pick (see the docstring)
    dpo: bool = False  # preference pairs: chosen and rejected in one batch, a reference model

    def but(self, **changes) -> Setup:
        return replace(self, **changes)


def adapted(shape: Shape, targets: tuple[str, ...] | str) -> dict[str, tuple[int, int, int]]:
    """The decoder layers' linear layers LoRA adapts (PEFT's `all-linear`: every one but the
    LM head; a list: those whose name ends a target)."""
    layers = shape.linears()
    if targets == "all-linear":
        return layers
    return {n: v for n, v in layers.items() if any(n == t or n.endswith(t) for t in targets)}


def adapter_params(shape: Shape, setup: Setup) -> int:
    if setup.method == "full":
        return 0
    mods = adapted(shape, setup.lora_targets).values()
    n = sum(setup.lora_r * (i + o) * c for i, o, c in mods)
    if setup.method == "dora":  # one magnitude per output feature
        n += sum(o * c for _, o, c in mods)
    return shape.layers * n


def trainable(shape: Shape, setup: Setup) -> int:
    return shape.params() if setup.method == "full" else adapter_params(shape, setup)


def _activations_per_token(shape: Shape, s: Setup) -> tuple[float, float]:
    """Bytes one decoder layer saves for backward per token: (the whole layer, its input)."""
    e, h, f = s.dtype_bytes, shape.hidden, shape.intermediate
    q, kv = shape.q_dim, shape.kv_dim
    norm = h * (4 + e) if e < 4 else 2 * h * 4  # fp32 upcast + normalized output
    active = shape.experts_per_token if shape.experts > 1 else 1
    layer = (
        shape.norms_per_layer * norm
        + e * (q + 2 * kv)  # q, k, v after RoPE, saved by SDPA
        + 2 * e * q  # the attention output and o_proj's input
        + 4 * e * f * active  # gate, up, act(gate), act(gate) * up
    )
    if s.method != "full" and s.lora_dropout > 0:  # dropout(x) per adapted layer, and its mask
        inputs = sum(i * c for i, _, c in adapted(shape, s.lora_targets).values())
        if shape.experts > 1:
            inputs = inputs * active // shape.experts
        layer += inputs * (e + 1)
    return layer, e * h


def _sequences(s: Setup) -> int:
    """Sequences in one micro-batch's forward: DPO runs chosen and rejected together."""
    return s.micro_batch * (2 if s.dpo else 1)


def activations(shape: Shape, s: Setup) -> float:
    tokens = _sequences(s) * s.seq_len
    layer, kept = _activations_per_token(shape, s)
    if s.checkpointing:
        return tokens * (shape.layers * kept + layer)
    return tokens * shape.layers * layer


def logits(shape: Shape, s: Setup) -> float:
    return _sequences(s) * s.seq_len * shape.vocab * (s.dtype_bytes + 8)


def training(shape: Shape, s: Setup) -> dict:
    """Bytes per GPU by part (GiB), the sum, and CPU RAM per node for offloads."""
    e = s.dtype_bytes
    n, lin, t = shape.params(), shape.linear_params(), trainable(shape, s)
    deepspeed = s.zero_stage > 0
    stage, world = s.zero_stage, s.world

    if s.method == "qlora":
        weights = lin * (NF4_DOUBLE if s.double_quant else NF4) + (n - lin) * e
    else:
        weights = n * e
    adapter_bytes = s.adapter_bytes or (e if deepspeed or e == 4 else 4)
    adapters = t * adapter_bytes if s.method != "full" else 0
    grad_bytes = e if deepspeed else (e if s.method == "full" else adapter_bytes)
    grads = t * grad_bytes
    if deepspeed:
        optimizer = t * (12 if e < 4 else 8)  # fp32 master (none when already fp32) + m + v
    else:
        optimizer = t * 2 * (e if s.method == "full" else adapter_bytes)

    cpu = 0.0
    if stage == 0 and s.offload_optimizer:  # bitsandbytes' paged AdamW: evicted under pressure
        cpu, optimizer = optimizer, 0.0
    if stage >= 1:
        optimizer /= world
        if s.offload_optimizer:
            # the node's workers' optimizer partitions, and their fp32 gradient partitions
            per_node = min(s.gpus_per_node, world)
            cpu += per_node * (optimizer + 4 * t / world)
            optimizer = 0.0
    if stage >= 2:
        grads /= world
    gathered = 0.0
    if stage == 3:
        weights /= world
        adapters /= world
        layer_w = shape.layer_params() * e
        embed_w = shape.vocab * shape.hidden * e
        gathered = layer_w + max(layer_w, embed_w)  # the current and the prefetched module
        if s.offload_params:
            cpu += min(s.gpus_per_node, world) * (weights + adapters)
            weights = adapters = 0.0

    buffers = 0.0
    if deepspeed:
        buffers = min(BUCKET, t) * e * (2 if stage in (1, 2) else 1) + gathered
    elif world > 1:
        buffers = t * grad_bytes  # DDP's gradient buckets: a second copy of the gradients

    # DPO's reference model: with an adapter, the base with the adapter switched off (nothing
    # more); a full fine-tune keeps a frozen copy of the weights (sharded like them by ZeRO-3).
    reference = n * e / (world if stage == 3 else 1) if s.dpo and s.method == "full" else 0.0
    parts = {
        "weights": weights,
        "reference": reference,
        "adapters": adapters,
        "gradients": grads,
        "optimizer": optimizer,
        "activations": activations(shape, s),
        "logits": logits(shape, s),
        "zero_buffers": buffers,
    }
    if e < 4:  # on a GPU; a CPU run has no CUDA context and its baseline is measured
        parts["framework"] = ALLOWANCE_GIB * GIB + FRAGMENTATION * sum(parts.values())
    else:
        parts["framework"] = 0.0
    total = sum(parts.values())
    return {
        "breakdown": {k: v / GIB for k, v in parts.items()},
        "per_gpu_gib": total / GIB,
        "model_states_gib": (weights + adapters + grads + optimizer) / GIB,
        "cpu_ram_gib_per_node": cpu / GIB,
        "trainable": t,
    }


def serving(
    shape: Shape,
    dtype_bytes: int,
    max_model_len: int,
    concurrency: int,
    gpus: int,
    memory_gib: float,
) -> dict:
    """Weights plus a full KV cache for `concurrency` sequences of `max_model_len` tokens, per GPU
    of a replica that splits both over `gpus` (tensor parallel)."""
    gpus = max(gpus, 1)
    weights = shape.params() * dtype_bytes / gpus
    per_seq = shape.kv_bytes_per_token(dtype_bytes) * max_model_len / gpus
    # activations of one max-length prefill chunk are small next to these; the allowance covers it
    overhead = ALLOWANCE_GIB * GIB + FRAGMENTATION * weights
    total = weights + per_seq * concurrency + overhead
    room = memory_gib * GIB - weights - overhead
    return {
        "fits": total <= memory_gib * GIB,
        "per_gpu_gib": total / GIB,
        "weights_gib": weights / GIB,
        "kv_cache_gib": per_seq * concurrency / GIB,
        "kv_bytes_per_token": shape.kv_bytes_per_token(dtype_bytes),
        "max_model_len": max_model_len,
        "concurrency": concurrency,
        "max_concurrency": max(int(room // per_seq), 0) if per_seq else 0,
        "gpus_per_replica": gpus,
    }
