"""Formats, auto-detection and validation errors of `rayft prepare` (no Ray: the batch
functions the pipeline maps are plain functions of pyarrow tables)."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rayft.data import sources, stages
from rayft.data.formats import RowError, detect, to_example


def _run(name: str, data: bytes, fmt: str = "auto") -> list[dict]:
    """Split one file and validate/clean its rows as the pipeline does."""
    f = sources.InputFile(name, name, "file", 0, "")
    raw = sources.split_files(pa.table({"bytes": [data], "path": [name]}), {name: f}, fmt)
    out = stages.validate_clean(raw, True, ["email"], 32, 3, True)
    return out.to_pylist()


def _jsonl(rows: list) -> bytes:
    return "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows).encode() + b"\n"


CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize(
    "row, fmt, messages",
    [
        (CHAT, "chat", CHAT["messages"]),
        (
            {"instruction": "Add", "input": "2 and 3", "output": "5"},
            "alpaca",
            [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}],
        ),
        (
            {"instruction": "Say hi", "input": "", "output": "hi"},
            "alpaca",
            [{"role": "user", "content": "Say hi"}, {"role": "assistant", "content": "hi"}],
        ),
        (
            {
                "conversations": [
                    {"from": "system", "value": "Be brief."},
                    {"from": "human", "value": "Hi"},
                    {"from": "gpt", "value": "Hello"},
                ]
            },
            "sharegpt",
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
            ],
        ),
        (
            {"prompt": "2+2=", "completion": "4"},
            "prompt_completion",
            [{"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"}],
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                    {"role": "assistant", "content": "Yo"},
                ]
            },
            "chat",
            [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
        ),
    ],
)
def test_sft_formats_convert_to_messages(row, fmt, messages):
    assert detect(row) == fmt
    ex = to_example(row, fmt)
    assert ex.kind == "sft" and ex.messages == messages


def test_plain_text_format():
    assert detect({"text": "Once upon a time"}) == "text"
    ex = to_example({"text": "Once upon a time"}, "text")
    assert ex.kind == "sft" and ex.text == "Once upon a time" and ex.messages is None


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Rome"},
        {
            "prompt": [{"role": "user", "content": "Capital of France?"}],
            "chosen": [{"role": "assistant", "content": "Paris"}],
            "rejected": [{"role": "assistant", "content": "Rome"}],
        },
        {
            "input": {"messages": [{"role": "user", "content": "Capital of France?"}]},
            "preferred_output": [{"role": "assistant", "content": "Paris"}],
            "non_preferred_output": [{"role": "assistant", "content": "Rome"}],
        },
    ],
)
def test_preference_formats(row):
    assert detect(row) == "preference"
    ex = to_example(row, "preference")
    assert ex.kind == "preference"
    assert ex.prompt == [{"role": "user", "content": "Capital of France?"}]
    assert (ex.chosen, ex.rejected) == ("Paris", "Rome")


def test_auto_detects_per_file_json_array_and_parquet(tmp_path):
    rows = [{"instruction": f"Task {i}", "output": f"Answer {i}"} for i in range(3)]
    out = _run("a.json", json.dumps(rows).encode())
    assert [r["format"] for r in out] == ["alpaca"] * 3
    assert [r["line"] for r in out] == [1, 2, 3]  # item numbers in a JSON array
    pq.write_table(
        pa.Table.from_pylist([{"text": "hello world"}, {"text": "bye"}]), tmp_path / "t.parquet"
    )
    out = _run("t.parquet", (tmp_path / "t.parquet").read_bytes())
    assert [(r["format"], r["line"], r["text"]) for r in out] == [
        ("text", 1, "hello world"),
        ("text", 2, "bye"),
    ]


def test_detection_ignores_bad_leading_lines():
    out = _run("c.jsonl", _jsonl(["{oops", CHAT, CHAT]))
    assert {r["format"] for r in out} == {"chat"}
    assert [r["error_kind"] for r in out] == ["bad_json", None, None]


BAD = [
    ("{not json", "bad_json", "(row)"),
    ("[1, 2]", "not_object", "(row)"),
    ({"messages": "hello"}, "wrong_type", "messages"),
    (
        {"messages": [{"role": "user", "content": "a"}, {"content": "b"}]},
        "missing_key",
        "messages[1].role",
    ),
    (
        {"messages": [{"role": "user"}, {"role": "assistant", "content": "b"}]},
        "missing_key",
        "messages[0].content",
    ),
    (
        {"messages": [{"role": "robot", "content": "a"}, {"role": "assistant", "content": "b"}]},
        "unknown_role",
        "messages[0].role",
    ),
    (
        {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "b"}]},
        "wrong_type",
        "messages[0].content",
    ),
    (
        {"messages": [{"role": "user", "content": " \t "}, {"role": "assistant", "content": "b"}]},
        "empty_content",
        "messages[0].content",
    ),
    (
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
        "empty_content",
        "messages[1].content",
    ),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_assistant", "messages"),
    ({"messages": []}, "empty_content", "messages"),
]


def test_every_validation_error_kind_names_line_and_field():
    lines = []
    for bad, _, _ in BAD:
        lines += [CHAT, bad]  # a good row before each bad one: bad rows sit on even lines
    out = _run("bad.jsonl", _jsonl(lines), fmt="chat")
    assert len(out) == 2 * len(BAD)
    rejected = [r for r in out if r["error_kind"]]
    assert [(r["line"], r["error_kind"], r["error_field"]) for r in rejected] == [
        (2 * (i + 1), kind, field) for i, (_, kind, field) in enumerate(BAD)
    ]
    assert all(r["raw"] and r["reason"] for r in rejected)
    assert all(r["id"] and r["kind"] == "sft" for r in out if not r["error_kind"])


def test_missing_keys_per_format():
    with pytest.raises(RowError) as e:
        to_example({"instruction": "x"}, "alpaca")
    assert (e.value.kind, e.value.field) == ("missing_key", "output")
    with pytest.raises(RowError) as e:
        to_example({"prompt": "x", "chosen": "y"}, "preference")
    assert (e.value.kind, e.value.field) == ("missing_key", "rejected")
    with pytest.raises(RowError) as e:
        to_example({"conversations": [{"from": "alien", "value": "x"}]}, "sharegpt")
    assert (e.value.kind, e.value.field) == ("unknown_role", "conversations[0].from")
    out = _run("u.jsonl", _jsonl([{"foo": 1}]))
    assert out[0]["format"] == "unknown" and out[0]["error_kind"] == "unknown_format"


def test_broken_json_array_is_one_reject_at_the_parser_line():
    out = _run("broken.json", b'[{"text": "a"},\n {"text": "b",}\n]')
    assert len(out) == 1
    r = out[0]
    assert (r["line"], r["error_kind"], r["error_field"], r["format"]) == (
        2,
        "bad_json",
        "(file)",
        "unreadable",
    )
    assert "cannot read the file" in r["reason"]


def _tool_chat(**changes) -> dict:
    """A chat that calls a tool (OpenAI's shape): the call, its result, the answer."""
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_order", "arguments": '{"order_id": "A123456"}'},
    }
    messages = [
        {"role": "user", "content": "Where is order A123456? Call me on 555 123 4567."},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "shipped"}'},
        {"role": "assistant", "content": "It has shipped."},
    ]
    row = {"messages": messages, "tools": [{"type": "function", "function": {"name": "get_order"}}]}
    for path, value in changes.items():  # "1.tool_calls" -> messages[1]["tool_calls"]
        k, key = path.split(".", 1)
        if value is None:
            messages[int(k)].pop(key)
        else:
            messages[int(k)][key] = value
    return row


