"""Tool calling and message normalisation for the chat API, without Ray or an engine: OpenAI
message shapes refused with the field named, tools and tool history rendered into real
templates' prompts, tool calls read from whole and streamed answers, forced-call schemas."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest
from openai.types.chat.chat_completion_chunk import ChoiceDelta
from transformers import AutoTokenizer

from rayft import models
from rayft.serving.errors import BadRequest
from rayft.serving.prompts import chat_prompt, chat_prompt_ids, normalize
from rayft.serving.tool_stream import ToolStream
from rayft.serving.tools import (
    KNOWN_FAMILIES,
    check_tools,
    family_of,
    forced_calls,
    forced_schema,
    parse_tool_calls,
    split_answer,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
            "required": ["city"],
            "additionalProperties": False,
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}  # no parameters: takes none
TOOLS = check_tools([WEATHER, TIME])

CHAT = [
    {"role": "developer", "content": "Answer in one line."},
    {
        "role": "user",
        "content": [{"type": "text", "text": "Weather in"}, {"type": "text", "text": "Paris?"}],
    },
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
]

# Qwen 2.5 Instruct's chat template, verbatim: a template that knows tools.
QWEN25 = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n        {{- 'You are Qwen, created by "
    "Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n    {{- \"\\n\\n# Tools\\n\\nYou"
    " may call one or more functions to assist with the user query.\\n\\nYou are provided with "
    'function signatures within <tools></tools> XML tags:\\n<tools>" }}\n    {%- for tool in tools %}\n'
    '        {{- "\\n" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n    {{- "\\n</tools>\\n\\n'
    "For each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": '
    '<args-json-object>}\\n</tool_call><|im_end|>\\n" }}\n{%- else %}\n'
    "    {%- if messages[0]['role'] == 'system' %}\n        {{- '<|im_start|>system\\n' + "
    "messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n        {{- '<|im_start|>system\\n"
    "You are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    '    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or '
    '(message.role == "assistant" and not message.tool_calls) %}\n'
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    '            {{- \'\\n<tool_call>\\n{"name": "\' }}\n            {{- tool_call.name }}\n'
    '            {{- \'", "arguments": \' }}\n            {{- tool_call.arguments | tojson }}\n'
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    '    {%- elif message.role == "tool" %}\n'
    '        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}\n'
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    '        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}\n'
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)

# Shaped like Llama 3.1's: tools as indented JSON, calls as {"name", "parameters"}, results in
# the ipython role.
LLAMA31 = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nEnvironment: ipython\n"
    "{%- for t in tools %}\n{{ t | tojson(indent=4) }}{%- endfor %}<|eot_id|>{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'assistant' and m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    '{%- for c in m.tool_calls %}{"name": "{{ c.function.name }}", "parameters": '
    "{{ c.function.arguments | tojson }}}{%- endfor %}<|eot_id|>"
    "{%- elif m.role == 'tool' %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- endif %}"
)


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2-135m-instruct"])
def tok(request):
    return AutoTokenizer.from_pretrained(models.resolve(request.param))


def with_template(tok, template: str):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = template
    return tok


def refused(call, *args) -> BadRequest:
    with pytest.raises(BadRequest) as e:
        call(*args)
    return e.value


# --------------------------------------------------------------------------- normalisation


def test_normalize_writes_what_templates_read():
    msgs = normalize(CHAT)
    assert msgs[1] == {"role": "user", "content": "Weather in\nParis?"}
    assert msgs[2]["content"] == ""
    assert msgs[2]["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": {"city": "Paris"},
    }
    assert msgs[3] == {
        "role": "tool",
        "content": "18C and sunny",
        "tool_call_id": "call_1",
        "name": "get_weather",
    }
    assert msgs[0]["role"] == "developer"  # mapped (or not) when rendering, by the template


CALL = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    "messages, param",
    [
        ([USER, {"role": "user", "content": [{"type": "text", "text": "look"}, {"type": "image_url", "image_url": {"url": "x"}}]}], "messages.1.content.1.type"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "messages.0.content.0.text"),
        ([{"role": "user", "content": [{"type": "bogus"}]}], "messages.0.content.0.type"),
        ([{"role": "user", "content": []}], "messages.0.content"),
        ([{"role": "user", "content": None}], "messages.0.content"),
        ([{"role": "assistant", "content": None}], "messages.0.content"),
        ([{"role": "function", "content": "x"}], "messages.0.role"),
        (["hello"], "messages.0"),
        ([], "messages"),
        ([{"role": "user", "content": "x", "name": 5}], "messages.0.name"),
        ([{"role": "user", "content": "x", "tool_calls": [CALL]}], "messages.0.tool_calls"),
        ([USER, {"role": "assistant", "content": None, "function_call": {"name": "f"}}], "messages.1.function_call"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "{bad"}}]}], "messages.1.tool_calls.0.function.arguments"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": "[1]"}}]}], "messages.1.tool_calls.0.function.arguments"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"name": "f", "arguments": {}}}]}], "messages.1.tool_calls.0.function.arguments"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "id": ""}]}], "messages.1.tool_calls.0.id"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "type": "code"}]}], "messages.1.tool_calls.0.type"),
        ([USER, {"role": "assistant", "content": None, "tool_calls": [{**CALL, "function": {"arguments": "{}"}}]}], "messages.1.tool_calls.0.function.name"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "content": "r"}], "messages.2.tool_call_id"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c9", "content": "r"}], "messages.2.tool_call_id"),
        ([USER, {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "tool", "tool_call_id": "c1"}], "messages.2.content"),
    ],
)  # fmt: skip
def test_normalize_refuses_naming_the_field(messages, param):
    e = refused(normalize, messages)
    assert (e.status, e.param, e.code) == (400, param, "invalid_value")
    assert e.message.startswith(param + ":")
    if param.endswith("content.1.type"):
        assert "text models" in e.message


def test_assistant_refusal_parts_and_text_parts_are_content():
    msgs = normalize(
        [USER, {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}]
    )
    assert msgs[1]["content"] == "No."
    assert (
        refused(
            normalize, [{"role": "user", "content": [{"type": "refusal", "refusal": "x"}]}]
        ).param
        == "messages.0.content.0.type"
    )


# --------------------------------------------------------------------------- rendering


def test_without_tools_the_template_renders_as_before(tok):
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert chat_prompt_ids(tok, msgs) == tok(text, add_special_tokens=False)["input_ids"]
    assert chat_prompt(tok, msgs).rendering == "template"


def test_tools_and_tool_history_reach_a_template_that_ignores_them(tok):
    """SmolLM2's and tiny-llama's ChatML templates ignore tools and cannot write tool calls
    (content null even breaks them): the Hermes rewrite puts all of it in the prompt."""
    p = chat_prompt(tok, normalize(CHAT), TOOLS)
    assert (p.rendering, p.family) == ("hermes", "hermes")
    assert p.ids == tok(p.text, add_special_tokens=False)["input_ids"]
    assert p.text.startswith("<|im_start|>system\nAnswer in one line.\n\n# Tools\n")  # developer
    assert "developer" not in p.text
    for tool in TOOLS:
        assert "\n" + json.dumps(tool) + "\n" in p.text
    call = '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert call in p.text
    assert "<|im_start|>user\n<tool_response>\n18C and sunny\n</tool_response><|im_end|>" in p.text
    assert p.text.endswith("<|im_start|>assistant\n")


def test_tool_history_renders_without_tools(tok):
    """tool_choice "none" or a client that stopped offering tools: the history still renders."""
    p = chat_prompt(tok, normalize(CHAT))
    assert p.rendering == "hermes" and "<tools>" not in p.text
    assert '<tool_call>\n{"name": "get_weather"' in p.text and "18C and sunny" in p.text


def test_a_tool_named_in_the_chat_is_still_seen_as_dropped(tok):
    msgs = normalize([{"role": "user", "content": "use get_weather or get_time"}])
    assert chat_prompt(tok, msgs, TOOLS).rendering == "hermes"


def test_a_template_that_knows_tools_renders_them_itself(tok):
    qwen = with_template(tok, QWEN25)
    msgs = normalize(CHAT)
    p = chat_prompt(qwen, msgs, TOOLS)
    assert (p.rendering, p.family) == ("template", "hermes")
    system = [{**m, "role": "system"} if m["role"] == "developer" else m for m in msgs]
    assert p.text == qwen.apply_chat_template(
        system, tools=TOOLS, add_generation_prompt=True, tokenize=False
    )
    assert '"arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in p.text


def test_a_template_that_drops_tool_calls_falls_back(tok):
    lists_tools_only = with_template(
        tok,
        QWEN25.replace("{%- for tool_call in message.tool_calls %}", "{%- for tool_call in [] %}"),
    )
    p = chat_prompt(lists_tools_only, normalize(CHAT), TOOLS)
    assert p.rendering == "hermes"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}' in p.text


def test_a_template_that_drops_tool_results_falls_back(tok):
    drops_results = with_template(
        tok, QWEN25.replace('{%- elif message.role == "tool" %}', "{%- elif false %}")
    )
    p = chat_prompt(drops_results, normalize(CHAT), TOOLS)
    assert p.rendering == "hermes" and "<tool_response>\n18C and sunny\n</tool_response>" in p.text


def test_llama31_style_templates_are_read_as_llama3_json(tok):
    llama = with_template(tok, LLAMA31)
    assert family_of(llama) == "llama3_json" and family_of(tok) == "hermes"
    p = chat_prompt(llama, normalize(CHAT), TOOLS)
    assert (p.rendering, p.family) == ("template", "llama3_json")
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in p.text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18C and sunny" in p.text
    assert set(KNOWN_FAMILIES) == {"hermes", "llama3_json"}


def test_developer_role_kept_where_the_template_knows_it(tok):
    knows = with_template(
        tok,
        "{% for m in messages %}{% if m.role == 'developer' %}D:{% endif %}{{ m.content }}\n{% endfor %}",
    )
    assert chat_prompt(knows, [{"role": "developer", "content": "x"}]).text == "D:x\n"


def test_a_template_refusing_the_chat_is_a_400(tok):
    strict = with_template(tok, "{{ raise_exception('Conversation roles must alternate') }}")
    e = refused(chat_prompt, strict, [USER])
    assert (e.status, e.param) == (400, "messages") and "alternate" in e.message


# --------------------------------------------------------------------------- tools, choice


@pytest.mark.parametrize(
    "tools, choice, param",
    [
        (None, "auto", "tool_choice"),
        ([], None, "tools"),
        ([{"type": "code_interpreter"}], None, "tools.0.type"),
        ([WEATHER, {"type": "function", "function": {"name": "get weather"}}], None, "tools.1.function.name"),
        ([WEATHER, WEATHER], None, "tools.1.function.name"),
        ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}], None, "tools.0.function.parameters"),
        ([{"type": "function", "function": {"name": "f", "description": 1}}], None, "tools.0.function.description"),
        ([WEATHER], "always", "tool_choice"),
        ([WEATHER], {"type": "function", "function": {"name": "get_time"}}, "tool_choice.function.name"),
        ([WEATHER], {"type": "other"}, "tool_choice.type"),
        ([WEATHER], {"type": "function", "function": {"name": ["get_weather"]}}, "tool_choice.function.name"),
    ],
)  # fmt: skip
def test_check_tools_refuses_naming_the_field(tools, choice, param):
    assert refused(check_tools, tools, choice).param == param


def test_check_tools_fills_in_parameters():
    assert TOOLS[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert check_tools(None) is None


# --------------------------------------------------------------------------- parsing


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    for c in calls:
        assert c["type"] == "function" and c["id"].startswith("call_") and len(c["id"]) == 29
        int(c["id"][5:], 16)
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_calls_are_read_and_the_rest_is_content():
    text = (
        'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
        '</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    )
    content, calls = parse_tool_calls(text, "hermes", TOOLS)
    assert content == "Let me check."
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_time", {})]
    smollm2 = '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>'
    assert calls_of(parse_tool_calls(smollm2, "hermes", TOOLS)[1]) == [
        ("get_time", {}),
        ("get_weather", {"city": "Oslo"}),
    ]


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>{"name": "get_weather", "arguments": {city: Paris}}</tool_call>',
        '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
        '<tool_call>{"name": "get_weather", "arguments": [1]}</tool_call>',
        "<tool_call>[1, 2]</tool_call>",
        '<tool_call>{"name": ["get_time"], "arguments": {}}</tool_call>',
        '<tool_call>[{"name": "get_time", "arguments": {}}, {"name": "rm_rf", "arguments": {}}]</tool_call>',
        "<tool_call>[]</tool_call>",
    ],
)
def test_malformed_or_unoffered_hermes_calls_stay_content(text):
    assert parse_tool_calls(f"Hi {text}", "hermes", TOOLS) == (f"Hi {text}", [])


def test_an_unclosed_last_hermes_block_still_counts():
    text = 'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n'
    content, calls = parse_tool_calls(text, "hermes", TOOLS)
    assert content == "Sure." and calls_of(calls) == [("get_time", {})]
    assert parse_tool_calls('<tool_call>\n{"name": "get_ti', "hermes", TOOLS)[1] == []


def test_llama3_json_calls():
    text = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "a;b"}}; {"name": "get_time", "parameters": {}}'
    content, calls = parse_tool_calls(text, "llama3_json", TOOLS)
    assert content is None
    assert calls_of(calls) == [("get_weather", {"city": "a;b"}), ("get_time", {})]
    for text in (
        ' {"name": "get_time", "parameters": {}}\n',
        '{"name": "get_time", "arguments": {}};',
    ):
        assert calls_of(parse_tool_calls(text, "llama3_json", TOOLS)[1]) == [("get_time", {})]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        '{"name": "nope", "parameters": {}}',
        '{"name": "get_time", "parameters": {}} and then some words',
        '{"name": "get_weather", "parameters": {"city": ',
        '{"category": "shipping"}',
        '{"name": {"a": 1}, "parameters": {}}',
        '{"name": "get_time", "parameters": {}} {"name": "get_time", "parameters": {}}',
    ],
)
def test_llama3_json_is_all_or_nothing(text):
    assert parse_tool_calls(text, "llama3_json", TOOLS) == (text.strip(), [])


# --------------------------------------------------------------------------- forced calls


def test_required_schema_accepts_calls_and_refuses_others():
    schema = forced_schema(TOOLS, "required", parallel_tool_calls=True)
    jsonschema.Draft202012Validator.check_schema(schema)
    good = [
        {"name": "get_weather", "arguments": {"city": "Oslo", "unit": "C"}},
        {"name": "get_time", "arguments": {}},
    ]
    jsonschema.validate(good, schema)
    bad = [
        [],
        [{"name": "get_news", "arguments": {}}],
        [{"name": "get_weather", "arguments": {}}],  # city is required
        [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "K"}}],
        [{"name": "get_weather", "arguments": {"city": "Oslo"}, "extra": 1}],
        {"name": "get_time", "arguments": {}},
    ]
    for answer in bad:
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(answer, schema)
    single = forced_schema(TOOLS, "required", parallel_tool_calls=False)
    jsonschema.validate(good[:1], single)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(good, single)
    calls = forced_calls(json.dumps(good), TOOLS, "required")
    assert calls_of(calls) == [(c["name"], c["arguments"]) for c in good]


def test_named_choice_forces_that_functions_arguments():
    choice = {"type": "function", "function": {"name": "get_weather"}}
    schema = forced_schema(TOOLS, choice)
    jsonschema.validate({"city": "Oslo"}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"town": "Oslo"}, schema)
    assert calls_of(forced_calls('{"city": "Oslo"}', TOOLS, choice)) == [
        ("get_weather", {"city": "Oslo"})
    ]
    assert forced_calls('{"city": "Os', TOOLS, choice) == []  # cut short by max_tokens
    assert forced_schema(TOOLS, "auto") is None and forced_schema(TOOLS, "none") is None
    assert split_answer('{"city": "Os', "hermes", TOOLS, choice) == ('{"city": "Os', [])


# --------------------------------------------------------------------------- streaming

HERMES_TEXTS = [
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich ☀"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
    'A <tool_call>{"name": "get_weather", "arguments": {bad}</tool_call> B\n<tool_call>{"name":'
    '"get_time","arguments":{}}</tool_call>\n C < D <tool_',
    '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>',
    'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {"tz": "UTC"}}\n',
    "x < y and <tool but <tool_call no call",
    'Both: <tool_call>[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "arguments": {"city": "Oslo"}}]</tool_call>',
    "  plain answer with trailing space  ",
    "",
]
LLAMA_TEXTS = [
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {}}',
    ' {"name": "get_weather", "parameters": {"city": "a;b"}}',
    '{"name": "nope", "parameters": {}}',
    "The weather is fine.",
    '{"name": "get_weather", "parameters": {"city": ',
    "<|pyth is not the tag",
]
FORCED = [
    (
        "required",
        '[{"name": "get_weather", "arguments": {"city": "Oslo"}}, {"name": "get_time", "arguments": {}}]',
    ),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}'),
    ("required", '[{"name": "get_weather", "argu'),
]


def splits(text: str) -> list[list[str]]:
    """Whole, one character at a time, every cut in two, and random cuts."""
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    rng = random.Random(len(text))
    for _ in range(20):
        cuts = (
            sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
            if len(text) > 1
            else []
        )
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    return out


def replay(stream: ToolStream, pieces: list[str]) -> tuple[str | None, list[tuple[str, str]]]:
    """Join the deltas as an OpenAI client does: content concatenated, calls by index."""
    events = [e for p in pieces for e in stream.feed(p)] + stream.close()
    content, calls = "", {}
    for e in events:
        ChoiceDelta(**e)  # the shape OpenAI's clients read
        content += e.get("content", "")
        for d in e.get("tool_calls", []):
            if d["index"] not in calls:  # the first delta of a call names it
                assert d["id"].startswith("call_") and d["type"] == "function"
                assert d["function"]["arguments"] == ""
                calls[d["index"]] = [d["function"]["name"], ""]
            else:
                assert set(d) == {"index", "function"}
                calls[d["index"]][1] += d["function"]["arguments"]
    assert sorted(calls) == list(range(len(calls)))
    assert len(stream.calls) == len(calls)
    return content or None, [tuple(calls[i]) for i in sorted(calls)]


@pytest.mark.parametrize(
    "family, choice, text",
    [("hermes", "auto", t) for t in HERMES_TEXTS]
    + [("llama3_json", "auto", t) for t in LLAMA_TEXTS]
    + [("hermes", c, t) for c, t in FORCED]
    + [("hermes", "none", HERMES_TEXTS[0])],
)
def test_streamed_calls_reassemble_to_the_parsed_ones(family, choice, text):
    content, calls = split_answer(text, family, TOOLS, choice)
    want = (content, [(c["function"]["name"], c["function"]["arguments"]) for c in calls])
    for pieces in splits(text):
        assert replay(ToolStream(family, TOOLS, choice), pieces) == want, pieces


def test_texts_cover_calls_and_content():
    """The streaming cases above are not vacuous: they hold calls, content and both."""
    answers = [split_answer(t, "hermes", TOOLS) for t in HERMES_TEXTS]
    answers += [split_answer(t, "llama3_json", TOOLS) for t in LLAMA_TEXTS]
    assert sum(len(calls) for _, calls in answers) == 9
    assert sum(content is not None for content, _ in answers) >= 8


def test_stream_holds_back_only_what_may_become_a_call():
    s = ToolStream("hermes", TOOLS)
    assert s.feed("Hello <tool_c") == [{"content": "Hello"}]
    assert s.feed('all>{"name": "get_time", "arguments": {}}') == []
    head, args = s.feed("</tool_call>")
    assert head["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert args == {"tool_calls": [{"index": 0, "function": {"arguments": "{}"}}]}
    # the space held back after "Hello" goes out once content follows the call
    assert s.feed(" and <b>bold</b>") == [{"content": "  and <b>bold</b>"}]
    llama = ToolStream("llama3_json", TOOLS)
    assert llama.feed("Plain") == [{"content": "Plain"}] and llama.feed(" text") == [
        {"content": " text"}
    ]
    held = ToolStream("llama3_json", TOOLS)
    assert held.feed("<|python") == [] and held.feed('_tag|>{"name": "get_time"') == []


def test_parallel_tool_calls_false_makes_only_the_first_call_streamed_or_not():
    text = (
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'
    )
    _, both = split_answer(text, "hermes", TOOLS, "auto")
    content, one = split_answer(text, "hermes", TOOLS, "auto", parallel=False)
    assert len(both) == 2 and [c["function"]["name"] for c in one] == ["get_weather"]
    assert content is None
    streamed = replay(ToolStream("hermes", TOOLS, "auto", parallel=False), [text[:50], text[50:]])
    assert streamed == (None, [("get_weather", one[0]["function"]["arguments"])])


def test_a_strict_function_s_invalid_call_stays_content_under_auto():
    strict = check_tools([{**WEATHER, "function": {**WEATHER["function"], "strict": True}}])
    good = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    bad = '<tool_call>{"name": "get_weather", "arguments": {"town": "Paris"}}</tool_call>'
    assert split_answer(good, "hermes", strict, "auto")[1]
    assert split_answer(bad, "hermes", strict, "auto") == (bad, [])
    assert split_answer(bad, "hermes", TOOLS, "auto")[1]  # not strict: the call is made


@pytest.mark.parametrize(
    "tool,param",
    [
        ({**WEATHER, "function": {**WEATHER["function"], "paramters": {}}}, "function.paramters"),
        ({**WEATHER, "extra": 1}, "extra"),
        ({**WEATHER, "function": {**WEATHER["function"], "strict": "yes"}}, "function.strict"),
    ],
)
def test_unknown_tool_keys_are_refused_not_dropped(tool, param):
    with pytest.raises(BadRequest) as e:
        check_tools([tool])
    assert e.value.param == f"tools.0.{param}"
