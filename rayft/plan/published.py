"""Published memory figures and the planner's figure for the same setting: the table of
docs/planner.md, which tests/test_plan.py checks (`python -m rayft.plan.published` prints it).

Each row: what was published, where, in which unit, and the planner quantity that corresponds.
Rows whose published setting is incomplete are fit checks only (`fits` against a GPU size) and
count towards "none wrong about fits" but not towards the error goal.
"""

from __future__ import annotations

from dataclasses import dataclass

from rayft.plan import memory
from rayft.plan.memory import GIB, Setup
from rayft.plan.shapes import Shape, resolve

GB, MB = 1e9, 1e6


@dataclass(frozen=True)
class Figure:
    key: str
    source: str
    setting: str
    published: float  # in `unit`
    unit: str  # "GB" (1e9 bytes), "MB", "KB" or "fits <GiB>" for a fit check
    bound: str = "="  # "=" within the goal, ">" published as a lower bound


def _per_param(shape: Shape, s: Setup, params: float) -> float:
    """Model states (weights, adapters, gradients, optimizer) per GPU in bytes, scaled from the
    shape's parameter count to `params` (the ZeRO paper states them per parameter)."""
    states = memory.training(shape, s)["model_states_gib"] * GIB
    return states / shape.params() * params


def _states(name: str, s: Setup) -> float:
    return memory.training(resolve(name), s)["model_states_gib"] * GIB


def _peak(name: str, s: Setup) -> float:
    return memory.training(resolve(name), s)["per_gpu_gib"]


LLAMA = "meta-llama/Llama-2-7b-hf"
ZERO = "ZeRO paper (Rajbhandari et al. 2020, arXiv:1910.02054), Figure 1"
DS = Setup(method="full", zero_stage=1, world=1)  # DeepSpeed mixed-precision Adam, K = 12

FIGURES: list[tuple[Figure, float]] = []


def _add(fig: Figure, planned: float) -> None:
    FIGURES.append((fig, planned))


