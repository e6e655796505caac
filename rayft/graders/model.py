"""score_model and label_model: a model behind an OpenAI-compatible endpoint (a `rayft serve`
URL, or OpenAI itself) reads each answer and replies with a score or a label.

OpenAI asks its grader models for structured output; here the reply is read as text (the first
number, or the first line as a label), so any chat model that follows the prompt can grade.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from rayft.graders import spec
from rayft.graders.spec import GraderError, SampleError
from rayft.graders.templates import Template, compile_template

Batch = tuple[list[float], list[str | None]]
ROLES = ("system", "developer", "user", "assistant")
# Enough calls in flight for a serving engine to batch them, few enough not to swamp it.
WORKERS = 8
_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
# OpenAI's name for each sampling parameter -> the chat completions field it becomes.
_SAMPLING = {
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "max_completions_tokens": "max_completion_tokens",
    "reasoning_effort": "reasoning_effort",
}


@dataclass(frozen=True)
class Endpoint:
    base_url: str
    api_key: str = field(repr=False)
    timeout_s: float


@dataclass(frozen=True)
class Chat:
    """One request per sample: the grader's messages with the sample rendered in."""

    kind: str
    model: str
    messages: tuple[tuple[str, Template], ...]
    params: tuple[tuple[str, object], ...]
    endpoint: Endpoint

    def ask_all(self, samples: list[dict], items: list[dict], read) -> Batch:
        from openai import OpenAI

        e = self.endpoint
        with (
            OpenAI(
                base_url=e.base_url, api_key=e.api_key, timeout=e.timeout_s, max_retries=1
            ) as client,
            ThreadPoolExecutor(max_workers=WORKERS) as pool,
        ):
            results = list(pool.map(lambda s, i: self._one(client, s, i, read), samples, items))
        return [r[0] for r in results], [r[1] for r in results]

    def _one(self, client, sample: dict, item: dict, read) -> tuple[float, str | None]:
        from openai import OpenAIError

        try:
            messages = [{"role": r, "content": t.render(sample, item)} for r, t in self.messages]
            try:
                reply = client.chat.completions.create(
                    model=self.model, messages=messages, **dict(self.params)
                )
            except OpenAIError as e:
                raise SampleError(
                    f"{self.kind}: the request to {self.endpoint.base_url} (model {self.model}) "
                    f"failed: {type(e).__name__}: {str(e)[:300]}"
                ) from None
            return read((reply.choices[0].message.content or "") if reply.choices else ""), None
        except SampleError as e:
            return 0.0, str(e)


@dataclass(frozen=True)
class ScoreModel:
    chat: Chat
    low: float
    high: float

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return self.chat.ask_all(samples, items, self.read)

    def read(self, reply: str) -> float:
        """The reply's number (a JSON {"result": x} reply's x, else its first number), clamped
        to the range and normalised to [0, 1]."""
        value = _json_result(reply)
        if value is None:
            m = _NUMBER.search(reply)
            if m is None:
                raise SampleError(f"score_model: no number in reply {reply!r:.100}")
            value = float(m.group())
        value = min(max(value, self.low), self.high)
        return (value - self.low) / (self.high - self.low)


def _json_result(reply: str) -> float | None:
    try:
        obj = json.loads(reply.strip())
    except ValueError:
        return None
    result = obj.get("result") if isinstance(obj, dict) else None
    return (
        float(result) if isinstance(result, int | float) and not isinstance(result, bool) else None
    )


@dataclass(frozen=True)
class LabelModel:
    chat: Chat
    labels: tuple[str, ...]
    passing: tuple[str, ...]

    def batch(self, samples: list[dict], items: list[dict]) -> Batch:
        return self.chat.ask_all(samples, items, self.read)

    def read(self, reply: str) -> float:
        """1 if the reply's first line is a passing label (any case; markdown emphasis, quotes
        and a final period around it ignored), 0 if another label; anything else an error."""
        lines = reply.strip().splitlines()
        said = lines[0].strip().strip("*_`\"'.").strip().lower() if lines else ""
        for label in self.labels:
            if label.lower() == said:
                return float(label in self.passing)
        raise SampleError(
            f"label_model: reply {reply!r:.100} is none of the labels {', '.join(self.labels)}"
        )


