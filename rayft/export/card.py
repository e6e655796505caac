"""Where the weights came from: the merged model's README.md, readable by a person, and the same
lineage for the GGUF metadata, readable by llama.cpp and the tools around it."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from rayft import models


def _find(tree: Any, key: str) -> Any:
    """First value under `key` anywhere in a nested manifest (stages record it where they like)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            if (found := _find(value, key)) is not None:
                return found
    return None


@dataclass(frozen=True)
class Lineage:
    name: str  # the run's name
    base: str  # model.base as configured: a registry name, a local directory or a hub id
    revision: str | None
    method: str  # training.method
    adapter_hash: str | None  # content hash of <run_dir>/adapter/; None for a full fine-tune
    data_hash: str | None
    config_hash: str | None  # of the training run's config
    license: str | None  # the base model's, where it is known

    @property
    def base_name(self) -> str:
        return Path(self.base).name if _is_path(self.base) else self.base

    @property
    def base_repo_url(self) -> str | None:
        """Hub ids only: a registry name or a local directory has no public address."""
        if _is_path(self.base) or self.base in models.REGISTRY or self.base.count("/") != 1:
            return None
        return f"https://huggingface.co/{self.base}"


def _is_path(base: str) -> bool:
    return base.startswith((".", "/", "~")) or Path(base).expanduser().exists()


def base_license(base: str) -> str | None:
    """The registry's license, or a local model's from its README front matter (the hub's
    convention); a hub id is not looked up: export runs offline."""
    for name, entry in models.REGISTRY.items():
        if base == name or Path(base).expanduser().resolve() == models.cache_dir(name).resolve():
            return entry.license
    readme = Path(base).expanduser() / "README.md"
    if not readme.is_file():
        return None
    match = re.match(r"---\n(.*?)\n---", readme.read_text(errors="replace"), re.DOTALL)
    try:
        front = yaml.safe_load(match.group(1)) if match else None
    except yaml.YAMLError:
        return None
    value = front.get("license") if isinstance(front, dict) else None
    return str(value) if value else None


def lineage(
    name: str,
    base: str,
    revision: str | None,
    method: str,
    manifest: dict,
    adapter_hash: str | None,
) -> Lineage:
    """The lineage run.json records, with the adapter hash of the merge it describes."""
    train_stage = manifest.get("stages", {}).get("train", {})
    return Lineage(
        name=name,
        base=base,
        revision=revision,
        method=method,
        adapter_hash=adapter_hash,
        data_hash=_find(manifest, "data_hash"),
        config_hash=train_stage.get("config_hash"),
        license=base_license(base),
    )


def _eval_summary(report: Path) -> str:
    if not report.exists():
        return "No evaluation yet (`rayft eval` writes eval/report.json)."
    try:
        data = json.loads(report.read_text())
    except (OSError, json.JSONDecodeError) as e:
        return f"eval/report.json is unreadable ({e})."
    summary = data.get("summary", data) if isinstance(data, dict) else data
    if isinstance(summary, dict):  # scalars only: the full report lives next to it
        summary = {k: v for k, v in summary.items() if not isinstance(v, (list, dict))} or summary
    text = json.dumps(summary, indent=2, default=str)
    return f"From `eval/report.json`:\n\n```json\n{text[:4000]}\n```"


def write_card(
    dest: Path,
    *,
    lineage: Lineage,
    adapter: Path,
    training: dict,
    manifest: dict,
    verification: dict,
    eval_report: Path,
) -> Path:
    name, base, revision, method = lineage.name, lineage.base, lineage.revision, lineage.method
    train_stage = manifest.get("stages", {}).get("train", {})
    train_info = {k: v for k, v in train_stage.items() if k not in ("packages",)}
    # The Hub reads `base_model` as a hub id: a registry name or a local directory would link
    # nowhere (and leak the path), so only hub ids go in; the table below names any base.
    front = {"base_model": base} if lineage.base_repo_url else {}
    front |= {"library_name": "transformers", "tags": ["rayft", method, "merged"]}
    if lineage.license:
        front["license"] = lineage.license.lower()
    lines = [
        "---",
        yaml.safe_dump(front, sort_keys=False).strip(),
        "---",
        "",
        f"# {name} (merged)",
        "",
        f"`{method}` adapter merged into its base with `rayft merge`: a plain transformers model, "
        "no PEFT needed to load it.",
        "",
        "## Lineage",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{base}`" + (f" @ `{revision}`" if revision else "") + " |",
        f"| adapter | `{adapter}` (content hash `{lineage.adapter_hash}`) |",
        f"| method | {method} |",
        f"| data hash | `{lineage.data_hash or 'not recorded'}` |",
        f"| training config hash | `{lineage.config_hash or 'not recorded'}` |",
        "",
        "## Verification",
        "",
        f"Logits of this model vs {verification.get('reference', 'the reference')} on the fixed "
        "verify prompts (`export.verify_prompts`):",
        "",
        f"```json\n{json.dumps(verification, indent=2)}\n```",
        "",
        "## Training config",
        "",
        f"```yaml\n{yaml.safe_dump(training, sort_keys=False).strip()}\n```",
        "",
    ]
    if train_info:
        lines += [
            "Training run (run.json):",
            "",
            f"```json\n{json.dumps(train_info, indent=2, default=str)}\n```",
            "",
        ]
    lines += ["## Evaluation", "", _eval_summary(eval_report), ""]
    path = dest / "README.md"
    path.write_text("\n".join(lines))
    return path