def test_tool_calls_and_tool_turns_are_accepted():
    ex = to_example(_tool_chat(), "chat")
    assert [m["role"] for m in ex.messages] == ["user", "assistant", "tool", "assistant"]
    assert ex.messages[1]["content"] == "" and ex.messages[1]["tool_calls"][0]["id"] == "call_1"
    assert ex.messages[2]["tool_call_id"] == "call_1" and ex.tools[0]["function"]["name"]
    # through validate/clean: tools carried along, the row counted as chat
    (row,) = _run("t.jsonl", _jsonl([_tool_chat()]))
    assert row["error_kind"] is None and row["kind"] == "sft"
    assert json.loads(row["tools"])[0]["function"]["name"] == "get_order"
    assert json.loads(row["messages"])[1]["tool_calls"][0]["function"]["name"] == "get_order"


@pytest.mark.parametrize(
    "changes, kind, field",
    [
        ({"2.content": ""}, "empty_content", "messages[2].content"),
        ({"2.content": None}, "missing_key", "messages[2].content"),
        ({"2.tool_call_id": None}, "missing_key", "messages[2].tool_call_id"),
        ({"1.tool_calls": None}, "missing_key", "messages[1].content"),  # no content, no calls
        ({"1.tool_calls": "get_order()"}, "wrong_type", "messages[1].tool_calls"),
        ({"1.tool_calls": []}, "wrong_type", "messages[1].tool_calls"),
        (
            {"1.tool_calls": [{"id": "c", "type": "code", "function": {}}]},
            "wrong_type",
            "messages[1].tool_calls[0].type",
        ),
        (
            {"1.tool_calls": [{"id": "c", "type": "function"}]},
            "missing_key",
            "messages[1].tool_calls[0].function",
        ),
        (
            {"1.tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}]},
            "missing_key",
            "messages[1].tool_calls[0].id",
        ),
        (
            {
                "1.tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": {}}}
                ]
            },
            "wrong_type",
            "messages[1].tool_calls[0].function.arguments",
        ),
        (
            {
                "1.tool_calls": [
                    {"id": "c", "type": "function", "function": {"name": "f", "arguments": "{x"}}
                ]
            },
            "wrong_type",
            "messages[1].tool_calls[0].function.arguments",
        ),
    ],
)
def test_tool_turns_are_validated(changes, kind, field):
    with pytest.raises(RowError) as e:
        to_example(_tool_chat(**changes), "chat")
    assert (e.value.kind, e.value.field) == (kind, field)


def test_tools_must_be_a_list_of_schemas_and_tool_turns_are_chat_only():
    with pytest.raises(RowError) as e:
        to_example({**_tool_chat(), "tools": "get_order"}, "chat")
    assert (e.value.kind, e.value.field) == ("wrong_type", "tools")
    convo = [{"from": "tool", "value": "x"}, {"from": "gpt", "value": "y"}]
    with pytest.raises(RowError) as e:
        to_example({"conversations": convo}, "sharegpt")
    assert e.value.kind == "unknown_role"
