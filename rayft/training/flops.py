"""Model FLOPs utilisation (MFU): achieved model FLOPs as a share of the accelerators' peak.

Per token, a full fine-tune costs ~6N FLOPs (forward 2N, backward 4N) for N parameters; LoRA,
QLoRA and DoRA skip the frozen weights' gradients, ~4N. Attention FLOPs are left out, as in the
PaLM paper's MFU, so the figure is comparable across sequence lengths.
"""

from __future__ import annotations

# Dense bf16 tensor-core peaks in TFLOP/s (vendor data sheets, without sparsity). The most
# specific name comes first: "H100 PCIe" must not match "H100", nor "L40" "L4".
PEAK_BF16_TFLOPS = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
)


def parameter_count(model_dir: str) -> int:
    """Parameters of the model in `model_dir`, counted on the meta device (no weights loaded)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return sum(p.numel() for p in model.parameters())


def flops_per_token(n_params: int, method: str) -> float:
    return (6 if method == "full" else 4) * n_params


def peak_tflops(device: str) -> float | None:
    """Peak of a GPU named as torch.cuda.get_device_name() names it; None when unknown."""
    for name, peak in PEAK_BF16_TFLOPS:
        if name in device:
            return peak
    return None


def mfu(tokens_per_s: float, per_token: float, devices: list[str]) -> float | None:
    """Tokens/s over all workers; one device name per worker. None on CPUs or unknown GPUs."""
    peaks = [peak_tflops(d) for d in devices]
    if not devices or None in peaks:
        return None
    return tokens_per_s * per_token / (sum(peaks) * 1e12)
