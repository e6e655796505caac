"""The OpenAI surface of `rayft serve` as applications and eval harnesses use it, on a real local
Ray Serve with tiny-llama and a LoRA adapter: every parameter honoured (its effect visible) or
refused with a 400 naming it; log-probabilities equal to a teacher-forced pass of the same model
and adapter; structured outputs that always validate; tool calls; usage, streamed too.
"""

from __future__ import annotations

import json
import os

import jsonschema
import pytest
import requests
import torch
from test_serve_api import free_port
from test_serve_units import make_adapter

from rayft.adapters import fingerprint
from rayft.config import JobConfig

pytestmark = pytest.mark.slow

KEY, TEAM_KEY = "sk-openai-surface", "sk-team-blue"
HI = [{"role": "user", "content": "hi there"}]


@pytest.fixture(scope="module")
def server(ray_local, tiny_model, tmp_path_factory):
    from rayft.serving import start, stop

    os.environ["RAYFT_TEST_TEAM_KEY"] = TEAM_KEY
    run = tmp_path_factory.mktemp("openai_run")
    a1 = make_adapter(tiny_model, run / "a1", seed=1)
    cfg = JobConfig(
        run_dir=str(run),
        model={"base": tiny_model},
        serve={
            "port": free_port(),
            "api_key": KEY,
            "api_keys": {"blue": "env:RAYFT_TEST_TEAM_KEY"},  # read from the environment
            "adapters": {"a1": str(a1)},
            "max_tokens_limit": 64,
            "max_n": 4,
            "cpus_per_replica": 0.5,
        },
    )
    url = start(cfg)
    yield cfg, url, a1
    stop()


@pytest.fixture(scope="module")
def engine(tiny_model):
    """The same engine class in this process: the teacher-forced reference."""
    from rayft.serving.hf_engine import TransformersEngine

    return TransformersEngine(tiny_model, device="cpu")


def client(url: str, key: str = KEY):
    from openai import OpenAI

    return OpenAI(base_url=url, api_key=key, max_retries=0)


def post(url: str, path: str, body: dict, key: str = KEY, stream: bool = False):
    return requests.post(
        url.removesuffix("/v1") + path,
        json=body,
        headers={"Authorization": f"Bearer {key}"},
        timeout=120,
        stream=stream,
    )


def sse(resp) -> list[dict]:
    out = []
    for line in resp.iter_lines():
        if line.startswith(b"data: ") and line != b"data: [DONE]":
            out.append(json.loads(line[6:]))
    return out


def teacher_forced(engine, ids: list[int], adapter=None) -> torch.Tensor:
    """log-softmax of the model's logits at each position of `ids` ([len, V], float32)."""
    t = torch.tensor([ids])
    return torch.log_softmax(engine.logits(t, torch.ones_like(t), adapter)[0], -1)


