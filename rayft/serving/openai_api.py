"""OpenAI request shapes (validated strictly) and response bodies.

Every rule about a request's shape lives here, as validators, so a bad request is refused before
it is routed (no arm, shadow or engine sees it). The server's own limits (`serve.max_n`,
`serve.max_tokens_limit`) come in through pydantic's validation context (see `parse`).
Integers are strict: `"max_tokens": 2.5` is a 400, not a silent 2. Unknown fields are ignored,
as OpenAI does, so newer clients keep working.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, TypeVar

from openai.types import Completion, CompletionChoice, CompletionUsage, chat
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from rayft.config import ExperimentConfig
from rayft.serving.errors import BadRequest
from rayft.serving.protocol import SEED_RANGE

M = TypeVar("M", bound=BaseModel)


class _Req(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: bool = False  # before `n`: n's rule reads it
    n: StrictInt = Field(1, ge=1)
    stop: str | list[str] | None = None
    user: str | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])

    @field_validator("n")
    @classmethod
    def _n(cls, n: int, info: ValidationInfo) -> int:
        limit = (info.context or {}).get("max_n")
        if limit is not None and n > limit:
            raise ValueError(f"n={n} is above this server's limit of {limit}")
        if n != 1 and info.data.get("stream"):
            raise ValueError("stream=true supports n=1 only")
        return n

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, asked: int | None, info: ValidationInfo) -> int | None:
        return _within_limit(asked, info, "max_tokens")

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def asked_tokens(self) -> int | None:
        return self.max_tokens


def _within_limit(asked: int | None, info: ValidationInfo, name: str) -> int | None:
    limit = (info.context or {}).get("max_tokens_limit")
    if asked is not None and limit is not None and asked > limit:
        raise ValueError(f"{name}={asked} is above this server's limit of {limit}")
    return asked


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str


class ChatRequest(_Req):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, asked: int | None, info: ValidationInfo) -> int | None:
        return _within_limit(asked, info, "max_completion_tokens")

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


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


class ExperimentSpec(ExperimentConfig):
    """An experiment created through the admin API: the job file's rules, and a name."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse(cls: type[M], body: Any, **limits: int) -> M:
    """Validate a JSON body against the server's `limits`; the first problem becomes an
    OpenAI-style 400 naming the field."""
    try:
        return cls.model_validate(body, context=limits)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(p) for p in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise BadRequest(f"{param or 'body'}: {msg}", param, "invalid_value") from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


# Response bodies are built from the `openai` package's own response models: a field or a value
# OpenAI's clients would not accept (a finish_reason outside theirs, a missing field) fails here,
# in rayft, not in a user's client.


def _usage(results: list, prompt_tokens: int) -> CompletionUsage:
    completion = sum(r.completion_tokens for r in results)
    return CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion,
        total_tokens=prompt_tokens + completion,
    )


def _json(obj: BaseModel) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


def _answer(cls, kind: str, rid: str, model: str, choices, results, prompt_tokens: int) -> dict:
    usage = _usage(results, prompt_tokens)
    body = cls(
        id=rid, object=kind, created=int(time.time()), model=model, choices=choices, usage=usage
    )
    return _json(body)


def chat_body(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    choices = [
        chat.chat_completion.Choice(
            index=i,
            message=chat.ChatCompletionMessage(role="assistant", content=r.text),
            finish_reason=r.finish_reason,
            logprobs=None,
        )
        for i, r in enumerate(results)
    ]
    return _answer(
        chat.ChatCompletion, "chat.completion", rid, model, choices, results, prompt_tokens
    )


def completion_body(rid: str, model: str, results: list, prompt_tokens: int) -> dict:
    choices = [
        CompletionChoice(index=i, text=r.text, finish_reason=r.finish_reason, logprobs=None)
        for i, r in enumerate(results)
    ]
    return _answer(Completion, "text_completion", rid, model, choices, results, prompt_tokens)


def chat_chunk(rid: str, model: str, delta: dict, finish: str | None) -> dict:
    choice = chat.chat_completion_chunk.Choice(
        index=0, delta=chat.chat_completion_chunk.ChoiceDelta(**delta), finish_reason=finish
    )
    choice.logprobs = None  # sent as null, as OpenAI does
    return _json(
        chat.ChatCompletionChunk(
            id=rid,
            object="chat.completion.chunk",
            created=int(time.time()),
            model=model,
            choices=[choice],
        )
    )


def completion_chunk(rid: str, model: str, text: str, finish: str | None) -> dict:
    # Written out: the package has no model of a streamed legacy completion (its Completion
    # refuses the null finish_reason that every chunk but the last carries).
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
    return {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
