"""The arms of a comparison: the base model and each fine-tuned candidate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rayft import models
from rayft.evaluation.testset import EvalError

# Candidate names that mean "this run's own output" (see docs/contracts.md).
RUN_OUTPUTS = {"adapter": "adapter", "merged": "merged", "model": "model"}


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # a model directory (or hub id) that from_pretrained loads
    adapter: str | None = None  # a PEFT adapter directory applied on top of `model`

    @property
    def tokenizer(self) -> str:
        """Adapters saved with their tokenizer (e.g. an added pad token) bring their own."""
        if self.adapter and (Path(self.adapter) / "tokenizer_config.json").exists():
            return self.adapter
        return self.model


def base_arm(base: str, revision: str | None = None) -> Arm:
    return Arm("base", models.resolve(base, revision))


def candidate_arm(candidate: str, run_dir: Path, base_model: str) -> Arm:
    """Resolve an `eval.candidates` entry to an adapter on the base or a whole model."""
    path = run_dir / RUN_OUTPUTS[candidate] if candidate in RUN_OUTPUTS else Path(candidate)
    if (path / "adapter_config.json").exists():
        return Arm(candidate, base_model, str(path.resolve()))
    if (path / "config.json").exists():
        return Arm(candidate, str(path.resolve()))
    hint = (
        f"run `rayft train` (or `rayft merge` for 'merged') first, or remove '{candidate}' "
        "from eval.candidates"
        if candidate in RUN_OUTPUTS
        else "give a PEFT adapter directory or a model directory"
    )
    raise EvalError(
        f"eval.candidates: '{candidate}' -> {path} is neither a PEFT adapter "
        f"(adapter_config.json) nor a model (config.json); {hint}"
    )
