"""Graders that look only at text: OpenAI's string_check and text_similarity, and rayft's own
json_keys and regex (the `eval.checks` of rayft/evaluation/checks.py, as rewards)."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

from rayft.graders import spec
from rayft.graders.similarity import METRICS, UNAVAILABLE
from rayft.graders.spec import GraderError, SampleError
from rayft.graders.templates import Template, compile_template

Batch = tuple[list[float], list[str | None]]
OUTPUT = "{{sample.output_text}}"
OPERATIONS = ("eq", "ne", "like", "ilike")


def each(one: Callable[[dict, dict], float], samples: list[dict], items: list[dict]) -> Batch:
    """Grade sample by sample; a SampleError scores that sample 0 and is its error."""
    scores: list[float] = []
    errors: list[str | None] = []
    for sample, item in zip(samples, items, strict=True):
        try:
            scores.append(float(one(sample, item)))
            errors.append(None)
        except SampleError as e:
            scores.append(0.0)
            errors.append(str(e))
    return scores, errors


@dataclass(frozen=True)
class StringCheck:
    input: Template
    reference: Template
    operation: str

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return each(self.one, samples, items)

    def one(self, sample: dict, item: dict) -> float:
        got, want = self.input.render(sample, item), self.reference.render(sample, item)
        if self.operation == "eq":
            return float(got == want)
        if self.operation == "ne":
            return float(got != want)
        if self.operation == "like":
            return float(want in got)
        return float(want.lower() in got.lower())


@dataclass(frozen=True)
class TextSimilarity:
    input: Template
    reference: Template
    metric: str

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return each(self.one, samples, items)

    def one(self, sample: dict, item: dict) -> float:
        return METRICS[self.metric](
            self.input.render(sample, item), self.reference.render(sample, item)
        )


@dataclass(frozen=True)
class JsonKeys:
    input: Template
    keys: tuple[str, ...]

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return each(self.one, samples, items)

    def one(self, sample: dict, item: dict) -> float:
        # The whole answer must be one JSON object: text around it fails, because a caller
        # parsing the reply would fail too (rayft/evaluation/checks.py).
        try:
            obj = json.loads(self.input.render(sample, item).strip())
        except ValueError:
            return 0.0
        return float(isinstance(obj, dict) and all(k in obj for k in self.keys))


@dataclass(frozen=True)
class Regex:
    input: Template
    pattern: re.Pattern

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return each(self.one, samples, items)

    def one(self, sample: dict, item: dict) -> float:
        return float(self.pattern.search(self.input.render(sample, item)) is not None)


def build_string_check(s: dict, where: str) -> StringCheck:
    return StringCheck(
        input=compile_template(spec.text(s, "input", where), f"{where}.input"),
        reference=compile_template(spec.text(s, "reference", where), f"{where}.reference"),
        operation=spec.one_of(s, "operation", where, OPERATIONS),
    )


def build_text_similarity(s: dict, where: str) -> TextSimilarity:
    metric = s.get("evaluation_metric")
    available = ", ".join(METRICS)
    if not isinstance(metric, str) or metric not in METRICS | UNAVAILABLE:
        raise GraderError(f"{where}.evaluation_metric: {metric!r} is not one of {available}")
    if metric in UNAVAILABLE:
        raise GraderError(
            f"{where}.evaluation_metric: {metric!r} {UNAVAILABLE[metric]}; available here: "
            f"{available}"
        )
    return TextSimilarity(
        input=compile_template(spec.text(s, "input", where), f"{where}.input"),
        reference=compile_template(spec.text(s, "reference", where), f"{where}.reference"),
        metric=metric,
    )


def build_json_keys(s: dict, where: str) -> JsonKeys:
    return JsonKeys(
        input=compile_template(spec.text(s, "input", where, OUTPUT), f"{where}.input"),
        keys=tuple(spec.texts(s, "keys", where)),
    )


def build_regex(s: dict, where: str) -> Regex:
    source = spec.text(s, "pattern", where)
    try:
        pattern = re.compile(source)
    except re.error as e:
        raise GraderError(f"{where}.pattern: {source!r} is not a regular expression: {e}") from None
    return Regex(
        input=compile_template(spec.text(s, "input", where, OUTPUT), f"{where}.input"),
        pattern=pattern,
    )
