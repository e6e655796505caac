"""What eval scores: the held-out test split of a run, and the shipped general-text set."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import pyarrow.dataset as pads

from rayft.errors import RayftError


class EvalError(RayftError):
    """Evaluation cannot run; the message says which input is missing or wrong."""


@dataclass(frozen=True)
class Example:
    id: str
    prompt: list[dict[str, str]]  # the messages before the last assistant turn
    reference: str  # the last assistant turn's content


def split_messages(messages: list[dict[str, str]], where: str) -> tuple[list[dict], str]:
    """Prompt = messages before the last assistant turn; reference = that turn's content."""
    last = max((i for i, m in enumerate(messages) if m.get("role") == "assistant"), default=None)
    if last is None or last == 0:
        raise EvalError(f"{where}: field 'messages' has no assistant turn after a prompt")
    return messages[:last], messages[last]["content"]


def load_test_split(run_dir: Path, max_examples: int | None = None) -> list[Example]:
    """Read `<run_dir>/data/test.parquet/` (SFT rows), in a stable order (by id)."""
    path = run_dir / "data" / "test.parquet"
    if not path.exists():
        raise EvalError(f"{path}: no test split; run `rayft prepare` on this config first")
    table = pads.dataset(str(path), format="parquet").to_table()
    names = set(table.column_names)
    if "messages" not in names:
        raise EvalError(
            f"{path}: no 'messages' column (columns: {sorted(names)}); eval scores SFT chat "
            "rows, not preference or plain-text data"
        )
    rows = table.select([c for c in ("id", "source", "messages") if c in names]).to_pylist()
    examples = []
    for i, row in enumerate(rows):
        where = f"{path} ({row.get('source') or f'row {i}'})"
        if not row["messages"]:
            continue  # plain-text rows have no prompt/answer pair to score
        try:
            messages = json.loads(row["messages"])
        except ValueError as e:
            raise EvalError(f"{where}: field 'messages' is not valid JSON: {e}") from None
        prompt, reference = split_messages(messages, where)
        examples.append(Example(str(row.get("id") or i), prompt, reference))
    if not examples:
        raise EvalError(f"{path}: no chat examples to evaluate")
    # Ray Data writes files in no fixed order: sort so max_examples picks the same rows each time.
    examples.sort(key=lambda e: e.id)
    return examples[:max_examples] if max_examples else examples


def load_general_text() -> list[str]:
    """Paragraphs of the general-text set used by the forgetting check."""
    text = resources.files("rayft.assets").joinpath("general_text.txt").read_text()
    return [p.strip() for p in text.split("\n\n") if p.strip()]
