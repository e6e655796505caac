"""POST /v1/chat/completions and /v1/completions: validate, route, answer (plain or streamed),
copy to the shadow arm, log (and, with serve.log_content, keep what a chat asked and was told).

Order matters: everything that can refuse a request (its shape, the server's limits, the model
name, the context length, a schema the grammar cannot compile) runs before any engine or shadow
sees it, so a refused request is never generated and never logged as answered on any arm.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import functools
import time
from dataclasses import dataclass, replace
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from rayft.serving import bodies, tools
from rayft.serving import openai_api as oa
from rayft.serving.ab import JsonlLog
from rayft.serving.errors import BadRequest, ServeError, engine_errors
from rayft.serving.grammar import GrammarError, check
from rayft.serving.prompts import chat_prompt, normalize
from rayft.serving.protocol import SEED_RANGE, Delta, GenRequest, GenResult
from rayft.serving.routes import stream as sse
from rayft.serving.routing import Target
from rayft.serving.state import IngressState, State

router = APIRouter()


@router.post("/v1/chat/completions")
async def chat_completions(request: Request, st: State) -> Response:
    return await complete(st, request, chat=True)


@router.post("/v1/completions")
async def completions(request: Request, st: State) -> Response:
    return await complete(st, request, chat=False)


@dataclass
class Plan:
    """What a valid request asks of the engines, and how their answers become choices."""

    req: oa.ChatRequest | oa.CompletionRequest
    chat: bool
    gens: list[GenRequest]  # one per prompt (chat: one); each is asked `n` times
    tools: list[dict] | None = None  # offered and callable (tool_choice is not "none")
    forced: bool = False  # tool_choice "required" or named: the answer is the calls' JSON
    family: str = "hermes"  # how the model writes tool calls (`tools.KNOWN_FAMILIES`)
    tenant: str | None = None
    prompt_texts: list[str | None] | None = None  # completions: the prompts as sent (echo)


async def complete(st: IngressState, request: Request, chat: bool) -> Response:
    tenant = st.auth(request)
    shape = oa.ChatRequest if chat else oa.CompletionRequest
    req = oa.parse(shape, await st.body(request), **st.limits)
    target, shadow = st.registry.route(req.model, req.user, tenant)
    plan = _plan(st, target, req, chat)
    plan.tenant = tenant
    rid = oa.new_id("chatcmpl" if chat else "cmpl")
    headers = {"X-Rayft-Arm": target.arm, "X-Request-Id": rid}
    if shadow is not None:  # the request is valid: the shadow arm answers it too
        st.spawn(_shadow(st, shadow, plan, rid))
    started = time.perf_counter()
    prompt_tokens = sum(len(g.prompt_ids) for g in plan.gens)  # once per prompt, as OpenAI counts
    keeping = chat and st.s.job.serve.log_content
    if req.stream:
        pieces = st.engines[target.engine].options(stream=True).stream.remote(plan.gens[0])
        try:  # wait for the first piece: errors before it get a real status, not an event
            with engine_errors():
                first = await anext(pieces, None)
        except ServeError as e:
            log(st, rid, plan, target, e.status, started, prompt_tokens, stream=True)
            raise
        except Exception as e:
            log(st, rid, plan, target, 500, started, prompt_tokens, stream=True)
            return server_error(e)
        said = [first.text] if isinstance(first, Delta) else []  # the answer's text, streamed
        if keeping:
            pieces = _said(pieces, said)

        def done(status: int, completion: int, cached: int | None) -> None:
            log(
                st,
                rid,
                plan,
                target,
                status,
                started,
                prompt_tokens,
                completion,
                stream=True,
                cached=cached,
            )
            if keeping and status == 200:  # what the client was sent, read as `choice` reads it
                text = "".join(said)
                split = tools.split_answer(
                    text, plan.family, plan.tools, req.tool_choice, req.parallel_tool_calls
                )
                keep(st, rid, plan, target, *split)

        echo = "" if chat or not req.echo else echoed(plan, st.token_text[target.engine], 0)
        events = sse.events(st, rid, plan, target, pieces, first, echo, done)
        return StreamingResponse(events, headers=headers, media_type="text/event-stream")
    status, results = 500, []
    try:
        results = await _generate(st, target, plan.gens, req.n)
        status = 200
    except ServeError as e:
        status = e.status
        raise
    except Exception as e:  # a replica died or failed: answer 500, keep serving
        return server_error(e)
    finally:
        tokens = sum(r.completion_tokens for r in results)
        log(st, rid, plan, target, status, started, prompt_tokens, tokens, cached=cached(results))
    tok = st.token_text[target.engine]
    choices = [choice(plan, tok, i // req.n, r) for i, r in enumerate(results)]
    if keeping:
        keep(st, rid, plan, target, choices[0].text, choices[0].tool_calls)
    used = bodies.usage(prompt_tokens, sum(r.completion_tokens for r in results), cached(results))
    body = (bodies.chat_body if chat else bodies.completion_body)(rid, req.model, choices, used)
    return JSONResponse(body, headers=headers)


def server_error(e: BaseException) -> JSONResponse:
    message = f"{type(e).__name__}: {e}"[:500]
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": None}}
    return JSONResponse(body, status_code=500)


# ---------------------------------------------------------------------- request -> engine


def _plan(st: IngressState, target: Target, req, chat: bool) -> Plan:
    tok = st.tokenizers[target.engine]
    grammar = None
    plan = Plan(req, chat, [])
    if chat:
        messages = normalize(req.messages)
        offered = tools.check_tools(req.tools, req.tool_choice)
        schema = None
        if offered and req.tool_choice != "none":
            plan.tools = offered
            schema = tools.forced_schema(offered, req.tool_choice, req.parallel_tool_calls)
            plan.forced = schema is not None
        if req.response_format is not None:
            grammar = req.response_format.grammar()
            if grammar is not None and plan.tools:
                raise BadRequest(
                    "response_format: a JSON response_format and callable tools cannot be "
                    "combined (the answer is either JSON or tool calls); send tool_choice "
                    '"none" or drop response_format',
                    "response_format",
                    "invalid_value",
                )
        if schema is not None:
            grammar = {"type": "json_schema", "schema": schema}
        # Under tool_choice "none" the tools are not offered to the model (their history still
        # renders); the family is how the prompt asked for calls (the fallback is Hermes).
        prompt = chat_prompt(tok, messages, plan.tools)
        plan.family = prompt.family
        prompts = [prompt.ids]
    else:
        plan.prompt_texts = [p if isinstance(p, str) else None for p in req.prompts()]
        prompts = [_prompt_ids(st, target.engine, p) for p in req.prompts()]
        if req.stream and len(prompts) > 1:
            raise BadRequest("stream=true takes one prompt", "prompt", "invalid_value")
        if req.stream and req.echo and req.logprobs is not None:
            raise BadRequest(
                "echo with logprobs is not streamed: send stream=false to score a prompt",
                "echo",
                "invalid_value",
            )
    if grammar is not None:
        try:
            check(grammar)
        except GrammarError as e:
            param = "tools" if plan.forced else "response_format.json_schema.schema"
            raise BadRequest(f"{param}: {e}", param, "invalid_schema") from None
    bias = _logit_bias(st, target.engine, req)
    plan.gens = [_gen_request(st, target, req, ids, grammar, bias) for ids in prompts]
    return plan


def _prompt_ids(st: IngressState, engine: str, prompt) -> list[int]:
    if isinstance(prompt, str):
        return st.tokenizers[engine](prompt)["input_ids"]
    return _in_vocab(st, engine, list(prompt), "prompt")


def _logit_bias(st: IngressState, engine: str, req) -> dict[int, float]:
    bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
    _in_vocab(st, engine, list(bias), "logit_bias")
    return bias


def _in_vocab(st: IngressState, engine: str, ids: list[int], param: str) -> list[int]:
    vocab = st.vocab[engine]
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise BadRequest(
            f"{param}: token id {bad[0]} is outside the vocabulary [0, {vocab})",
            param,
            "invalid_value",
        )
    return ids


def _gen_request(st: IngressState, target: Target, req, ids, grammar, bias) -> GenRequest:
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
    return oa.gen_request(req, ids, max_tokens, target.adapter, grammar, bias)


def nth_seed(seed: int | None, i: int) -> int | None:
    """Choice i's seed: a request's `n` choices differ, and each is reproducible."""
    if seed is None or i == 0:
        return seed
    low, high = SEED_RANGE
    return (seed - low + i) % (high - low + 1) + low


async def _said(pieces, said: list[str]):
    """The engine's streamed pieces, passed on, their text added to `said`."""
    while (piece := await anext(pieces, None)) is not None:
        if isinstance(piece, Delta):
            said.append(piece.text)
        yield piece


