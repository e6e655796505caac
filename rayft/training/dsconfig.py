"""DeepSpeed config generated from a few keys (`training.deepspeed`), or the expert's raw one.

Sizes, learning rate and precision are left as "auto": the HF Trainer fills them in from its own
arguments, so the two can never disagree.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from rayft.errors import RayftError


class DeepSpeedConfigError(RayftError):
    """A raw DeepSpeed config that cannot be read."""


def deepspeed_config(
    zero_stage: int,
    offload_optimizer: bool = False,
    offload_params: bool = False,
    raw_config: str | dict[str, Any] | None = None,
) -> dict[str, Any] | None:
    """The DeepSpeed config dict for the HF Trainer, or None for plain DDP (stage 0, no raw)."""
    if raw_config is not None:
        config = copy.deepcopy(_read_raw(raw_config))
        zero = config.get("zero_optimization")
        if isinstance(zero, dict) and zero.get("stage") == 3:
            # As in the generated configs: without the gather a ZeRO-3 save writes no weights.
            # An expert who sets it false keeps that (checks refuse it for full fine-tuning).
            zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
        return config
    if zero_stage == 0:
        return None
    zero: dict[str, Any] = {
        "stage": zero_stage,
        "overlap_comm": False,
        "contiguous_gradients": True,
    }
    if offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if zero_stage == 3:
        # Without the gather, save_model under ZeRO-3 writes only the partitioned shards and the
        # run dir would hold no loadable model.
        zero["stage3_gather_16bit_weights_on_model_save"] = True
        if offload_params:
            zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "zero_optimization": zero,
        "train_micro_batch_size_per_gpu": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "train_batch_size": "auto",
        "bf16": {"enabled": "auto"},
        "fp16": {"enabled": "auto"},
    }


def zero_stage(config: dict[str, Any] | None) -> int:
    """The ZeRO stage of `config`, a `deepspeed_config` result (None: plain DDP, 0; 0 without a
    zero_optimization section). Decisions that depend on the stage (4-bit storage, device
    maps, what a save writes) must follow the config DeepSpeed is given, which for a raw
    config is not the unused zero_stage key."""
    if config is None:
        return 0
    zero = config.get("zero_optimization") or {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    if stage not in (0, 1, 2, 3):
        raise DeepSpeedConfigError(
            f"training.deepspeed.raw_config: zero_optimization.stage is {stage!r}; "
            "DeepSpeed knows stages 0, 1, 2 and 3"
        )
    return stage


def _read_raw(raw: str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    path = Path(raw).expanduser()
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise DeepSpeedConfigError(
            f"training.deepspeed.raw_config: cannot read {path} ({e.strerror}); give a JSON file "
            "path or an inline mapping"
        ) from e
    except json.JSONDecodeError as e:
        raise DeepSpeedConfigError(
            f"{path}:{e.lineno}: training.deepspeed.raw_config is not valid JSON: {e.msg}"
        ) from e
    if not isinstance(config, dict):
        raise DeepSpeedConfigError(
            f"{path}: training.deepspeed.raw_config must hold a JSON object, not "
            f"{type(config).__name__}"
        )
    return config
