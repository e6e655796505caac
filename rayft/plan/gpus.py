"""GPU types the planner knows: memory, dense bf16 peak, and a default MFU.

Memory is the `memory.total` nvidia-smi reports (MiB; a little under the marketed GB, and the
CUDA context takes its share on top, see memory.ALLOWANCE_GIB). Peaks are dense bf16 tensor-core
TFLOP/s without sparsity, from NVIDIA's data sheets: H100/H200 SXM (989.4), A100 (312), L40S
(362.05), L4 (121), and the Ada whitepaper for the RTX 4090 (165.2, bf16 with fp32 accumulate).
A10G has no public NVIDIA data sheet (AWS's variant of the A10, whose sheet says 125): 70 is the
figure commonly quoted for it, not verified.

Default MFU: the share of peak a Hugging Face Trainer + DeepSpeed fine-tune of a mid-sized model
typically reaches at bf16, without recomputation; a guess to be replaced by a measured one
(`--mfu`, or the `mfu` of a finished run's train_summary.json).
"""

from __future__ import annotations

from dataclasses import dataclass

from rayft.errors import RayftError


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_mib: int
    peak_tflops: float
    mfu: float

    @property
    def memory_gib(self) -> float:
        return self.memory_mib / 1024


GPUS = {
    g.name: g
    for g in (
        Gpu("H200-141GB", 143771, 989.4, 0.35),
        Gpu("H100-80GB", 81559, 989.4, 0.35),
        Gpu("A100-80GB", 81920, 312.0, 0.40),
        Gpu("A100-40GB", 40960, 312.0, 0.40),
        Gpu("L40S-48GB", 46068, 362.05, 0.30),
        Gpu("A10G-24GB", 23028, 70.0, 0.30),
        Gpu("L4-24GB", 23034, 121.0, 0.30),
        Gpu("RTX4090-24GB", 24564, 165.2, 0.30),
    )
}
DEFAULT = "H100-80GB"


def find(name: str | None) -> Gpu:
    """A GPU by its table name, or a prefix of it (`h100`, `a100-40`); the default for None."""
    if name is None:
        return GPUS[DEFAULT]
    exact = [
        g for key, g in GPUS.items() if name.lower() in (key.lower(), key.split("-")[0].lower())
    ]
    matches = exact or [g for key, g in GPUS.items() if key.lower().startswith(name.lower())]
    if len(matches) == 1:
        return matches[0]
    raise RayftError(
        f"--gpu {name}: {'ambiguous' if matches else 'unknown'} GPU type; the planner knows "
        + ", ".join(GPUS)
    )
