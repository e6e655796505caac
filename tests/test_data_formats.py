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


# --------------------------------------------------------------------------- reinforcement, kto

RFT = {
    "messages": [
        {"role": "developer", "content": "Answer with a number."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "Do you mean in base ten?"},
        {"role": "user", "content": "Yes."},
    ],
    "reference_answer": "4",
    "grading": {"tolerance": 0, "aliases": ["four"]},
}
KTO = {"prompt": "Capital of France?", "completion": "Paris", "label": True}


@pytest.mark.parametrize(
    "row, objective, fmt",
    [
        (RFT, "grpo", "reinforcement"),
        (RFT, "auto", "chat"),
        (CHAT, "grpo", "reinforcement"),  # chat rows are prompts for grpo: the answer is refused
        ({"prompt": "2+2?", "answer": "4"}, "grpo", "reinforcement"),
        ({"prompt": "2+2?", "answer": "4"}, "auto", None),
        ({"prompt": "2+2?", "completion": "4"}, "grpo", "prompt_completion"),
        ({"prompt": "2+2?", "chosen": "4", "rejected": "5"}, "grpo", "preference"),
        (KTO, "auto", "kto"),
        (KTO, "grpo", "kto"),
        ({**KTO, "label": "yes"}, "auto", "kto"),  # then refused for its label, not read as SFT
        ({"prompt": "2+2?", "completion": "4"}, "auto", "prompt_completion"),
    ],
)
def test_reinforcement_and_kto_detection(row, objective, fmt):
    assert detect(row, objective) == fmt


def test_openai_rft_rows_become_prompts_with_the_other_keys_as_item():
    ex = to_example({**RFT, "tools": None, "note": None}, "reinforcement")
    assert ex.kind == "prompt" and ex.prompt_field == "messages"
    # developer is OpenAI's newer name for the system prompt; earlier answers are context
    assert [m["role"] for m in ex.prompt] == ["system", "user", "assistant", "user"]
    assert ex.prompt[-1] == {"role": "user", "content": "Yes."}
    assert ex.item == {"reference_answer": "4", "grading": {"tolerance": 0, "aliases": ["four"]}}
    assert ex.messages is None and ex.completion is None and ex.label is None


@pytest.mark.parametrize(
    "row, prompt, item",
    [
        ({"prompt": "2+2?", "solution": 4}, [{"role": "user", "content": "2+2?"}], {"solution": 4}),
        (
            {
                "prompt": [
                    {"role": "system", "content": "Be brief."},
                    {"role": "user", "content": "Hi"},
                ]
            },
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
            {},
        ),
    ],
)
def test_trl_prompt_only_rows(row, prompt, item):
    ex = to_example(row, "reinforcement")
    assert (ex.kind, ex.prompt, ex.item, ex.prompt_field) == ("prompt", prompt, item, "prompt")


def _rft(*roles: str, **keys) -> dict:
    return {"messages": [{"role": r, "content": f"{r} says"} for r in roles], **keys}