async def _generate(st: IngressState, target: Target, gens: list[GenRequest], n: int) -> list:
    handle = st.engines[target.engine]
    asks = [replace(g, seed=nth_seed(g.seed, i)) for g in gens for i in range(n)]
    with engine_errors():
        return list(await asyncio.gather(*[handle.generate.remote(g) for g in asks]))


# ---------------------------------------------------------------------- engine -> answer


def choice(plan: Plan, tok: bodies.Tokens, prompt: int, r: GenResult) -> bodies.Choice:
    """The answer `r` to prompt number `prompt` in OpenAI's terms: tool calls parsed out,
    log-probabilities in the API's shape, the echoed prompt in front (completions)."""
    gen = plan.gens[prompt]
    if plan.chat:
        content, calls = tools.split_answer(
            r.text, plan.family, plan.tools, plan.req.tool_choice, plan.req.parallel_tool_calls
        )
        finish = tools.finish_reason(plan.req.tool_choice, bool(calls), r.finish_reason)
        lps = bodies.chat_logprobs(tok, r.logprobs) if r.logprobs is not None else None
        return bodies.Choice(content, finish, lps, calls)
    text = r.text
    lps = None
    if plan.req.echo:
        text = echoed(plan, tok, prompt) + r.text
    if r.logprobs is not None:
        answer = [lp.token for lp in r.logprobs]
        if plan.req.echo:
            lps = bodies.completion_logprobs(
                tok, [*r.prompt_logprobs, *r.logprobs], [*gen.prompt_ids, *answer]
            )
        else:
            lps = bodies.completion_logprobs(tok, r.logprobs, answer)
    return bodies.Choice(text, r.finish_reason, lps)


