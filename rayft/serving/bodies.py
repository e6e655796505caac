"""OpenAI response bodies: answers, streamed chunks, log-probabilities, tool calls, usage.

Built from the `openai` package's own response models: a field or a value OpenAI's clients
would not accept (a finish_reason outside theirs, a missing field) fails here, in rayft, not in
a user's client. Token strings are each token decoded alone, as vLLM reports them; `bytes` are
their UTF-8 bytes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from openai.types import Completion, CompletionChoice, CompletionUsage, chat
from openai.types.chat import chat_completion_chunk as chunk_types
from openai.types.chat import chat_completion_token_logprob as lp_types
from openai.types.completion_usage import PromptTokensDetails
from pydantic import BaseModel

from rayft.serving.protocol import TokenLogprob


@dataclass
class Choice:
    """One answer as the route assembled it."""

    text: str | None
    finish_reason: str
    logprobs: dict | None = None  # built by chat_logprobs / completion_logprobs
    tool_calls: list[dict] = field(default_factory=list)


def usage(prompt_tokens: int, completion_tokens: int, cached: int | None = None) -> CompletionUsage:
    """OpenAI's usage; `cached` (prompt tokens from a prefix cache) only where the engine
    knows it (vLLM), as `prompt_tokens_details.cached_tokens`."""
    used = CompletionUsage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )
    if cached is not None:
        used.prompt_tokens_details = PromptTokensDetails(cached_tokens=cached)
    return used


def _json(obj: BaseModel) -> dict:
    return obj.model_dump(mode="json", exclude_unset=True)


class Tokens:
    """Token id -> its text, for one tokenizer (cached: the same ids come back all the time)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._text: dict[int, str] = {}

    def __call__(self, token: int) -> str:
        text = self._text.get(token)
        if text is None:
            text = self.tokenizer.decode([token])
            if len(self._text) < 200_000:
                self._text[token] = text
        return text


def chat_logprobs(tokens: Tokens, lps: list[TokenLogprob]) -> dict:
    def entry(token: int, logprob: float, cls, **more):
        text = tokens(token)
        return cls(token=text, bytes=list(text.encode()), logprob=logprob, **more)

    content = [
        entry(
            lp.token,
            lp.logprob,
            lp_types.ChatCompletionTokenLogprob,
            top_logprobs=[entry(t, v, lp_types.TopLogprob) for t, v in lp.top],
        )
        for lp in lps
    ]
    return _json(chat.chat_completion.ChoiceLogprobs(content=content, refusal=None))


def completion_logprobs(
    tokens: Tokens, lps: list[TokenLogprob | None], ids: list[int], offset: int = 0
) -> dict:
    """The legacy shape: parallel lists over `ids` (the echoed prompt's, then the answer's);
    an entry of `lps` is None where there is no log-probability (the prompt's first token)."""
    texts, offsets = [], []
    for token in ids:
        texts.append(tokens(token))
        offsets.append(offset)
        offset += len(texts[-1])
    # Written out: the package's Logprobs model refuses the null that OpenAI itself sends for
    # the first token of an echoed prompt (lm-eval reads exactly these lists).
    return {
        "tokens": texts,
        "token_logprobs": [None if lp is None else lp.logprob for lp in lps],
        "top_logprobs": [None if lp is None else {tokens(t): v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _tool_call(call: dict):
    fn = call["function"]
    return chat.ChatCompletionMessageFunctionToolCall(
        id=call["id"],
        type="function",
        function={"name": fn["name"], "arguments": fn["arguments"]},
    )


def chat_body(rid: str, model: str, choices: list[Choice], used: CompletionUsage) -> dict:
    out = []
    for i, c in enumerate(choices):
        message = chat.ChatCompletionMessage(role="assistant", content=c.text)
        if c.tool_calls:
            message.tool_calls = [_tool_call(t) for t in c.tool_calls]
        out.append(
            chat.chat_completion.Choice(
                index=i, message=message, finish_reason=c.finish_reason, logprobs=c.logprobs
            )
        )
    body = chat.ChatCompletion(
        id=rid,
        object="chat.completion",
        created=int(time.time()),
        model=model,
        choices=out,
        usage=used,
    )
    return _json(body)


def completion_body(rid: str, model: str, choices: list[Choice], used: CompletionUsage) -> dict:
    out = [
        CompletionChoice(index=i, text=c.text or "", finish_reason=c.finish_reason, logprobs=None)
        for i, c in enumerate(choices)
    ]
    body = Completion(
        id=rid,
        object="text_completion",
        created=int(time.time()),
        model=model,
        choices=out,
        usage=used,
    )
    out = _json(body)
    for c, o in zip(choices, out["choices"], strict=True):
        o["logprobs"] = c.logprobs  # see completion_logprobs
    return out


def chat_chunk(
    rid: str,
    model: str,
    delta: dict,
    finish: str | None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict:
    choice = chunk_types.Choice(
        index=0, delta=chunk_types.ChoiceDelta(**delta), finish_reason=finish
    )
    # null when not asked, as OpenAI sends it
    choice.logprobs = None if logprobs is None else chunk_types.ChoiceLogprobs(**logprobs)
    body = chat.ChatCompletionChunk(
        id=rid,
        object="chat.completion.chunk",
        created=int(time.time()),
        model=model,
        choices=[choice],
    )
    if with_usage:
        body.usage = None  # every chunk but the last says usage: null (include_usage)
    return _json(body)


def completion_chunk(
    rid: str,
    model: str,
    text: str,
    finish: str | None,
    logprobs: dict | None = None,
    with_usage: bool = False,
) -> dict:
    # Written out: the package has no model of a streamed legacy completion (its Completion
    # refuses the null finish_reason that every chunk but the last carries).
    choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": logprobs}
    body = {
        "id": rid,
        "object": "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
    }
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(rid: str, model: str, used: CompletionUsage, chat_api: bool) -> dict:
    """The last chunk of a stream with `stream_options.include_usage`: no choices, the usage."""
    return {
        "id": rid,
        "object": "chat.completion.chunk" if chat_api else "text_completion",
        "created": int(time.time()),
        "model": model,
        "choices": [],
        "usage": used.model_dump(mode="json", exclude_none=True),
    }


def tool_call_deltas(events: list[dict]) -> dict:
    """A delta carrying streamed tool-call pieces (OpenAI's shape: index, then id, type and
    name once, then argument pieces)."""
    return {"tool_calls": [chunk_types.ChoiceDeltaToolCall(**e) for e in events]}
