"""The arms of a comparison: the base model and each fine-tuned candidate."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rayft import models
from rayft.adapters import AdapterError, base_linears, check_compatible, resolve_adapter
from rayft.evaluation.testset import EvalError

# Candidate names that mean "this run's own output" (see docs/contracts.md).
RUN_OUTPUTS = {"adapter": "adapter", "merged": "merged", "model": "model"}


@dataclass(frozen=True)
class Arm:
    name: str
    model: str  # a model directory (or hub id) that from_pretrained loads
    # A PEFT adapter directory applied on top of `model`. Its prompts use `model`'s tokenizer
    # even when the adapter was saved with one of its own: the server does too.
    adapter: str | None = None


def base_arm(base: str, revision: str | None = None) -> Arm:
    return Arm("base", models.resolve(base, revision))


def candidate_arm(candidate: str, run_dir: Path, base_model: str, max_lora_rank: int) -> Arm:
    """Resolve an `eval.candidates` entry to an adapter on the base or a whole model.

    Adapters must pass the server's own checks (safetensors only, LoRA shapes of this base, rank
    within `serve.max_lora_rank`): eval scores the answers `rayft serve` would give, and an
    adapter it would refuse has none. Checked here, before any replica loads a model.
    """
    path = run_dir / RUN_OUTPUTS[candidate] if candidate in RUN_OUTPUTS else Path(candidate)
    if (path / "adapter_config.json").exists():
        try:
            path = resolve_adapter(str(path), None, run_dir / "eval" / "adapter_cache")
            check_compatible(path, base_linears(base_model), max_lora_rank)
        except AdapterError as e:
            raise EvalError(f"eval.candidates: '{candidate}': {e.message}") from None
        return Arm(candidate, base_model, str(path))
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
