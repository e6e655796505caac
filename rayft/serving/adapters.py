"""Find, vet and fingerprint PEFT adapters before any engine touches them.

Adapters loaded through the admin API come from clients, so the rules are strict: safetensors
only (a pickle `.bin` runs code on load), no `..`, and the real path (symlinks followed) must lie
under the allowed root. Compatibility with the base is decided from tensor shapes, not names:
the base's name in adapter_config.json differs between machines for the same weights.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from safetensors import safe_open

from rayft.serving.errors import AdapterRefused
from rayft.serving.protocol import AdapterRef

WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


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
        raise AdapterRefused(
            f"adapter path {spec!r} contains '..'; give a path under the root", "path"
        )
    path = Path(spec).expanduser()
    if root is not None:
        root = Path(root).resolve()
        path = path if path.is_absolute() else root / path
        if not _under(path.resolve(), root):
            raise AdapterRefused(
                f"adapter path {spec!r} resolves to {path.resolve()}, outside the allowed root "
                f"{root} (serve.adapter_root)",
                "path",
            )
    if not path.is_dir():
        raise AdapterRefused(f"adapter path {spec!r}: no such directory", "path")
    if not (path / CONFIG).exists() and (path / "adapter" / CONFIG).exists():
        path = path / "adapter"  # a run directory: `rayft train` writes <run_dir>/adapter/
    _check_files(path, Path(root).resolve() if root is not None else None)
    return path.resolve()


def _check_files(path: Path, root: Path | None) -> None:
    if not (path / CONFIG).exists():
        raise AdapterRefused(f"{path}: not a PEFT adapter (no {CONFIG})", "path")
    if not (path / WEIGHTS).exists():
        if (path / "adapter_model.bin").exists():
            raise AdapterRefused(
                f"{path}: only adapter_model.bin (pickle) found; pickles can run code when "
                "loaded, so only safetensors are served. Re-save with "
                "save_pretrained(safe_serialization=True).",
                "path",
            )
        raise AdapterRefused(f"{path}: no {WEIGHTS}", "path")
    if root is not None:
        for name in (CONFIG, WEIGHTS):
            real = (path / name).resolve()
            if not _under(real, root):
                raise AdapterRefused(
                    f"{path / name} is a link to {real}, outside the allowed root {root}", "path"
                )


def _fetch_s3(spec: str, cache_dir: Path) -> Path:
    """Copy the adapter's two files from S3 into a content-addressed local cache."""
    import fsspec

    fs, _, (prefix,) = fsspec.get_fs_token_paths(spec)
    prefix = prefix.rstrip("/")
    if not fs.exists(f"{prefix}/{CONFIG}") and fs.exists(f"{prefix}/adapter/{CONFIG}"):
        prefix = f"{prefix}/adapter"
    if not fs.exists(f"{prefix}/{WEIGHTS}"):
        raise AdapterRefused(f"{spec}: no {WEIGHTS} (only safetensors adapters are served)", "path")
    dest = cache_dir / hashlib.sha256(spec.encode()).hexdigest()[:16]
    dest.mkdir(parents=True, exist_ok=True)
    for name in (CONFIG, WEIGHTS):
        fs.get(f"{prefix}/{name}", str(dest / name))
    return dest


def read_config(path: Path) -> dict:
    cfg = json.loads((path / CONFIG).read_text())
    if cfg.get("peft_type") != "LORA":
        raise AdapterRefused(
            f"{path}: peft_type {cfg.get('peft_type')!r}; only LoRA adapters are served", "path"
        )
    return cfg


def lora_shapes(path: Path) -> dict[str, tuple[int, int, int]]:
    """Module name -> (rank, in_features, out_features) from the safetensors header."""
    shapes: dict[str, dict[str, list[int]]] = {}
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in key:
                    module = key.split(marker)[0].removeprefix("base_model.model.")
                    shapes.setdefault(module, {})[part] = list(f.get_slice(key).get_shape())
    out = {}
    for module, ab in shapes.items():
        if "lora_A" not in ab or "lora_B" not in ab:
            raise AdapterRefused(f"{path}: module {module} lacks lora_A or lora_B weights", "path")
        (r, fan_in), (fan_out, r_b) = ab["lora_A"][:2], ab["lora_B"][:2]
        if r != r_b:
            raise AdapterRefused(
                f"{path}: {module} has lora_A rank {r} but lora_B rank {r_b}", "path"
            )
        out[module] = (r, fan_in, fan_out)
    if not out:
        raise AdapterRefused(f"{path}: {WEIGHTS} holds no LoRA weights", "path")
    return out


def check_compatible(path: Path, base_linears: dict[str, tuple[int, int]], max_rank: int) -> dict:
    """Refuse an adapter whose modules or shapes do not exist in the base, or whose rank is too big.

    `base_linears`: module name -> (in_features, out_features) of the base's linear layers.
    """
    cfg = read_config(path)
    shapes = lora_shapes(path)
    ranks = sorted({r for r, _, _ in shapes.values()})
    if ranks[-1] > max_rank:
        raise AdapterRefused(
            f"{path}: LoRA rank {ranks[-1]} is above serve.max_lora_rank={max_rank}", "path"
        )
    base_name = cfg.get("base_model_name_or_path")
    for module, (_, fan_in, fan_out) in shapes.items():
        if module not in base_linears:
            raise AdapterRefused(
                f"{path}: adapts module {module!r}, which the base model does not have "
                f"(adapter was trained on {base_name!r})",
                "path",
            )
        if base_linears[module] != (fan_in, fan_out):
            raise AdapterRefused(
                f"{path}: {module} is {fan_in}->{fan_out} in the adapter but "
                f"{base_linears[module][0]}->{base_linears[module][1]} in the base model "
                f"(adapter was trained on {base_name!r})",
                "path",
            )
    return {"rank": ranks[-1], "modules": len(shapes), "dora": bool(cfg.get("use_dora"))}


def fingerprint(name: str, path: Path) -> AdapterRef:
    """An AdapterRef whose key changes when the weights file changes."""
    st = (path / WEIGHTS).stat()
    blob = f"{name}|{path}|{st.st_size}|{st.st_mtime_ns}".encode()
    key = "a" + hashlib.sha256(blob).hexdigest()[:12]
    return AdapterRef(name=name, path=str(path), key=key)


def base_linears(model_dir: str) -> dict[str, tuple[int, int]]:
    """Linear layers of a model, built on the meta device: shapes without loading weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    return {
        name: (m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
