"""POST /v1/chat/completions and /v1/completions: validate, route, answer (plain or streamed),
copy to the shadow arm, log.

Order matters: everything that can refuse a request (its shape, the server's limits, the model
name, the context length) runs before any engine or shadow sees it, so a refused request is
never generated and never logged as answered on any arm.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import json
import time
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rayft.serving import openai_api as oa
from rayft.serving.errors import BadRequest, ServeError, engine_errors, serve_error
from rayft.serving.prompts import chat_prompt_ids
from rayft.serving.protocol import GenRequest, GenResult
from rayft.serving.routing import Target
from rayft.serving.state import IngressState, State

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, st: State) -> Response:
    return await complete(st, request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, st: State) -> Response:
    return await complete(st, request, chat=False)


async def complete(st: IngressState, request: Request, chat: bool) -> Response:
    st.auth(request)
    shape = oa.ChatRequest if chat else oa.CompletionRequest
    req = oa.parse(shape, await st.body(request), **st.limits)
    target, shadow = st.registry.route(req.model, req.user)
    ids = _prompt_ids(st, target.engine, req)
    gen = _gen_request(st, target, req, ids)
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    headers = {"X-Rayft-Arm": target.arm, "X-Request-Id": rid}
    if shadow is not None:  # the request is valid: the shadow arm answers it too
        st.spawn(_shadow(st, shadow, gen, rid, req))
    started = time.perf_counter()
    if req.stream:
        pieces = st.engines[target.engine].options(stream=True).stream.remote(gen)
        try:  # wait for the first piece: errors before it get a real status, not an event
            with engine_errors():
                first = await anext(pieces, None)
        except ServeError as e:
            _log(st, rid, req, target, e.status, started, len(ids), stream=True)
            raise
        except Exception as e:
            _log(st, rid, req, target, 500, started, len(ids), stream=True)
            return server_error(e)
        return StreamingResponse(
            _sse(st, rid, req, target, gen, chat, pieces, first, started),
            headers=headers,
            media_type="text/event-stream",
        )
    status, results = 500, []
    try:
        results = await _generate(st, target, gen, req.n)
        status = 200
    except ServeError as e:
        status = e.status
        raise
    except Exception as e:  # a replica died or failed: answer 500, keep serving
        return server_error(e)
    finally:
        tokens = sum(r.completion_tokens for r in results)
        _log(st, rid, req, target, status, started, len(ids), tokens)
    body = (oa.chat_body if chat else oa.completion_body)(rid, req.model, results, len(ids))
    return JSONResponse(body, headers=headers)


def server_error(e: BaseException) -> JSONResponse:
    message = f"{type(e).__name__}: {e}"[:500]
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=500)


def _prompt_ids(st: IngressState, engine: str, req) -> list[int]:
    tok = st.tokenizers[engine]
    if isinstance(req, oa.ChatRequest):
        return chat_prompt_ids(tok, [m.model_dump() for m in req.messages])
    if isinstance(req.prompt, str):
        return tok(req.prompt)["input_ids"]
    vocab = st.vocab[engine]
    bad = [t for t in req.prompt if not 0 <= t < vocab]
    if bad:
        raise BadRequest(
            f"prompt: token id {bad[0]} is outside the vocabulary [0, {vocab})",
            "prompt",
            "invalid_value",
        )
    return list(req.prompt)


def _gen_request(st: IngressState, target: Target, req, ids: list[int]) -> GenRequest:
    ctx = st.context[target.engine]
    asked = req.asked_tokens()
    default = 16 if isinstance(req, oa.CompletionRequest) else st.limits["max_tokens_limit"]
    max_tokens = asked or min(default, max(ctx - len(ids), 1))
    if len(ids) + max_tokens > ctx:
        raise BadRequest(
            f"This model's maximum context length is {ctx} tokens. However, you requested "
            f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
            "completion). Please reduce the prompt or max_tokens.",
            "messages" if isinstance(req, oa.ChatRequest) else "prompt",
            "context_length_exceeded",
        )
    return GenRequest(
        ids, max_tokens, req.temperature, req.top_p, req.stops(), target.adapter, req.seed
    )


async def _generate(st: IngressState, target: Target, gen: GenRequest, n: int) -> list:
    handle = st.engines[target.engine]
    with engine_errors():
        return list(await asyncio.gather(*[handle.generate.remote(gen) for _ in range(n)]))


async def _shadow(st: IngressState, target: Target, gen: GenRequest, rid: str, req) -> None:
    gen = replace(gen, adapter=target.adapter)
    started, status, results = time.perf_counter(), 200, []
    try:
        results = await _generate(st, target, gen, 1)
    except Exception:  # a failing shadow must never touch the answered request
        status = 500
    tokens = sum(r.completion_tokens for r in results)
    _log(
        st, f"{rid}-shadow", req, target, status, started, len(gen.prompt_ids), tokens, shadow=True
    )


def _log(
    st: IngressState,
    rid: str,
    req,
    target: Target,
    status: int,
    started: float,
    prompt: int = 0,
    completion: int = 0,
    shadow: bool = False,
    stream: bool = False,
) -> None:
    latency = time.perf_counter() - started
    record = {
        "id": rid,
        "model": req.model,
        "experiment": target.experiment,
        "arm": target.arm,
        "user": req.user,
        "status": status,
        "latency_s": round(latency, 4),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "shadow": shadow,
        "stream": stream,
    }
    st.requests.write(record)
    if not shadow:
        st.arm_of[rid] = record
        if len(st.arm_of) > 100_000:  # bounded; older ids are found in the log file
            st.arm_of.pop(next(iter(st.arm_of)))
    st.metrics.observe(target.arm, status, latency, prompt, completion, shadow)


async def _sse(st: IngressState, rid, req, target: Target, gen, chat: bool, pieces, first, started):
    status, done = 500, None

    def event(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    def chunk(text: str | None, finish: str | None) -> str:
        if chat:
            delta = {} if text is None else {"content": text}
            return event(oa.chat_chunk(rid, req.model, delta, finish))
        return event(oa.completion_chunk(rid, req.model, text or "", finish))

    try:
        if chat:
            yield event(oa.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None))
        piece = first
        while piece is not None:
            if isinstance(piece, GenResult):  # the engine's closing summary
                done = piece
            else:
                yield chunk(piece, None)
            piece = await anext(pieces, None)
        yield chunk(None, done.finish_reason if done else "stop")
        yield "data: [DONE]\n\n"
        status = 200
    except Exception as e:  # headers are sent already: report in-band, as OpenAI does
        err = serve_error(e)
        status = err.status if err else 500
        yield event(
            err.body() if err else {"error": {"message": str(e)[:500], "type": "server_error"}}
        )
    finally:
        tokens = done.completion_tokens if done else 0
        _log(st, rid, req, target, status, started, len(gen.prompt_ids), tokens, stream=True)