# ------------------------------------------------------------------ one rule for parameters


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/chat/completions", {"messags": HI}, "messags"),  # misspelt: never ignored
        ("/v1/chat/completions", {"messages": HI, "functions": [{"name": "f"}]}, "functions"),
        ("/v1/chat/completions", {"messages": HI, "store": True}, "store"),
        ("/v1/chat/completions", {"messages": HI, "reasoning_effort": "low"}, "reasoning_effort"),
        ("/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, "top_logprobs"),
        ("/v1/chat/completions", {"messages": HI, "top_logprobs": 21, "logprobs": True}, None),
        ("/v1/chat/completions", {"messages": HI, "stream_options": {}}, "stream_options"),
        (
            "/v1/chat/completions",
            {"messages": HI, "stream": True, "stream_options": {"include_usag": True}},
            "stream_options.include_usag",
        ),
        ("/v1/chat/completions", {"messages": HI, "logit_bias": {"99999": 5}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": HI, "logit_bias": {"5": 101}}, "logit_bias"),
        ("/v1/chat/completions", {"messages": HI, "stop": [""]}, "stop"),
        ("/v1/chat/completions", {"messages": HI, "presence_penalty": 3}, "presence_penalty"),
        ("/v1/chat/completions", {"messages": HI, "modalities": ["audio"]}, None),
        (
            "/v1/chat/completions",
            {"messages": HI, "response_format": {"type": "json_schema"}},
            "response_format",
        ),
        (  # a schema the grammar library cannot enforce: named, not ignored
            "/v1/chat/completions",
            {
                "messages": HI,
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
                },
            },
            "response_format.json_schema.schema",
        ),
        ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
        ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
        ("/v1/completions", {"prompt": "x", "logprobs": 6}, "logprobs"),
        (
            "/v1/completions",
            {"prompt": "x", "echo": True, "logprobs": 1, "stream": True},
            "echo",
        ),
        ("/v1/completions", {"prompt": ["a", "b", "c"], "n": 2}, "n"),
    ],
)
def test_every_parameter_is_honoured_or_refused_by_name(server, path, body, param):
    _, url, _ = server
    r = post(url, path, {"model": "base", "max_tokens": 2, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    expected = param or next(k for k in body if k not in ("messages", "prompt"))
    assert err["param"] == expected or err["param"].startswith(expected + "."), err
    assert err["message"]


def test_logit_bias_top_k_min_p_and_penalties_take_effect(server):
    _, url, _ = server
    c = client(url)

    def answer(**kw):
        r = c.completions.create(
            model="base", prompt="the cat", max_tokens=24, temperature=0, logprobs=0, **kw
        )
        return r.choices[0].text, r.choices[0].logprobs.tokens

    text, tokens = answer()
    first = c.completions.create(model="base", prompt="the cat", max_tokens=1, temperature=0)
    ids = c.completions.create(
        model="base", prompt="the cat", max_tokens=1, temperature=0, logprobs=0
    )
    assert ids.choices[0].text == first.choices[0].text
    # logit_bias -100 bans the greedy first token; +100 forces a token everywhere.
    greedy_id = _first_id(url, "the cat")
    banned, _ = answer(logit_bias={str(greedy_id): -100})
    assert _ids(url, banned)[:1] != [greedy_id]
    forced, forced_tokens = answer(logit_bias={"300": 100})
    assert len(set(forced_tokens)) == 1
    # The greedy answer repeats tokens on this random model: penalties change it.
    assert len(set(tokens)) < len(tokens)
    assert answer(presence_penalty=2.0)[0] != text
    assert answer(frequency_penalty=2.0)[0] != text
    assert answer(extra_body={"repetition_penalty": 2.0})[0] != text
    # top_k=1 and min_p=1 at temperature 1 leave only the best token: the greedy answer.
    for extra in ({"top_k": 1}, {"min_p": 1.0}):
        sampled = c.completions.create(
            model="base", prompt="the cat", max_tokens=24, temperature=1.0, extra_body=extra
        )
        assert sampled.choices[0].text == text


def _first_id(url: str, prompt: str) -> int:
    r = post(
        url,
        "/v1/completions",
        {"model": "base", "prompt": prompt, "max_tokens": 1, "temperature": 0, "logprobs": 1},
    ).json()
    top = r["choices"][0]["logprobs"]["top_logprobs"][0]
    token = r["choices"][0]["logprobs"]["tokens"][0]
    assert token in top
    return _ids(url, token)[0]


def _ids(url: str, text: str) -> list[int]:
    from transformers import AutoTokenizer

    from rayft import models

    tok = AutoTokenizer.from_pretrained(models.cache_dir("tiny-llama"))
    return tok(text, add_special_tokens=False)["input_ids"]


def test_seeded_choices_differ_and_reproduce(server):
    _, url, _ = server
    c = client(url)
    kw = dict(model="base", messages=HI, max_tokens=12, temperature=1.0, n=3, seed=7)
    a = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    b = [ch.message.content for ch in c.chat.completions.create(**kw).choices]
    assert a == b and len(set(a)) == 3


# ------------------------------------------------------------------ log-probabilities


@pytest.mark.parametrize("model", ["base", "a1"])
def test_chat_logprobs_are_the_models_own(server, engine, model):
    _, url, a1 = server
    r = client(url).chat.completions.create(
        model=model, messages=HI, max_tokens=10, temperature=0, logprobs=True, top_logprobs=3
    )
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 10
    prompt = engine.tokenizer.apply_chat_template(HI, add_generation_prompt=True, tokenize=False)
    ids = engine.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    adapter = fingerprint("a1", a1) if model == "a1" else None
    # The answer's token ids, from the same engine class in this process (the API names tokens
    # by their text, which several byte tokens share).
    from rayft.serving.protocol import GenRequest

    mine = engine.generate([GenRequest(ids, 10, 0.0, adapter=adapter, logprobs=0)])[0]
    answer = [lp.token for lp in mine.logprobs]
    assert [e.token for e in content] == [engine.tokenizer.decode([t]) for t in answer]
    lp = teacher_forced(engine, ids + answer, adapter)
    for i, (entry, token) in enumerate(zip(content, answer, strict=True)):
        assert entry.logprob == pytest.approx(lp[len(ids) - 1 + i, token].item(), abs=1e-3)
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob, abs=1e-6)  # greedy
        assert bytes(entry.bytes).decode(errors="replace") == entry.token
    assert "".join(e.token for e in content) == r.choices[0].message.content


def test_completions_echo_scores_the_prompt_as_lm_eval_asks(server, engine):
    _, url, a1 = server
    prompt = [5, 17, 42, 99, 7, 256]
    body = {
        "model": "a1",
        "prompt": [prompt],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 2,
        "echo": True,
        "seed": 1234,
    }  # lm-eval local-completions' payload
    r = post(url, "/v1/completions", body)
    assert r.ok, r.text
    lps = r.json()["choices"][0]["logprobs"]
    assert lps["token_logprobs"][0] is None and lps["top_logprobs"][0] is None
    assert len(lps["token_logprobs"]) == len(prompt) + 1
    lp = teacher_forced(engine, prompt, fingerprint("a1", a1))
    for pos in range(1, len(prompt)):
        assert lps["token_logprobs"][pos] == pytest.approx(
            lp[pos - 1, prompt[pos]].item(), abs=1e-3
        )
        assert len(lps["top_logprobs"][pos]) <= 2
    # The answer's own token is the greedy one: its value is the best of its alternatives.
    assert lps["token_logprobs"][-1] == pytest.approx(max(lps["top_logprobs"][-1].values()))
    text = r.json()["choices"][0]["text"]
    assert text.startswith(engine.tokenizer.decode(prompt))
    assert lps["text_offset"][0] == 0 and lps["text_offset"] == sorted(lps["text_offset"])


def test_an_end_token_answer_keeps_its_logprob_and_nulls_mean_defaults(server, engine):
    """lm-eval reads token_logprobs[ctxlen:-1]: the answer's token is the last entry even when
    it is the end token (the text leaves it out; vLLM reports it the same way)."""
    _, url, _ = server
    prompt = [5, 17, 42, 99]
    eos = engine.eos_ids[0]
    body = {
        "model": "base",
        "prompt": [prompt],
        "max_tokens": 1,
        "temperature": 0,
        "logprobs": 1,
        "echo": True,
        "logit_bias": {str(eos): 100},
    }
    r = post(url, "/v1/completions", body).json()
    lps = r["choices"][0]["logprobs"]
    assert len(lps["token_logprobs"]) == len(prompt) + 1
    assert r["choices"][0]["finish_reason"] == "stop" and r["usage"]["completion_tokens"] == 1
    assert r["choices"][0]["text"] == engine.tokenizer.decode(prompt)  # no end token in text
    # Explicit nulls, as SDKs send them, are the defaults.
    nulls = {
        "model": "base",
        "messages": HI,
        "max_tokens": 3,
        "temperature": None,
        "top_p": None,
        "n": None,
        "stream": None,
        "presence_penalty": None,
        "logprobs": None,
        "parallel_tool_calls": None,
    }
    assert post(url, "/v1/chat/completions", nulls).ok


def test_streamed_logprobs_and_usage_equal_the_plain_answer(server):
    _, url, _ = server
    c = client(url)
    kw = dict(model="a1", messages=HI, max_tokens=12, temperature=0, logprobs=True, top_logprobs=2)
    plain = c.chat.completions.create(**kw)
    chunks = list(
        c.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True})
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    streamed = [
        e
        for ch in chunks
        if ch.choices and ch.choices[0].logprobs
        for e in ch.choices[0].logprobs.content
    ]
    assert text == plain.choices[0].message.content
    assert [(e.token, round(e.logprob, 4)) for e in streamed] == [
        (e.token, round(e.logprob, 4)) for e in plain.choices[0].logprobs.content
    ]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(ch.usage is None for ch in chunks[:-1])
    comp = list(
        c.completions.create(
            model="base",
            prompt="the cat",
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert comp[-1].usage.completion_tokens == 5 and comp[-1].choices == []


def test_usage_is_logged_per_tenant(server):
    cfg, url, _ = server
    from pathlib import Path

    client(url, TEAM_KEY).chat.completions.create(
        model="base", messages=HI, max_tokens=3, temperature=0, user="u-42"
    )
    log = Path(cfg.run_dir) / "serve" / "requests.jsonl"
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    mine = [x for x in rows if x["user"] == "u-42"]
    assert mine and mine[-1]["tenant"] == "blue" and mine[-1]["completion_tokens"] == 3
    assert mine[-1]["prompt_tokens"] > 0
    assert any(x["tenant"] == "default" for x in rows)
    nobody = requests.get(url + "/models", headers={"Authorization": "Bearer sk-nobody"})
    assert nobody.status_code == 401


# ------------------------------------------------------------------ messages as clients send them


def test_content_parts_and_tool_turns_are_accepted(server):
    _, url, _ = server
    c = client(url)
    parts = [
        {
            "role": "user",
            "content": [{"type": "text", "text": "hi "}, {"type": "text", "text": "there"}],
        }
    ]
    a = c.chat.completions.create(model="base", messages=parts, max_tokens=6, temperature=0)
    joined = [{"role": "user", "content": "hi \nthere"}]  # text parts join with "\n" (vLLM)
    b = c.chat.completions.create(model="base", messages=joined, max_tokens=6, temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    history = [
        {"role": "user", "content": "weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    r = c.chat.completions.create(
        model="base", messages=history, max_tokens=4, temperature=0, tools=[WEATHER]
    )
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # The tool turn reached the prompt: without its result the prompt is shorter.
    shorter = c.chat.completions.create(
        model="base", messages=history[:2], max_tokens=4, temperature=0, tools=[WEATHER]
    )
    assert r.usage.prompt_tokens > shorter.usage.prompt_tokens
    image = [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}
    ]
    bad = post(url, "/v1/chat/completions", {"model": "base", "messages": image})
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("messages.0.content")


# ------------------------------------------------------------------ structured outputs and tools

WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Oslo", "Lima"]},
                "unit": {"enum": ["C", "F"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}

SCHEMA = {
    "type": "object",
    "properties": {
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["ok", "color", "size"],
    "additionalProperties": False,
}


def test_json_schema_answers_always_validate(server):
    _, url, _ = server
    c = client(url)
    fmt = {
        "type": "json_schema",
        "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
    }
    for model in ("base", "a1"):
        r = c.chat.completions.create(
            model=model,
            messages=HI,
            max_tokens=60,
            temperature=1.0,
            n=3,
            seed=11,
            response_format=fmt,
        )
        for ch in r.choices:
            assert ch.finish_reason == "stop", ch
            jsonschema.validate(json.loads(ch.message.content), SCHEMA)
    obj = c.chat.completions.create(
        model="base",
        messages=HI,
        max_tokens=60,
        temperature=0,
        response_format={"type": "json_object"},
    )
    if obj.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(obj.choices[0].message.content), dict)
    else:  # cut by max_tokens: a prefix of an object, never prose
        assert obj.choices[0].message.content.lstrip().startswith("{")
    plain = c.chat.completions.create(model="base", messages=HI, max_tokens=20, temperature=0)
    with pytest.raises(json.JSONDecodeError):  # the grammar, not the model, made it JSON
        json.loads(plain.choices[0].message.content)


def test_forced_tool_calls_validate_and_stream_the_same(server):
    _, url, _ = server
    c = client(url)
    params = WEATHER["function"]["parameters"]
    # One call each: with parallel calls allowed, a random model keeps adding calls.
    for choice in ({"type": "function", "function": {"name": "weather"}}, "required"):
        kw = dict(
            model="a1",
            messages=[{"role": "user", "content": "weather?"}],
            max_tokens=60,
            temperature=0,
            tools=[WEATHER],
            tool_choice=choice,
            parallel_tool_calls=False,
        )
        r = c.chat.completions.create(**kw)
        ch = r.choices[0]
        # OpenAI's reasons: "tool_calls", but "stop" when the request named the function.
        reason = "stop" if isinstance(choice, dict) else "tool_calls"
        assert ch.finish_reason == reason, ch
        call = ch.message.tool_calls[0]
        assert call.function.name == "weather" and call.id.startswith("call_")
        jsonschema.validate(json.loads(call.function.arguments), params)
        calls: dict[int, dict] = {}
        finish = None
        for chunk in c.chat.completions.create(**kw, stream=True):
            d = chunk.choices[0].delta if chunk.choices else None
            for t in (d.tool_calls or []) if d else []:
                slot = calls.setdefault(t.index, {"name": "", "arguments": ""})
                slot["name"] += (t.function.name or "") if t.function else ""
                slot["arguments"] += (t.function.arguments or "") if t.function else ""
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
        assert finish == reason
        assert calls[0] == {"name": "weather", "arguments": call.function.arguments}
    bad = post(
        url,
        "/v1/chat/completions",
        {
            "model": "base",
            "messages": HI,
            "tools": [WEATHER],
            "tool_choice": {"type": "function", "function": {"name": "nope"}},
        },
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"].startswith("tool_choice")