def cached(results: list[GenResult]) -> int | None:
    """Prompt tokens served from the engine's prefix cache, when every answer says."""
    known = [r.cached_tokens for r in results]
    return None if not known or None in known else sum(known)


def echoed(plan: Plan, tok: bodies.Tokens, prompt: int) -> str:
    """The prompt as `echo` writes it back: as sent, or its token ids' text."""
    text = plan.prompt_texts[prompt]
    return text if text is not None else tok.tokenizer.decode(plan.gens[prompt].prompt_ids)


# ---------------------------------------------------------------------- shadow and log


async def _shadow(st: IngressState, target: Target, plan: Plan, rid: str) -> None:
    gens = [replace(g, adapter=target.adapter) for g in plan.gens]
    started, status, results = time.perf_counter(), 200, []
    try:  # the whole request: every prompt, n choices each
        results = await _generate(st, target, gens, plan.req.n)
    except Exception:  # a failing shadow must never touch the answered request
        status = 500
    tokens = sum(r.completion_tokens for r in results)
    prompt = sum(len(g.prompt_ids) for g in gens)
    log(st, f"{rid}-shadow", plan, target, status, started, prompt, tokens, shadow=True)


def log(
    st: IngressState,
    rid: str,
    plan: Plan,
    target: Target,
    status: int,
    started: float,
    prompt: int = 0,
    completion: int = 0,
    shadow: bool = False,
    stream: bool = False,
    cached: int | None = None,
) -> None:
    """One line of the request log: who asked (user, tenant), which arm answered, and the
    tokens it cost (cached: prompt tokens from the engine's prefix cache, where it says), so a
    platform team can charge usage back."""
    latency = time.perf_counter() - started
    record = {
        "id": rid,
        "model": plan.req.model,
        "experiment": target.experiment,
        "arm": target.arm,
        "user": plan.req.user,
        "tenant": plan.tenant,
        "status": status,
        "latency_s": round(latency, 4),
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cached_tokens": cached,
        "shadow": shadow,
        "stream": stream,
    }
    st.requests.write(record)
    if not shadow:
        st.arm_of[rid] = record
        if len(st.arm_of) > 100_000:  # bounded; older ids are found in the log file
            st.arm_of.pop(next(iter(st.arm_of)))
    # /metrics is scraped without a key: a tenant's fine-tuned models are counted under its
    # name, never listed by theirs (which /v1/models hides from other tenants)
    owner = st.registry.owners.get(target.arm)
    arm = f"{owner}:fine-tuned" if owner else target.arm
    st.metrics.observe(arm, status, latency, prompt, completion, shadow)


@functools.cache
def _transcripts(serve_dir: str) -> JsonlLog:
    # One writer per file, as state.py's request and feedback logs, opened on first use: a
    # server that does not keep content never creates the file.
    return JsonlLog(Path(serve_dir) / "transcripts.jsonl")


def keep(
    st: IngressState,
    rid: str,
    plan: Plan,
    target: Target,
    content: str | None,
    calls: list[dict],
) -> None:
    """One line of serve/transcripts.jsonl (serve.log_content): the messages as the request
    sent them and the answer the client got (choice 0 when n > 1), for `rayft data
    from-feedback`. An answer that calls tools is kept whole as `output_message` too."""
    record = {
        "id": rid,
        "model": plan.req.model,
        "experiment": target.experiment,
        "arm": target.arm,
        "messages": plan.req.messages,
        "output": content,
    }
    if calls:
        record["output_message"] = {"role": "assistant", "content": content, "tool_calls": calls}
    _transcripts(st.s.serve_dir).write(record)
