"""OpenAI request shapes (validated strictly) and the one rule for parameters.

Every field of OpenAI's chat and (legacy) completions requests either works or is refused with a
400 naming it and saying why; no field is accepted and dropped. vLLM's sampling extras
(`top_k`, `min_p`, `repetition_penalty`) are honoured by both engines. A misspelt or unknown
field is refused (OpenAI's own message: "Unrecognized request argument supplied"), so a client
never believes a setting took effect when it did not.

Every rule about a request's shape lives here, as validators, so a bad request is refused before
it is routed (no arm, shadow or engine sees it). The server's own limits (`serve.max_n`,
`serve.max_tokens_limit`) come in through pydantic's validation context (see `parse`).
Integers are strict: `"max_tokens": 2.5` is a 400, not a silent 2.
"""

from __future__ import annotations

import uuid
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictInt,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from rayft.config import ExperimentConfig
from rayft.serving.errors import BadRequest
from rayft.serving.protocol import SEED_RANGE, GenRequest

M = TypeVar("M", bound=BaseModel)

# OpenAI parameters this server knows and cannot honour, with the reason a client is told.
UNSUPPORTED = {
    "audio": "this server serves text models only",
    "prediction": "predicted outputs are not supported",
    "reasoning_effort": "the served models are not reasoning models",
    "verbosity": "the served models have no verbosity setting",
    "web_search_options": "this server has no web search",
    "functions": "`functions` is deprecated: send `tools` instead",
    "function_call": "`function_call` is deprecated: send `tool_choice` instead",
    "metadata": "this server does not store completions, and metadata is kept only with `store`",
    "suffix": "insertion (a suffix after the completion) is not supported",
    "prompt_cache_key": "prompt caching is automatic here; there is no cache key to set",
    "safety_identifier": "send `user` to identify the end user",
}


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    stream: StrictBool = False  # before `n` and `stream_options`: their rules read it
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    stop: str | list[str] | None = Field(None)
    user: str | None = None
    seed: StrictInt | None = Field(None, ge=SEED_RANGE[0], le=SEED_RANGE[1])
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extras
    top_k: StrictInt = Field(0, ge=-1)  # 0 and -1: off
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0, le=2)
    # Accepted where the value asks for what this server does anyway
    store: Literal[False] | None = Field(
        None, description="Completions are never stored here: only false is accepted."
    )
    service_tier: Literal["auto", "default"] | None = None

    @model_validator(mode="before")
    @classmethod
    def _known(cls, body: Any) -> Any:
        if isinstance(body, dict):
            for name, why in UNSUPPORTED.items():
                if body.get(name) is not None:
                    raise BadRequest(f"{name}: {why}", name, "unsupported_parameter")
            # OpenAI's spec allows null for its optional fields, and SDKs send it: null is
            # the default (as vLLM takes it).
            body = {k: v for k, v in body.items() if v is not None or k not in cls.model_fields}
        return body

    @field_validator("n")
    @classmethod
    def _n(cls, n: int, info: ValidationInfo) -> int:
        if n != 1 and info.data.get("stream"):
            raise ValueError("stream=true supports n=1 only")
        return n

    @field_validator("stream_options")
    @classmethod
    def _stream_options(cls, value, info: ValidationInfo):
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return value

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop):
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        # OpenAI takes 4, vLLM any number; lm-eval's tasks send theirs plus the end token.
        if len(stops) > 32:
            raise ValueError(f"at most 32 stop sequences, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("a stop sequence cannot be empty")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, bias):
        for key, value in (bias or {}).items():
            if not key.lstrip("-").isdigit():
                raise ValueError(f"keys are token ids written as strings; got {key!r}")
            if not -100 <= value <= 100:
                raise ValueError(f"bias {value} for token {key} is outside [-100, 100]")
        return bias

    @field_validator("max_tokens")
    @classmethod
    def _max_tokens(cls, asked: int | None, info: ValidationInfo) -> int | None:
        return _within_limit(asked, info, "max_tokens")

    @model_validator(mode="after")
    def _choices(self, info: ValidationInfo):
        """serve.max_n bounds the choices of the whole request: prompts x n."""
        limit = (info.context or {}).get("max_n")
        prompts = len(self.prompts()) if isinstance(self, CompletionRequest) else 1
        if limit is not None and prompts * self.n > limit:
            asked = f"n={self.n}" if prompts == 1 else f"{prompts} prompts x n={self.n}"
            raise BadRequest(
                f"n: {asked} is above this server's limit of {limit} choices",
                "n",
                "invalid_value",
            )
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def asked_tokens(self) -> int | None:
        return self.max_tokens

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: StrictBool = False


def _within_limit(asked: int | None, info: ValidationInfo, name: str) -> int | None:
    limit = (info.context or {}).get("max_tokens_limit")
    if asked is not None and limit is not None and asked > limit:
        raise ValueError(f"{name}={asked} is above this server's limit of {limit}")
    return asked


class JsonSchema(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")
    description: str | None = None
    schema_: dict = Field(default_factory=dict, alias="schema")
    strict: StrictBool | None = None


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None

    @model_validator(mode="after")
    def _schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type json_schema needs a `json_schema` object")
        if self.type != "json_schema" and self.json_schema is not None:
            raise ValueError(f"`json_schema` goes with type json_schema, not {self.type}")
        return self

    def grammar(self) -> dict | None:
        """The engines' grammar for this format (protocol.GenRequest.grammar), or None."""
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.type == "json_schema":
            return {"type": "json_schema", "schema": self.json_schema.schema_}
        return None


class ChatRequest(_Req):
    # Messages are checked and normalised by `tools.normalize` (content parts, tool turns).
    messages: list[dict] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: StrictInt | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: StrictBool = True
    modalities: list[Literal["text"]] | None = None

    @field_validator("max_completion_tokens")
    @classmethod
    def _max_completion_tokens(cls, asked: int | None, info: ValidationInfo) -> int | None:
        return _within_limit(asked, info, "max_completion_tokens")

    @field_validator("top_logprobs")
    @classmethod
    def _top_logprobs(cls, k: int | None, info: ValidationInfo) -> int | None:
        if k is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs=true")
        return k

    def asked_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def logprob_count(self) -> int | None:
        """GenRequest.logprobs: None, or how many alternatives per token."""
        return (self.top_logprobs or 0) if self.logprobs else None


class CompletionRequest(_Req):
    # One prompt (text or token ids) or a batch of them; each gets `n` choices.
    prompt: str | list[StrictInt] | list[str] | list[list[StrictInt]] = Field(min_length=1)
    echo: StrictBool = False
    logprobs: StrictInt | None = Field(None, ge=0, le=5)
    best_of: StrictInt | None = Field(None, ge=1)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, best_of: int | None, info: ValidationInfo) -> int | None:
        if best_of is not None and best_of != info.data.get("n", 1):
            raise ValueError(
                "best_of other than n is not supported: ask for n choices and rank them "
                "with logprobs"
            )
        return best_of

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        if any(len(x) == 0 for x in p):
            raise BadRequest("prompt: a prompt in the batch is empty", "prompt", "invalid_value")
        return list(p)

    def logprob_count(self) -> int | None:
        return self.logprobs


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


_MEMBER_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "constrained-int"}


