"""Logit comparison on fixed prompts: the check behind every merge and export.

A merge or export is correct when the new weights compute the same function as the reference
(base + adapter for a merge, the merged model for an export). We compare logits at every position
of every verify prompt: the largest absolute difference, the same relative to the reference's
largest logit (so one threshold fits models whose logits differ in scale), and how often the
top-1 token agrees.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from rich.console import Console
from rich.table import Table

from rayft.export.errors import ExportError, VerificationError


@dataclass(frozen=True)
class Threshold:
    max_rel_diff: float  # max |Δlogit| / max |reference logit|
    min_top1: float  # fraction of positions whose argmax agrees


# Merges are exact up to float rounding in the dtype the weights are stored in.
#
# A GGUF file is checked twice (gguf_export.verify_gguf). "exact": against the source with every
# tensor rounded to the type the writer gave it. A correct file holds bit-identical values (0.0
# measured for f16, q8_0 and q4_0), so only float32 operation order may differ, plus llama3
# rope's inverse frequencies computed two ways (~1e-7): the f32 bound, for every type. This is
# the check that catches writer bugs; the per-type bounds below cannot, for 4 bits.
#
# Per type, against the source itself: the loss the encoding costs, measured on the default
# verify prompts (relative max |Δlogit|, top-1 agreement):
#   f16   SmolLM2-135M 1.0e-3 / 100%    tiny-llama + LoRA 1.3e-3 / 100%
#   q8_0  SmolLM2-135M 3.3e-2 / 97.3%   tiny-llama + LoRA 4.2e-2 / 97.4%
#   q4_0  SmolLM2-135M 0.63 / 60.2%     tiny-llama + LoRA 0.30 / 81.8%
# q4_0 rounds to a step of max|block|/8 where q8_0 uses max|block|/127: ~16x the noise, which
# scaled from q8_0's 4e-2 reaches the size of the logits themselves. So its relative bound is
# 1.0 (a perturbation as large as the largest logit), and top-1 decides: 0.40 sits four binomial
# standard deviations (4.6 points over 113 positions) under SmolLM2's 60%, so other prompts do
# not fail a correct file, and a file that keeps fewer than 2 in 5 of the source's greedy tokens
# is no longer a deployable copy of it. Such loss is not a writer bug: it fails with a hint to
# drop the type. (A file without the q/k permutation measures 0.79 / 56% on tiny-llama + LoRA,
# inside these bounds: hence the exact check.)
THRESHOLDS = {
    "float32": Threshold(1e-4, 0.99),
    "float16": Threshold(2e-2, 0.95),
    "bfloat16": Threshold(6e-2, 0.90),
    "exact": Threshold(1e-4, 0.99),
    "f32": Threshold(1e-4, 0.99),
    "f16": Threshold(2e-2, 0.95),
    "q8_0": Threshold(0.1, 0.85),
    "q4_0": Threshold(1.0, 0.40),
}


@dataclass(frozen=True)
class Comparison:
    name: str
    kind: str  # the key into THRESHOLDS
    tokens: int
    max_abs_diff: float
    rel_diff: float
    top1: float

    @property
    def threshold(self) -> Threshold:
        return THRESHOLDS[self.kind]

    @property
    def passed(self) -> bool:
        t = self.threshold
        return self.rel_diff <= t.max_rel_diff and self.top1 >= t.min_top1

    def summary(self) -> dict:
        return {
            "name": self.name,
            "kind": self.kind,
            "tokens": self.tokens,
            "max_abs_logit_diff": self.max_abs_diff,
            "rel_logit_diff": self.rel_diff,
            "top1_agreement": self.top1,
            "threshold": {
                "max_rel_diff": self.threshold.max_rel_diff,
                "min_top1": self.threshold.min_top1,
            },
            "passed": self.passed,
        }


def render_prompts(tokenizer, prompts: list[str]) -> list[str]:
    """Each prompt as a user turn when the tokenizer has a chat template (the input a deployed
    chat model sees), else as plain text."""
    if not prompts:
        raise ExportError("export.verify_prompts is empty; verification needs at least one prompt")
    if not tokenizer.chat_template:
        return list(prompts)
    return [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True
        )
        for p in prompts
    ]


def prompt_ids(tokenizer, prompts: list[str]) -> list[list[int]]:
    """The ids `rayft serve` and `rayft eval` build: a rendered chat turn is tokenized without
    special tokens, since the template writes its own (Llama-3's starts with <|begin_of_text|>,
    which the tokenizer would add a second time); plain text with them."""
    add_special = not tokenizer.chat_template
    return [
        tokenizer(text, add_special_tokens=add_special)["input_ids"]
        for text in render_prompts(tokenizer, prompts)
    ]


@torch.no_grad()
def forward_logits(model, ids: list[list[int]]) -> list[torch.Tensor]:
    """Logits (float32, on CPU) per prompt; one prompt per forward so no padding enters."""
    model.eval()
    device = next(model.parameters()).device
    return [model(torch.tensor([seq], device=device)).logits[0].float().cpu() for seq in ids]


def compare(
    name: str, kind: str, reference: list[torch.Tensor], output: list[torch.Tensor]
) -> Comparison:
    ref, out = torch.cat(reference), torch.cat(output)
    if ref.shape != out.shape:
        raise VerificationError(
            f"{name}: logits have shape {list(out.shape)}, expected {list(ref.shape)}"
        )
    diff = (ref - out).abs().max().item()
    scale = ref.abs().max().item() or 1.0
    top1 = (ref.argmax(-1) == out.argmax(-1)).float().mean().item()
    return Comparison(name, kind, ref.shape[0], diff, diff / scale, top1)


def show(comparisons: list[Comparison], title: str, console: Console | None = None) -> None:
    table = Table(title=title)
    for col in ("check", "tokens", "max |Δlogit|", "relative", "top-1", "limit", "result"):
        table.add_column(col, justify="left" if col == "check" else "right")
    for c in comparisons:
        t = c.threshold
        table.add_row(
            c.name,
            str(c.tokens),
            f"{c.max_abs_diff:.1e}",
            f"{c.rel_diff:.1e}",
            f"{c.top1:.1%}",
            f"{t.max_rel_diff:.0e} / {t.min_top1:.0%}",
            "[green]pass[/]" if c.passed else "[red]FAIL[/]",
        )
    (console or Console()).print(table)


def require_pass(comparisons: list[Comparison], what: str, hint: str) -> None:
    failed = [c for c in comparisons if not c.passed]
    if failed:
        lines = [
            f"  {c.name}: relative logit diff {c.rel_diff:.2e} "
            f"(max {c.threshold.max_rel_diff:.0e}), top-1 agreement {c.top1:.1%} "
            f"(min {c.threshold.min_top1:.0%})"
            for c in failed
        ]
        raise VerificationError(
            f"{what} failed verification; nothing was written:\n" + "\n".join(lines) + "\n" + hint
        )