def build() -> list[tuple[Figure, float]]:
    """(figure, the planner's value in the figure's unit)."""
    if FIGURES:
        return FIGURES
    z = resolve(LLAMA)
    for key, stage, world, value, what in (
        ("zero-baseline", 1, 1, 120, "baseline DP (= ZeRO at Nd 1)"),
        ("zero-os", 1, 64, 31.4, "P_os, Nd 64"),
        ("zero-os-g", 2, 64, 16.6, "P_os+g, Nd 64"),
        ("zero-os-g-p", 3, 64, 1.9, "P_os+g+p, Nd 64"),
    ):
        _add(
            Figure(
                key,
                ZERO,
                f"7.5B params, mixed-precision Adam (K=12), {what}; model states",
                value,
                "GB",
            ),
            _per_param(z, DS.but(zero_stage=stage, world=world), 7.5e9) / GB,
        )
    _add(
        Figure(
            "zero-1.5b",
            "ZeRO paper, section 3.1",
            "GPT-2 1.5B, mixed-precision Adam; model states ('at least 24 GB')",
            24,
            "GB",
        ),
        _per_param(z, DS, 1.5e9) / GB,
    )
    _add(
        Figure(
            "pytorch-7b-full",
            "PyTorch blog 'Finetune LLMs on your own consumer hardware' (Belkada et al. 2023)",
            "Llama-2 7B full fine-tune, half-precision weights, mixed-precision Adam: 16 B/param "
            "'112GB (excluding the intermediate hidden states)'",
            112,
            "GB",
        ),
        _states(LLAMA, DS) / GB,
    )
    _add(
        Figure(
            "pytorch-7b-fp32",
            "same blog",
            "Llama-2 7B loaded in full precision: '28GB'",
            28,
            "GB",
        ),
        resolve(LLAMA).params() * 4 / GB,
    )
    gpt3 = Setup(method="lora", lora_r=4, lora_targets=("q_proj", "v_proj"), lora_dropout=0)
    _add(
        Figure(
            "lora-gpt3-vram",
            "LoRA paper (Hu et al. 2021, arXiv:2106.09685), section 4.2",
            "GPT-3 175B, LoRA r=4 on W_q, W_v, Adam: training VRAM '350GB' (the 16-bit weights)",
            350,
            "GB",
        ),
        _states("gpt3-175b", gpt3) / GB,
    )
    _add(
        Figure(
            "lora-gpt3-ckpt",
            "LoRA paper, section 4.2",
            "GPT-3 175B, LoRA r=4 on W_q, W_v: checkpoint '35MB' (fp16 adapters)",
            35,
            "MB",
        ),
        memory.adapter_params(resolve("gpt3-175b"), gpt3) * 2 / MB,
    )
    opt = resolve("facebook/opt-13b")
    vllm = "vLLM paper (Kwon et al. 2023, arXiv:2309.06180)"
    _add(
        Figure(
            "vllm-kv-token",
            f"{vllm}, section 3",
            "OPT-13B fp16 KV cache per token: '800 KB'",
            800,
            "KB",
        ),
        opt.kv_bytes_per_token(2) / 1024,  # the paper's KB is 1024 bytes: 2 x 5120 x 40 x 2
    )
    _add(
        Figure(
            "vllm-kv-request",
            f"{vllm}, section 3",
            "OPT-13B, one 2048-token request's KV cache: 'as much as 1.6 GB'",
            1.6,
            "GB",
        ),
        opt.kv_bytes_per_token(2) * 2048 / GB,
    )
    _add(
        Figure(
            "vllm-weights",
            f"{vllm}, Figure 1",
            "13B model on an A100 40GB: parameters '26GB'",
            26,
            "GB",
        ),
        opt.params() * 2 / GB,
    )
    aai = "Answer.AI, 'You can now train a 70b language model at home' (2024-03-06)"
    l70 = resolve("meta-llama/Llama-2-70b-hf")
    q = Setup(method="qlora", lora_r=64)
    _add(
        Figure("answerai-4bit", aai, "Llama 2 70B weights in 4 bits (QLoRA): '35GB'", 35, "GB"),
        memory.training(l70, q)["breakdown"]["weights"] * GIB / GB,
    )
    _add(
        Figure("answerai-16bit", aai, "Llama 2 70B weights in 16 bits: '140GB'", 140, "GB"),
        l70.params() * 2 / GB,
    )
    # fit checks: the published settings leave out batch or sequence details
    # the QLoRA repository casts the adapters to bf16 and pages AdamW's states to CPU RAM under
    # pressure (modelled as an offload); rayft keeps PEFT's fp32 adapters and has no paging
    qlora65 = Setup(
        method="qlora",
        lora_r=64,
        seq_len=512,
        checkpointing=True,
        adapter_bytes=2,
        offload_optimizer=True,
    )
    _add(
        Figure(
            "qlora-65b-48gb",
            "QLoRA paper (Dettmers et al. 2023, arXiv:2305.14314), abstract",
            "LLaMA 65B, NF4 + double quant, LoRA r=64 on all linear layers (bf16), paged AdamW, "
            "checkpointing; assumed: micro-batch 1, 512 tokens (Guanaco's source 384 + target 128)",
            48,
            "fits 44.7",  # 48 GB = 44.7 GiB
        ),
        _peak("huggyllama/llama-65b", qlora65),
    )
    aai_setup = Setup(
        method="qlora",
        lora_r=64,
        zero_stage=3,
        offload_params=True,
        world=2,
        gpus_per_node=2,
        checkpointing=True,
        seq_len=512,
    )
    _add(
        Figure(
            "answerai-70b-2x24gb",
            aai,
            "Llama 2 70B, QLoRA sharded over 2 GPUs (FSDP ~ ZeRO-3), checkpointing, CPU offload; "
            "assumed: micro-batch 1, 512 tokens",
            24,
            "fits 22.35",  # 24 GB = 22.35 GiB
        ),
        _peak("meta-llama/Llama-2-70b-hf", aai_setup),
    )
    _add(
        Figure(
            "qlora-65b-16bit",
            "QLoRA paper, abstract",
            "LLaMA 65B, regular 16-bit fine-tuning: '>780GB' (mixed-precision Adam assumed)",
            780,
            "GB",
            ">",
        ),
        _states("huggyllama/llama-65b", DS) / GB,
    )
    return FIGURES


def error(fig: Figure, planned: float) -> float | None:
    """Relative error of the plan for a numeric figure; None for fit checks and bounds."""
    if fig.unit.startswith("fits") or fig.bound != "=":
        return None
    return planned / fig.published - 1


def correct(fig: Figure, planned: float) -> bool:
    """Whether the plan agrees with the figure about fitting (or about the bound)."""
    if fig.unit.startswith("fits"):
        return planned <= float(fig.unit.split()[1])
    if fig.bound == ">":
        return planned > fig.published
    return abs(error(fig, planned)) <= 0.15


def markdown() -> str:
    rows = [
        "| # | published | source | setting | plan | error |",
        "|---|---|---|---|---|---|",
    ]
    for i, (fig, planned) in enumerate(build(), 1):
        err = error(fig, planned)
        if fig.unit.startswith("fits"):
            pub = f"fits {fig.published:g} GB"
            plan = f"{planned:.1f} GiB peak: {'fits' if correct(fig, planned) else 'does not fit'}"
            shown = "fit check"
        else:
            pub = f"{fig.bound if fig.bound != '=' else ''}{fig.published:g} {fig.unit}"
            plan = f"{planned:.4g} {fig.unit}"
            shown = (
                f"{err:+.1%}"
                if err is not None
                else ("holds" if correct(fig, planned) else "FAILS")
            )
        rows.append(f"| {i} | {pub} | {fig.source} | {fig.setting} | {plan} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown())