def _union_member(part: Any) -> bool:
    return isinstance(part, str) and ("[" in part or part in _MEMBER_TAGS)


def parse(cls: type[M], body: Any, **limits: int) -> M:
    """Validate a JSON body against the server's `limits`; the first problem becomes an
    OpenAI-style 400 naming the field."""
    try:
        return cls.model_validate(body, context=limits)
    except ValidationError as e:
        errors = e.errors()
        # An unknown field first: a misspelt name also explains the field said to be missing.
        err = next((x for x in errors if x["type"] == "extra_forbidden"), errors[0])
        # pydantic names the union member it tried (`stop.str`, `n_epochs.literal['auto']`):
        # the field is the request's part of the location
        where = [str(p) for p in err["loc"] if not _union_member(p)]
        param = ".".join(where) or None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            raise BadRequest(
                f"Unrecognized request argument supplied: {param}", param, "unknown_parameter"
            ) from None
        raise BadRequest(f"{param or 'body'}: {msg}", param, "invalid_value") from None


def gen_request(
    req: ChatRequest | CompletionRequest,
    ids: list[int],
    max_tokens: int,
    adapter=None,
    grammar: dict | None = None,
    bias: dict[int, float] | None = None,
) -> GenRequest:
    """The engines' request for one prompt of `req`: every sampling field of the API mapped
    (the one mapping; tests/test_vllm_contract.py binds it to vLLM's SamplingParams)."""
    echo_lps = isinstance(req, CompletionRequest) and req.echo and req.logprobs is not None
    # Offered tools: a family's call markers may be special tokens, and the parser must see them.
    tooled = isinstance(req, ChatRequest) and bool(req.tools) and req.tool_choice != "none"
    return GenRequest(
        ids,
        max_tokens,
        req.temperature,
        req.top_p,
        req.stops(),
        adapter,
        req.seed,
        top_k=max(req.top_k, 0),
        min_p=req.min_p,
        presence_penalty=req.presence_penalty,
        frequency_penalty=req.frequency_penalty,
        repetition_penalty=req.repetition_penalty,
        logit_bias=bias or {},
        logprobs=req.logprob_count(),
        prompt_logprobs=req.logprobs if echo_lps else None,
        grammar=grammar,
        skip_special_tokens=not tooled,
    )


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"