@pytest.mark.parametrize(
    "row, kind, field",
    [
        (_rft("user", "assistant"), "not_user_last", "messages[1].role"),
        (
            _rft("system", "user", "assistant", "user", "assistant"),
            "not_user_last",
            "messages[4].role",
        ),
        (_rft("developer"), "not_user_last", "messages[0].role"),
        (
            {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            "not_user_last",
            "prompt[1].role",
        ),
        (_rft(), "empty_content", "messages"),
        ({"prompt": "  "}, "empty_content", "prompt"),
        ({"prompt": []}, "empty_content", "prompt"),
        ({"reference_answer": "4"}, "missing_key", "messages"),
        (_rft("user", tools=[{"type": "function"}]), "unsupported", "tools"),
        (_rft("tool", "user"), "unknown_role", "messages[0].role"),
        (
            {"messages": [{"role": "user", "content": "q", "name": "ann"}]},
            "unsupported",
            "messages[0].name",
        ),
        ({"messages": [{"role": "user", "content": 4}]}, "wrong_type", "messages[0].content"),
    ],
)
def test_reinforcement_errors_name_the_field(row, kind, field):
    with pytest.raises(RowError) as e:
        to_example(row, "reinforcement")
    assert (e.value.kind, e.value.field) == (kind, field)
    if kind == "not_user_last":
        assert "ends with a user turn" in e.value.reason


def test_assistant_last_reason_says_where_the_answer_goes():
    with pytest.raises(RowError) as e:
        to_example(_rft("user", "assistant"), "reinforcement")
    assert "'messages[1].role' is assistant" in e.value.reason
    assert "reference_answer" in e.value.reason


@pytest.mark.parametrize(
    "row, prompt, completion",
    [
        (KTO, [{"role": "user", "content": "Capital of France?"}], "Paris"),
        (
            {
                "prompt": [
                    {"role": "system", "content": "Geo."},
                    {"role": "user", "content": "Peru?"},
                ],
                "completion": [{"role": "assistant", "content": "Lima"}],
                "label": False,
            },
            [{"role": "system", "content": "Geo."}, {"role": "user", "content": "Peru?"}],
            "Lima",
        ),
    ],
)
def test_kto_rows_become_unpaired(row, prompt, completion):
    ex = to_example(row, "kto")
    assert (ex.kind, ex.prompt, ex.completion, ex.label) == (
        "unpaired",
        prompt,
        completion,
        row["label"],
    )


@pytest.mark.parametrize(
    "changes, kind, field",
    [
        ({"label": 1}, "wrong_type", "label"),
        ({"label": "true"}, "wrong_type", "label"),
        ({"label": None}, "missing_key", "label"),
        ({"completion": ""}, "empty_content", "completion"),
        ({"completion": [{"role": "user", "content": "x"}]}, "no_assistant", "completion"),
        (
            {
                "completion": [
                    {"role": "assistant", "content": "a"},
                    {"role": "assistant", "content": "b"},
                ]
            },
            "unsupported",
            "completion",
        ),
        ({"prompt": [{"role": "developer", "content": "x"}]}, "unknown_role", "prompt[0].role"),
    ],
)
def test_kto_errors_name_the_field(changes, kind, field):
    with pytest.raises(RowError) as e:
        to_example({**KTO, **changes}, "kto")
    assert (e.value.kind, e.value.field) == (kind, field)


def _clean(rows: list, objective: str, fmt: str = "auto") -> list[dict]:
    f = sources.InputFile("k.jsonl", "k.jsonl", "file", 0, "")
    batch = pa.table({"bytes": [_jsonl(rows)], "path": ["k.jsonl"]})
    raw = sources.split_files(batch, {"k.jsonl": f}, fmt, objective=objective)
    return stages.validate_clean(raw, True, ["email", "phone"], 32, 3, True).to_pylist()


def test_prompt_rows_scrub_the_item_like_the_prompt_and_keep_references_apart():
    mail = "Write to jane.doe@example.com\u200b or +1 415 555 0132."
    row = {
        "messages": [{"role": "user", "content": mail}],
        "reference_answer": "jane.doe@example.com",
        "contacts": [{"phone": "+1 415 555 0132", "ok": True}],
    }
    out = _clean([row, {**row, "reference_answer": "no address"}, row, _rft("user")], "grpo")
    assert {r["format"] for r in out} == {"reinforcement"}
    first = out[0]
    assert first["kind"] == "prompt" and first["error_kind"] is None
    assert json.loads(first["prompt"]) == [
        {"role": "user", "content": "Write to <EMAIL> or <PHONE>."}
    ]
    assert json.loads(first["item"]) == {
        "reference_answer": "<EMAIL>",
        "contacts": [{"phone": "<PHONE>", "ok": True}],
    }
    assert (first["pii_email"], first["pii_phone"]) == (2, 2)
    # one prompt with two references: two examples; the same row twice: one content id
    assert out[1]["id"] != first["id"] and out[2]["id"] == first["id"]
    assert json.loads(out[3]["item"]) == {}
    assert first["completion"] is None and first["label"] is None and first["messages"] == ""


def test_unpaired_rows_keep_opposite_labels_apart():
    rows = [KTO, {**KTO, "label": False}, KTO, {**KTO, "completion": "Paris, mail a@b.com"}]
    out = _clean(rows, "auto")
    assert {r["format"] for r in out} == {"kto"} and {r["kind"] for r in out} == {"unpaired"}
    assert [r["label"] for r in out] == [True, False, True, True]
    assert out[0]["id"] != out[1]["id"] and out[0]["id"] == out[2]["id"]
    assert out[3]["completion"] == "Paris, mail <EMAIL>" and out[3]["pii_email"] == 1
    assert json.loads(out[0]["prompt"]) == [{"role": "user", "content": "Capital of France?"}]
    assert out[0]["item"] is None
