"""What eval scores: the held-out test split of a run, and the shipped general-text set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import pyarrow.dataset as pads

from rayft.errors import RayftError


class EvalError(RayftError):
    """Evaluation cannot run; the message says which input is missing or wrong."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[dict[str, str]]  # the messages the arms answer
    reference: str | None  # chat rows: the last assistant turn's content; prompt rows: none
    item: dict[str, Any]  # what a grader reads as `item`: prompt rows' item, else {"reference"}


def split_messages(messages: list[dict[str, str]], where: str) -> tuple[list[dict], str]:
    """Prompt = messages before the last assistant turn; reference = that turn's content."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise EvalError(f"{where}: field 'messages' has no assistant turn after a prompt")
    return messages[:last], messages[last]["content"]


def _json(text: str | None, field: str, where: str) -> Any:
    try:
        return json.loads(text or "")
    except ValueError as e:
        raise EvalError(f"{where}: field '{field}' is not valid JSON: {e}") from None


def _chat(row: dict[str, Any], i: int, where: str) -> Example | None:
    if not row["messages"]:
        return None  # plain-text rows have no prompt/answer pair to score
    prompt, reference = split_messages(_json(row["messages"], "messages", where), where)
    return Example(str(row.get("id") or i), prompt, reference, {"reference": reference})


def _prompt(row: dict[str, Any], i: int, where: str) -> Example:
    """A prompt row (grpo data): the messages to answer and the grader's item; no reference."""
    prompt = _json(row["prompt"], "prompt", where)
    item = _json(row["item"], "item", where) if row.get("item") else {}
    if not isinstance(prompt, list) or not prompt or not isinstance(item, dict):
        raise EvalError(
            f"{where}: 'prompt' must be a non-empty list of messages and 'item' a JSON object; "
            "run `rayft prepare` again to rewrite the split"
        )
    return Example(str(row.get("id") or i), prompt, None, item)


def load_test_split(run_dir: Path, max_examples: int | None = None) -> list[Example]:
    """Read `<run_dir>/data/test.parquet/` (chat rows, or prompt rows of grpo data) in a stable
    order (by id)."""
    path = run_dir / "data" / "test.parquet"
    if not path.exists():
        raise EvalError(f"{path}: no test split; run `rayft prepare` on this config first")
    table = pads.dataset(str(path), format="parquet").to_table()
    names = set(table.column_names)
    if "messages" in names:
        read, columns = _chat, ("id", "source", "messages")
    elif {"prompt", "item"} <= names:
        read, columns = _prompt, ("id", "source", "prompt", "item")
    else:
        raise EvalError(
            f"{path}: neither a 'messages' column nor 'prompt' and 'item' columns (columns: "
            f"{sorted(names)}); eval scores chat rows and grpo prompt rows, not preference, "
            "unpaired or plain-text data"
        )
    rows = table.select([c for c in columns if c in names]).to_pylist()
    examples = []
    for i, row in enumerate(rows):
        example = read(row, i, f"{path} ({row.get('source') or f'row {i}'})")
        if example is not None:
            examples.append(example)
    if not examples:
        raise EvalError(f"{path}: no examples to evaluate")
    # Ray Data writes files in no fixed order: sort so max_examples picks the same rows each time.
    examples.sort(key=lambda e: e.id)
    return examples[:max_examples] if max_examples else examples


def load_general_text() -> list[str]:
    """Paragraphs of the general-text set used by the forgetting check."""
    text = resources.files("rayft.assets").joinpath("general_text.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]