def build_score_model(s: dict, where: str, base_url: str | None, api_key: str | None) -> ScoreModel:
    bounds = s.get("range", [0, 1])
    if (
        not isinstance(bounds, list)
        or len(bounds) != 2
        or not all(isinstance(b, int | float) and not isinstance(b, bool) for b in bounds)
        or not bounds[0] < bounds[1]
    ):
        raise GraderError(f"{where}.range: must be [min, max] with min < max, got {bounds!r}")
    chat = _chat(s, where, base_url, api_key)
    return ScoreModel(chat, float(bounds[0]), float(bounds[1]))


def build_label_model(s: dict, where: str, base_url: str | None, api_key: str | None) -> LabelModel:
    labels = spec.texts(s, "labels", where)
    passing = spec.texts(s, "passing_labels", where)
    if len({label.lower() for label in labels}) < len(labels):
        raise GraderError(f"{where}.labels: {labels!r} repeats a label (labels match in any case)")
    strays = [p for p in passing if p not in labels]
    if strays:
        raise GraderError(f"{where}.passing_labels: {strays[0]!r} is not one of labels {labels!r}")
    return LabelModel(_chat(s, where, base_url, api_key), tuple(labels), tuple(passing))


def _chat(s: dict, where: str, base_url: str | None, api_key: str | None) -> Chat:
    kind = s["type"]
    model = spec.text(s, "model", where)
    raw = s.get("input")
    if not isinstance(raw, list) or not raw:
        raise GraderError(f"{where}.input: must be a non-empty list of messages, got {raw!r:.200}")
    messages = tuple(_message(m, f"{where}.input[{i}]") for i, m in enumerate(raw))
    return Chat(kind, model, messages, _sampling(s, where), _endpoint(s, where, base_url, api_key))


def _message(m: object, where: str) -> tuple[str, Template]:
    if not isinstance(m, dict) or m.keys() - {"role", "content", "type"}:
        raise GraderError(f'{where}: a message is {{"role": ..., "content": ...}}, got {m!r:.200}')
    if m.get("type", "message") != "message":
        raise GraderError(f"{where}.type: must be 'message', got {m.get('type')!r}")
    role = spec.one_of(m, "role", where, ROLES)
    content = m.get("content")
    parts = content if isinstance(content, list) else [content]
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, dict) and part.get("type") in ("input_text", "output_text", "text"):
            texts.append(spec.text(part, "text", f"{where}.content"))
        else:
            raise GraderError(
                f"{where}.content: {part!r:.100} is not text; model graders here take text "
                "(a string, or input_text parts); images and audio are not supported"
            )
    # Parts are joined with a newline, as rayft serve and vLLM join text parts.
    return role, compile_template("\n".join(texts), f"{where}.content")


def _sampling(s: dict, where: str) -> tuple[tuple[str, object], ...]:
    raw = s.get("sampling_params") or {}
    here = f"{where}.sampling_params"
    if not isinstance(raw, dict):
        raise GraderError(f"{here}: must be an object, got {raw!r}")
    params = []
    for key, value in raw.items():
        if key not in _SAMPLING:
            raise GraderError(f"{here}.{key}: not a sampling parameter ({', '.join(_SAMPLING)})")
        if value is None:
            continue
        if key in ("seed", "max_completions_tokens"):
            if isinstance(value, bool) or not isinstance(value, int):
                raise GraderError(f"{here}.{key}: must be an integer, got {value!r}")
        elif key == "reasoning_effort":
            value = spec.text(raw, key, here)
        else:
            value = spec.number(raw, key, here)
        params.append((_SAMPLING[key], value))
    return tuple(params)


def _endpoint(s: dict, where: str, base_url: str | None, api_key: str | None) -> Endpoint:
    url = s.get("base_url", base_url)
    if not isinstance(url, str) or not url:
        raise GraderError(
            f"{where}: a {s['type']} grader needs an OpenAI-compatible endpoint (e.g. a `rayft "
            'serve` URL ending in /v1): give it a "base_url" field, or set the job\'s grpo.base_url'
        )
    if "api_key_env" in s:
        name = spec.text(s, "api_key_env", where)
        api_key = os.environ.get(name)
        if not api_key:
            raise GraderError(
                f"{where}.api_key_env: ${name} is not set; export the endpoint's API key in it "
                "(or remove api_key_env for an endpoint without a key)"
            )
    # The openai client refuses an empty key; a `rayft serve` without auth ignores it.
    return Endpoint(url, api_key or "none", spec.positive(s, "timeout_s", where, 60.0))
