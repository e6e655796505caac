"""OpenAI's grader templates: `{{ sample.output_text }}`, `{{ item.answer }}`, `{{ item.a.b }}`.

A reference to a field a sample lacks is that sample's error, never an empty string: a grader
comparing against "" would score every answer wrong (or right) and nobody would notice.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from rayft.graders.spec import GraderError, SampleError

_BRACES = re.compile(r"\{\{(.*?)\}\}", re.S)
# A root, then .key or [index] steps; keys are anything but dots, brackets, braces and spaces.
_PATH = re.compile(r"(sample|item)((?:\.[^.\[\]{}\s]+|\[\d+\])+)")
_STEP = re.compile(r"\.([^.\[\]{}\s]+)|\[(\d+)\]")

Path = tuple[str | int, ...]


@dataclass(frozen=True)
class Template:
    """Literal strings alternating with field paths, checked once when the grader is built."""

    source: str
    pieces: tuple[str | Path, ...]

    def render(self, sample: dict, item: dict) -> str:
        return "".join(p if isinstance(p, str) else _value(p, sample, item) for p in self.pieces)


def compile_template(source: str, where: str) -> Template:
    if not isinstance(source, str):
        raise GraderError(f"{where}: a template is a string, got {type(source).__name__}")
    pieces: list[str | Path] = []
    at = 0
    for m in _BRACES.finditer(source):
        pieces.append(source[at : m.start()])
        inner = m.group(1).strip()
        path = _PATH.fullmatch(inner)
        if path is None:
            raise GraderError(
                f"{where}: '{{{{{m.group(1)}}}}}' is not a template variable; write "
                "{{ sample.output_text }}, {{ sample.output_json.<key> }} or {{ item.<field> }}"
            )
        steps = [k if k else int(i) for k, i in _STEP.findall(path.group(2))]
        pieces.append((path.group(1), *steps))
        at = m.end()
    pieces.append(source[at:])
    for piece in pieces:
        if isinstance(piece, str) and "{{" in piece:
            raise GraderError(f"{where}: '{{{{' is never closed by '}}}}' in {source!r}")
    return Template(source, tuple(p for p in pieces if p != ""))


def _value(path: Path, sample: dict, item: dict) -> str:
    root, *steps = path
    value = sample if root == "sample" else item
    for depth, step in enumerate(steps, start=1):
        if isinstance(value, dict) and str(step) in value:
            value = value[str(step)]
        elif isinstance(value, list) and str(step).isdigit() and int(step) < len(value):
            value = value[int(step)]
        elif root == "sample" and steps[0] == "output_json" and depth == 1:
            raise SampleError(f"{_dotted(path)}: the answer is not a JSON object")
        else:
            raise SampleError(f"{_dotted(path[: depth + 1])}: missing field")
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        raise SampleError(f"{_dotted(path)}: a {type(value).__name__} is not JSON") from None


def _dotted(path: Path) -> str:
    return path[0] + "".join(f"[{s}]" if isinstance(s, int) else f".{s}" for s in path[1:])


def sample_context(sample: dict) -> dict:
    """The `sample` namespace: the caller's keys, plus `output_json` when the whole stripped
    answer is one JSON object (as OpenAI fills it; absent otherwise)."""
    if not isinstance(sample, dict) or not isinstance(sample.get("output_text"), str):
        raise TypeError(f"a sample is a dict with a str 'output_text', got {sample!r:.200}")
    context = dict(sample)
    if "output_json" not in context:
        try:
            parsed = json.loads(sample["output_text"].strip())
        except ValueError:
            parsed = None
        if isinstance(parsed, dict):
            context["output_json"] = parsed
    return context
