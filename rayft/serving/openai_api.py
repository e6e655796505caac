"""OpenAI request shapes (validated strictly) and response bodies.

Integers are strict: `"max_tokens": 2.5` is a 400, not a silent 2. Unknown fields are ignored,
as OpenAI does, so newer clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError

from rayft.serving.errors import BadRequest

M = TypeVar("M", bound=BaseModel)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: StrictInt = Field(1, ge=1)
    stream: bool = False
    stop: str | list[str] | None = None
    user: str | None = None
    seed: StrictInt | None = None

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)


class CompletionRequest(_Req):
    prompt: str | list[StrictInt] = Field(min_length=1)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    response_id: str = Field(description="`id` of the response being rated.")
    rating: float | None = Field(None, description="A score, e.g. 1-5 or 0/1 (thumbs).")
    preferred_over: str | None = Field(
        None, description="`id` of another response this one was preferred to (pairwise)."
    )
    comment: str | None = None


class AdapterLoad(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    path: str


class ExperimentSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    arms: dict[str, float]
    shadow: str | None = None


def parse(cls: type[M], body: Any) -> M:
    """Validate a JSON body; the first problem becomes an OpenAI-style 400 naming the field."""
    try:
        return cls.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        raise BadRequest(f"{param or 'body'}: {err['msg']}", param, "invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt: int, completion: int) -> dict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def chat_body(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    return {
        "id": rid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": r.text},
                "finish_reason": r.finish_reason,
                "logprobs": None,
            }
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


def completion_body(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {"index": i, "text": r.text, "finish_reason": r.finish_reason, "logprobs": None}
            for i, r in enumerate(results)
        ],
        "usage": usage(prompt_tokens, sum(r.completion_tokens for r in results)),
    }


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
    }
