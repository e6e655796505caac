"""`run.json`: the manifest that makes a run directory readable by a person.

Each stage adds its own section (config hash, data hash, base model, package versions, metrics);
nothing is passed between stages by side channel.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from importlib import metadata
from pathlib import Path
from typing import Any

from rayft.config import JobConfig

_PACKAGES = ("rayft", "ray", "torch", "transformers", "peft", "trl", "deepspeed", "bitsandbytes")


def package_versions() -> dict[str, str]:
    out = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out


def hash_files(paths: list[Path]) -> str:
    """Content hash of a set of files (order-independent by path)."""
    h = hashlib.sha256()
    for p in sorted(paths, key=str):
        h.update(str(p.name).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:16]


def read_manifest(run_dir: str | Path) -> dict[str, Any]:
    path = Path(run_dir) / "run.json"
    return json.loads(path.read_text()) if path.exists() else {}


def record_stage(run_dir: str | Path, stage: str, cfg: JobConfig, **info: Any) -> dict[str, Any]:
    """Merge one stage's section into run.json (atomic replace)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(run_dir)
    manifest.setdefault("name", cfg.name)
    manifest["base_model"] = {"id": cfg.model.base, "revision": cfg.model.revision}
    manifest.setdefault("stages", {})[stage] = {
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": cfg.digest(),
        "packages": package_versions(),
        **info,
    }
    tmp = run_dir / f".run.json.{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=2, default=str) + "\n")
    tmp.replace(run_dir / "run.json")
    return manifest
