"""Server-sent events for a streamed answer, in OpenAI's chunk shapes: text, log-probabilities
and tool calls as they are produced, the finish reason, and (`stream_options.include_usage`) a
last chunk with the usage."""

from __future__ import annotations

import json

from rayft.serving import bodies, tools
from rayft.serving.errors import serve_error
from rayft.serving.protocol import Delta, GenResult
from rayft.serving.tool_stream import ToolStream


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


async def events(st, rid: str, plan, target, pieces, first, echo: str, done_cb):
    """The chunks of one answer; `echo` is the completion's echoed prompt ('' if none) and
    `done_cb(status, completion_tokens, cached_tokens)` logs the request once the stream ends."""
    req, chat = plan.req, plan.chat
    tok = st.token_text[target.engine]
    with_usage = req.include_usage()
    status, done = 500, None
    # Tool calls are read out of the text as it streams (held back while it may be a call).
    calls = None
    if plan.tools:
        calls = ToolStream(plan.family, plan.tools, req.tool_choice, req.parallel_tool_calls)

    offset = [len(echo)]  # the next token's text_offset (completions)

    def chunk(delta: dict | None, finish: str | None = None, lps=None) -> str:
        if chat:
            logprobs = bodies.chat_logprobs(tok, lps) if lps is not None else None
            body = bodies.chat_chunk(rid, req.model, delta or {}, finish, logprobs, with_usage)
        else:
            logprobs = None
            if lps is not None:  # text_offset runs on over the whole answer, as vLLM's does
                logprobs = bodies.completion_logprobs(tok, lps, [lp.token for lp in lps], offset[0])
                if lps:
                    offset[0] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
            text = (delta or {}).get("content", "")
            body = bodies.completion_chunk(rid, req.model, text, finish, logprobs, with_usage)
        return _event(body)

    def deltas(piece: Delta) -> list[str]:
        lps = piece.logprobs if req.logprob_count() is not None else None
        if calls is None:
            return [chunk({"content": piece.text}, lps=lps)] if piece.text or lps else []
        out = [chunk({}, lps=lps)] if lps else []
        return out + [_delta(chunk, d) for d in calls.feed(piece.text)]

    try:
        if chat:
            yield chunk({"role": "assistant", "content": ""})
        elif echo:
            yield chunk({"content": echo})
        piece = first
        while piece is not None:
            if isinstance(piece, GenResult):  # the engine's closing summary
                done = piece
            else:
                for text in deltas(piece):
                    yield text
            piece = await anext(pieces, None)
        if calls is not None:
            for d in calls.close():
                yield _delta(chunk, d)
        called = calls is not None and bool(calls.calls)
        reason = done.finish_reason if done else "stop"
        choice = req.tool_choice if chat else None
        yield chunk(None, tools.finish_reason(choice, called, reason))
        if with_usage:
            completion = done.completion_tokens if done else 0
            cached = done.cached_tokens if done else None
            used = bodies.usage(len(plan.gens[0].prompt_ids), completion, cached)
            yield _event(bodies.usage_chunk(rid, req.model, used, chat))
        yield "data: [DONE]\n\n"
        status = 200
    except Exception as e:  # headers are sent already: report in-band, as OpenAI does
        err = serve_error(e)
        status = err.status if err else 500
        yield _event(
            err.body() if err else {"error": {"message": str(e)[:500], "type": "server_error"}}
        )
    finally:
        done_cb(status, done.completion_tokens if done else 0, done.cached_tokens if done else None)


def _delta(chunk, delta: dict) -> str:
    """A ToolStream delta as a chunk: {"content": text} or {"tool_calls": [...]}."""
    if "tool_calls" in delta:
        return chunk(bodies.tool_call_deltas(delta["tool_calls"]))
    return chunk({"content": delta["content"]})
