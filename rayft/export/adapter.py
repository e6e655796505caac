"""Read a PEFT adapter directory safely and check it fits the base before any weights load.

Checks run on file headers only (adapter_config.json and safetensors headers), so a wrong base
is refused in milliseconds, not after loading a 70B model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from rayft.export.errors import ExportError

ADAPTER_WEIGHTS = "adapter_model.safetensors"
_PREFIX = "base_model.model."


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    shapes: dict[str, tuple[int, ...]]  # tensor name (PEFT's saved form) -> shape

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def use_dora(self) -> bool:
        return bool(self.config.get("use_dora"))


def read_adapter(path: Path) -> Adapter:
    """Validate an adapter directory: JSON config, safetensors weights, never pickles."""
    if not path.is_dir():
        raise ExportError(f"{path}: no adapter directory; run `rayft train` first")
    weights = path / ADAPTER_WEIGHTS
    pickles = [p.name for p in path.glob("adapter_model*.bin")] + [
        p.name for p in path.glob("adapter_model*.pt")
    ]
    if not weights.exists():
        if pickles:
            # torch.load on a pickle can execute arbitrary code: never load one, even weights_only.
            raise ExportError(
                f"{path / pickles[0]}: adapter weights are a pickle file, which rayft refuses to "
                "load because unpickling can run arbitrary code. Convert it to "
                f"{ADAPTER_WEIGHTS} where you trust its origin (PeftModel.save_pretrained with "
                "safe_serialization=True), or re-run `rayft train`"
            )
        raise ExportError(f"{path}: no {ADAPTER_WEIGHTS}; the adapter is incomplete")
    config = _read_config(path / "adapter_config.json")
    return Adapter(path=path, config=config, shapes=_read_shapes(weights))


def _read_config(path: Path) -> dict:
    if not path.exists():
        raise ExportError(f"{path}: missing; an adapter directory needs its adapter_config.json")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ExportError(
            f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the adapter is corrupted, "
            "restore it from <run_dir>/checkpoints or re-run `rayft train`"
        ) from None
    except UnicodeDecodeError:
        raise ExportError(f"{path}: not a text file; the adapter is corrupted") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise ExportError(f"{path}: field 'peft_type' missing; this is not a PEFT adapter config")
    if config["peft_type"] != "LORA":
        raise ExportError(
            f"{path}: field 'peft_type' is {config['peft_type']!r}; only LORA adapters "
            "(LoRA, QLoRA, DoRA) can be merged into the base"
        )
    return config


def _read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    try:
        with safe_open(str(path), "pt") as f:  # reads the header; validates offsets vs file size
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types from Rust
        raise ExportError(
            f"{path}: not a readable safetensors file ({e}); the adapter is corrupted, restore it "
            "from <run_dir>/checkpoints or re-run `rayft train`"
        ) from None


def base_shapes(base_dir: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a local safetensors model, from headers only ({} if not local)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(base_dir.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})  # noqa: SIM118
    return shapes


def check_fits_base(adapter: Adapter, shapes: dict[str, tuple[int, ...]], base: str) -> None:
    """Every adapted module exists in the base with the shapes the adapter was trained on."""
    if not shapes:
        return  # a hub id: PEFT's own load errors are the check
    trained_on = f" (adapter_config.json: base_model_name_or_path={adapter.base_name!r})"
    for key, shape in sorted(adapter.shapes.items()):
        name = key.removeprefix(_PREFIX)
        if ".lora_A." in name or ".lora_B." in name or name.endswith(".lora_magnitude_vector"):
            module = name.split(".lora_")[0]
            weight = shapes.get(f"{module}.weight")
            if weight is None and module == "lm_head":  # tied embeddings store one matrix
                weight = shapes.get("model.embed_tokens.weight")
            if weight is None:
                raise ExportError(
                    f"{adapter.path}: adapts module '{module}', which base '{base}' does not "
                    f"have: the adapter was trained on a different base{trained_on}. Set "
                    "model.base to the model it was trained on"
                )
            # lora_A is (r, in); lora_B is (out, r); DoRA's magnitude is (out,)
            if name.split(".lora_")[1].startswith("A"):
                got, expected = shape[-1], weight[-1]
            else:
                got, expected = shape[0], weight[0]
            if got != expected:
                raise ExportError(
                    f"{adapter.path / ADAPTER_WEIGHTS}: tensor '{key}' has shape {list(shape)}, "
                    f"but '{module}' in base '{base}' is {list(weight)} (out, in): wrong shapes, "
                    f"the adapter was trained on a different base{trained_on}. Set model.base "
                    "to the model it was trained on"
                )
        elif name in shapes and shapes[name] != shape:
            raise ExportError(
                f"{adapter.path / ADAPTER_WEIGHTS}: tensor '{key}' has shape {list(shape)}, "
                f"base '{base}' has {list(shapes[name])}: wrong shapes{trained_on}"
            )
