"""The merged model's README.md: where the weights came from, readable by a person."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def _find(tree: Any, key: str) -> Any:
    """First value under `key` anywhere in a nested manifest (stages record it where they like)."""
    if isinstance(tree, dict):
        if key in tree:
            return tree[key]
        for value in tree.values():
            if (found := _find(value, key)) is not None:
                return found
    return None


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
    name: str,
    base: str,
    revision: str | None,
    method: str,
    adapter: Path,
    adapter_hash: str,
    training: dict,
    manifest: dict,
    verification: dict,
    eval_report: Path,
) -> Path:
    train_stage = manifest.get("stages", {}).get("train", {})
    train_info = {k: v for k, v in train_stage.items() if k not in ("packages",)}
    front = {
        "base_model": base,
        "library_name": "transformers",
        "tags": ["rayft", method, "merged"],
    }
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
        f"| adapter | `{adapter}` (content hash `{adapter_hash}`) |",
        f"| method | {method} |",
        f"| data hash | `{_find(manifest, 'data_hash') or 'not recorded'}` |",
        f"| training config hash | `{train_stage.get('config_hash', 'not recorded')}` |",
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
