"""Find, vet, read and fingerprint PEFT adapters: the one set of rules for merge, export, eval
and serving, before any weights load.

Files: safetensors only. A pickle (`adapter_model.bin` / `.pt`) can run code when loaded, even
with weights_only, and adapters reach the server from clients. Client paths have no `..` and
must lie, symlinks followed, under the allowed root.

Compatibility with a base is decided from tensor shapes read from file headers, not names (the
base's name in adapter_config.json differs between machines for the same weights), so a wrong
base is refused in milliseconds, not after loading a 70B model. The base's shapes come from its
config on the meta device, where a tied output projection is still a module of its own.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from safetensors import safe_open

from rayft.errors import RayftError

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"
_PREFIX = "base_model.model."
_MAGNITUDE = ".lora_magnitude_vector"


class AdapterError(RayftError):
    """An adapter that is unsafe, malformed or made for another base: nothing was loaded.
    `param` names the request field at fault when a server answers with it."""

    def __init__(self, message: str, param: str = "path"):
        super().__init__(message)
        self.message = message
        self.param = param

    def __reduce__(self):  # keep param when Ray ships the error between processes
        return (type(self), (self.message, self.param))


# ------------------------------------------------------------------ finding and vetting files


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_adapter(spec: str, root: str | Path | None, cache_dir: str | Path) -> Path:
    """Turn an adapter spec (run dir, adapter dir, or s3:// prefix) into a vetted local directory.

    `root=None` trusts the path (adapters from the operator's config); otherwise the path must be
    relative to, or an absolute path inside, `root` after following symlinks.
    """
    if spec.startswith("s3://"):
        return _fetch_s3(spec, Path(cache_dir))
    if ".." in Path(spec).parts:
        raise AdapterError(f"adapter path {spec!r} contains '..'; give a path under the root")
    path = Path(spec).expanduser()
    if root is not None:
        root = Path(root).resolve()
        path = path if path.is_absolute() else root / path
        if not _under(path.resolve(), root):
            raise AdapterError(
                f"adapter path {spec!r} resolves to {path.resolve()}, outside the allowed root "
                f"{root} (serve.adapter_root)"
            )
    if not path.is_dir():
        raise AdapterError(f"adapter path {spec!r}: no such directory")
    if not (path / CONFIG).exists() and (path / "adapter" / CONFIG).exists():
        path = path / "adapter"  # a run directory: `rayft train` writes <run_dir>/adapter/
    vet(path, Path(root).resolve() if root is not None else None)
    return path.resolve()


def vet(path: Path, root: Path | None = None) -> None:
    """An adapter directory with a config and safetensors weights (never a pickle); with a
    `root`, files that are links must point under it too."""
    if not (path / CONFIG).exists():
        raise AdapterError(f"{path}: not a PEFT adapter (no {CONFIG})")
    if not (path / WEIGHTS).exists():
        pickles = sorted(path.glob("adapter_model*.bin")) + sorted(path.glob("adapter_model*.pt"))
        if pickles:
            raise AdapterError(
                f"{pickles[0]}: adapter weights are a pickle file, which rayft refuses to load "
                "because unpickling can run arbitrary code. Convert it to "
                f"{WEIGHTS} where you trust its origin (PeftModel.save_pretrained with "
                "safe_serialization=True)"
            )
        raise AdapterError(f"{path}: no {WEIGHTS}; the adapter is incomplete")
    if root is not None:
        for name in (CONFIG, WEIGHTS):
            real = (path / name).resolve()
            if not _under(real, root):
                raise AdapterError(
                    f"{path / name} is a link to {real}, outside the allowed root {root}"
                )


def _fetch_s3(spec: str, cache_dir: Path) -> Path:
    """Copy the adapter's two files from S3 into a content-addressed local cache."""
    import fsspec

    fs, _, (prefix,) = fsspec.get_fs_token_paths(spec)
    prefix = prefix.rstrip("/")
    if not fs.exists(f"{prefix}/{CONFIG}") and fs.exists(f"{prefix}/adapter/{CONFIG}"):
        prefix = f"{prefix}/adapter"
    if not fs.exists(f"{prefix}/{WEIGHTS}"):
        raise AdapterError(f"{spec}: no {WEIGHTS} (only safetensors adapters are loaded)")
    dest = cache_dir / hashlib.sha256(spec.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        fs.get(f"{prefix}/{name}", str(dest / name))
    return dest


# ------------------------------------------------------------------ reading


def read_config(path: Path) -> dict:
    """adapter_config.json of the adapter directory `path`; a LoRA config (LoRA, QLoRA, DoRA)."""
    file = path / CONFIG
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise AdapterError(f"{path}: not a PEFT adapter (no {CONFIG})") from None
    except json.JSONDecodeError as e:
        raise AdapterError(
            f"{file}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); the adapter is corrupted "
            "(a rayft run keeps copies in <run_dir>/checkpoints)"
        ) from None
    except UnicodeDecodeError:
        raise AdapterError(f"{file}: not a text file; the adapter is corrupted") from None
    if not isinstance(config, dict) or "peft_type" not in config:
        raise AdapterError(f"{file}: field 'peft_type' missing; this is not a PEFT adapter config")
    if config["peft_type"] != "LORA":
        raise AdapterError(
            f"{file}: field 'peft_type' is {config['peft_type']!r}; only LoRA adapters (LoRA, "
            "QLoRA, DoRA) are supported"
        )
    return config


def kind(path: Path) -> str:
    """ "dora" or "lora": what an engine must be able to serve for this adapter."""
    return "dora" if read_config(path).get("use_dora") else "lora"


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor name (PEFT's saved form) -> shape, from the weights file's header."""
    file = path / WEIGHTS
    try:
        with safe_open(str(file), "pt") as f:  # reads the header; validates offsets vs file size
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    except Exception as e:  # safetensors raises its own error types from Rust
        raise AdapterError(
            f"{file}: not a readable safetensors file ({e}); the adapter is corrupted (a rayft "
            "run keeps copies in <run_dir>/checkpoints)"
        ) from None


def lora_shapes(path: Path) -> dict[str, tuple[int, int, int]]:
    """Module name -> (rank, in_features, out_features) of its lora_A/lora_B pair."""
    pairs: dict[str, dict[str, tuple[int, ...]]] = {}
    shapes = tensor_shapes(path)
    for key, shape in shapes.items():
        for part in ("lora_A", "lora_B"):
            marker = f".{part}."
            if marker in key:
                module = key.split(marker)[0].removeprefix(_PREFIX)
                pairs.setdefault(module, {})[part] = shape
    out = {}
    for module, ab in pairs.items():
        if "lora_A" not in ab or "lora_B" not in ab:
            raise AdapterError(f"{path}: module {module} lacks lora_A or lora_B weights")
        (r, fan_in), (fan_out, r_b) = ab["lora_A"][:2], ab["lora_B"][:2]
        if r != r_b:
            raise AdapterError(f"{path}: {module} has lora_A rank {r} but lora_B rank {r_b}")
        out[module] = (r, fan_in, fan_out)
    if not any(".lora_" in key for key in shapes):
        raise AdapterError(f"{path}: {WEIGHTS} holds no LoRA weights")
    return out


# ------------------------------------------------------------------ fitting a base


def base_linears(model_dir: str, trust_remote_code: bool = False) -> dict[str, tuple[int, int]]:
    """Linear layers of a model, built on the meta device: shapes without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    return linears(model)


def linears(model) -> dict[str, tuple[int, int]]:
    """Module name -> (in_features, out_features) of a model's linear layers: what LoRA adapts."""
    import torch

    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }


def check_compatible(
    path: Path, base_linears: dict[str, tuple[int, int]], max_rank: int | None = None
) -> dict:
    """Refuse an adapter whose modules or shapes do not exist in the base, or whose rank is above
    `max_rank` (None: any rank, as for a merge). {"rank", "modules", "dora"} of one that fits.

    `base_linears`: module name -> (in_features, out_features) of the base's linear layers.
    Checked: each lora_A/lora_B pair, DoRA's magnitude vector (out,), and whole weights saved
    with the adapter (modules_to_save) of a linear layer (out, in).
    """
    cfg = read_config(path)
    lora = lora_shapes(path)
    rank = max((r for r, _, _ in lora.values()), default=0)
    if max_rank is not None and rank > max_rank:
        raise AdapterError(f"{path}: LoRA rank {rank} is above serve.max_lora_rank={max_rank}")
    trained_on = f"the adapter was trained on {cfg.get('base_model_name_or_path')!r}"

    def base_module(module: str) -> tuple[int, int]:
        if module not in base_linears:
            raise AdapterError(
                f"{path}: adapts module {module!r}, which the base model does not have: "
                f"{trained_on}, a different base; use the base it was trained on (model.base)"
            )
        return base_linears[module]

    def wrong(what: str, got: str, expected: str) -> AdapterError:
        return AdapterError(
            f"{path}: {what} is {got} in the adapter but {expected} in the base model: wrong "
            f"shapes, {trained_on}, a different base; use the base it was trained on (model.base)"
        )

    for module, (_, fan_in, fan_out) in sorted(lora.items()):
        if base_module(module) != (fan_in, fan_out):
            b_in, b_out = base_linears[module]
            raise wrong(module, f"{fan_in}->{fan_out}", f"{b_in}->{b_out}")
    for key, shape in sorted(tensor_shapes(path).items()):
        name = key.removeprefix(_PREFIX)
        if name.endswith(_MAGNITUDE):
            module = name.removesuffix(_MAGNITUDE)
            if shape != (base_module(module)[1],):
                out = base_linears[module][1]
                raise wrong(f"{module}'s DoRA magnitude", str(list(shape)), f"[{out}] (outputs)")
        elif ".lora_" not in name and name.endswith(".weight"):
            module = name.removesuffix(".weight").removesuffix(".base_layer")
            if module in base_linears and shape != base_linears[module][::-1]:
                b_in, b_out = base_linears[module]
                raise wrong(f"{module}'s saved weight", str(list(shape)), f"[{b_out}, {b_in}]")
    return {"rank": rank, "modules": len(lora), "dora": bool(cfg.get("use_dora"))}


@dataclass(frozen=True)
class AdapterRef:
    """An adapter as engines see it: `key` changes whenever the files behind `name` change, so a
    replica never keeps serving stale weights under a reused name."""

    name: str
    path: str
    key: str


def fingerprint(name: str, path: Path) -> AdapterRef:
    """An AdapterRef whose key changes when the weights file changes."""
    st = (path / WEIGHTS).stat()
    blob = f"{name}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()
    key = "a" + hashlib.sha256(blob).hexdigest()[:12]
    return AdapterRef(name=name, path=str(path), key=key)
