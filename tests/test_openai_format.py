"""OpenAI's training-file formats (chat, tools, preference): every key is honoured or reported.

`weight` 0 leaves an answer out of the labels, a bad weight is a row error naming the field,
and what the chat template cannot render (`name`, `parallel_tool_calls`: false) or rayft
cannot train with (legacy `functions`, `refusal`, tools in preference rows) is a row error too,
reported like every other bad row. docs/contracts.md has the table of keys.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer

from rayft import models
from rayft.config import JobConfig
from rayft.data import dedupe, prepare, sources, stages, tokens
from rayft.data.formats import RowError, to_example
from rayft.data.tokens import IGNORE

DEMO = Path(__file__).parent.parent / "examples" / "data" / "support.jsonl"
SYSTEM = {"role": "system", "content": "You are Acme's support triage assistant."}


def _weighed_chat(weight=0, where: int = 2) -> dict:
    """A chat whose first answer ("Let me check.") carries `weight` (None: no key)."""
    messages = [
        SYSTEM,
        {"role": "user", "content": "Where is order A123456?"},
        {"role": "assistant", "content": "Let me check."},
        {"role": "user", "content": "Thanks, go ahead."},
        {"role": "assistant", "content": "Order A123456 ships on Friday."},
    ]
    if weight is not None:
        messages[where] = {**messages[where], "weight": weight}
    return {"messages": messages}


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2-135m-instruct"])
def tok(request):
    return AutoTokenizer.from_pretrained(models.resolve(request.param))


def _labels(tok, row: dict, assistant_only: bool = True) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of a raw chat row, validated as the pipeline validates it."""
    messages = to_example(row, "chat").messages
    rendered = tokens.render_sft(tok, {"messages": messages, "text": ""}, assistant_only)
    ((_, ids, labels),) = tokens.encode_sft(tok, [rendered])
    return ids, labels


def _runs(labels: list[int]) -> list[tuple[int, int]]:
    """[start, end) of each run of learned tokens."""
    runs, start = [], None
    for i, lab in enumerate([*labels, IGNORE]):
        if lab != IGNORE and start is None:
            start = i
        elif lab == IGNORE and start is not None:
            runs.append((start, i))
            start = None
    return runs


# --------------------------------------------------------------------------- weight


def test_weight_0_masks_exactly_the_tokens_of_that_answer(tok):
    ids, full = _labels(tok, _weighed_chat(weight=None))
    first, second = _runs(full)  # both answers learned without a weight
    assert "Let me check." in tok.decode(ids[slice(*first)])
    assert "Let me check." not in tok.decode(ids[slice(*second)])

    weighed_ids, weighed = _labels(tok, _weighed_chat(weight=0))
    assert weighed_ids == ids  # the weight is not rendered: the same text, the same tokens
    # exactly the first answer's tokens (its end-of-turn included) are masked, nothing else
    expected = [IGNORE if first[0] <= i < first[1] else lab for i, lab in enumerate(full)]
    assert weighed == expected
    assert _runs(weighed) == [second]
    # weight 1 is the default
    assert _labels(tok, _weighed_chat(weight=1)) == (ids, full)


def test_weight_0_is_masked_without_assistant_only_loss_too(tok):
    ids, learned = _labels(tok, _weighed_chat(weight=None))
    first = _runs(learned)[0]
    ids, labels = _labels(tok, _weighed_chat(weight=0), assistant_only=False)
    # every token is learned but the weight-0 answer's
    assert labels == [IGNORE if first[0] <= i < first[1] else t for i, t in enumerate(ids)]


@pytest.mark.parametrize("weight", [2, "1", True, 1.0, -1, 0.5, [1]])
def test_a_weight_other_than_0_or_1_is_a_row_error_naming_the_field(weight):
    with pytest.raises(RowError) as e:
        to_example(_weighed_chat(weight=weight, where=4), "chat")
    assert (e.value.kind, e.value.field) == ("bad_weight", "messages[4].weight")
    assert "messages[4].weight" in e.value.reason and json.dumps(weight) in e.value.reason


@pytest.mark.parametrize("where", [0, 1, 3])
def test_weight_on_a_message_that_is_not_an_answer_is_a_row_error(where):
    # as in OpenAI's format: only assistant messages carry a weight (only answers are learned)
    for weight in (0, 1):
        with pytest.raises(RowError) as e:
            to_example(_weighed_chat(weight=weight, where=where), "chat")
        assert (e.value.kind, e.value.field) == ("bad_weight", f"messages[{where}].weight")
        assert "only assistant messages" in e.value.reason


def test_weight_null_counts_as_absent_and_all_zero_weights_teach_nothing():
    # Parquet gives every message every key: null is no weight (the answer is learned)
    nulls = {"messages": [{**m, "weight": None} for m in _weighed_chat(None)["messages"]]}
    assert to_example(nulls, "chat").messages == _weighed_chat(None)["messages"]
    row = _weighed_chat(weight=0)
    row["messages"][4]["weight"] = 0
    with pytest.raises(RowError) as e:
        to_example(row, "chat")
    assert (e.value.kind, e.value.field) == ("no_assistant", "messages")


def test_a_weighed_answer_is_another_example_for_dedupe():
    def content_id(weight) -> str:
        parts = stages.content_parts(to_example(_weighed_chat(weight=weight), "chat"))
        return dedupe.content_id(dedupe.exact_key(parts))

    # weight 1 is the default: the same example as no weight; weight 0 is another one
    assert content_id(None) == content_id(1) != content_id(0)


# --------------------------------------------------------------------------- name

# ChatML that writes a message's name after its role, as some multi-speaker templates do.
NAMED_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}"
    "{% if m.get('name') %} ({{ m['name'] }}){% endif %}{{ '\\n' }}{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _named(where: int = 1, name: str = "alice") -> dict:
    row = _weighed_chat(weight=None)
    row["messages"][where] = {**row["messages"][where], "name": name}
    return row


@pytest.mark.parametrize("where", [1, 2])
def test_a_name_the_template_does_not_render_is_a_row_error(tok, where):
    # tiny-llama's and SmolLM2's ChatML drop `name` without a word: the row is reported
    for assistant_only in (True, False):
        with pytest.raises(RowError) as e:
            _labels(tok, _named(where), assistant_only)
        assert (e.value.kind, e.value.field) == ("template_error", f"messages[{where}].name")
        assert "does not render a message's name" in e.value.reason and "'alice'" in e.value.reason


def test_a_name_that_is_in_the_text_by_chance_is_still_reported(tok):
    # "user" is in every rendering; taking the name out must change the text
    with pytest.raises(RowError) as e:
        _labels(tok, _named(1, name="user"))
    assert e.value.field == "messages[1].name"


def test_a_template_that_renders_names_keeps_them_and_learns_the_answers():
    tok = AutoTokenizer.from_pretrained(models.resolve("tiny-llama"))
    tok.chat_template = NAMED_TEMPLATE
    ids, labels = _labels(tok, _named(1))
    text = tok.decode(ids)
    assert "<|im_start|>user (alice)\nWhere is order" in text
    trained = tok.decode([t for t, lab in zip(ids, labels, strict=True) if lab != IGNORE])
    assert "Let me check." in trained and "ships on Friday" in trained and "alice" not in trained


def test_name_must_be_a_non_empty_string():
    for name in ("", 7):
        with pytest.raises(RowError) as e:
            to_example(_named(1, name=name), "chat")
        assert (e.value.kind, e.value.field) == ("wrong_type", "messages[1].name")


# --------------------------------------------------------------------------- tools keys


def _call(i: int) -> dict:
    return {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": "get_order", "arguments": json.dumps({"order_id": f"A{i}"})},
    }


def _tools_chat(calls: int = 1, **row) -> dict:
    messages = [
        {"role": "user", "content": "Where are my orders?"},
        {"role": "assistant", "content": None, "tool_calls": [_call(i) for i in range(calls)]},
        *[
            {"role": "tool", "tool_call_id": f"call_{i}", "content": '{"status": "late"}'}
            for i in range(calls)
        ],
        {"role": "assistant", "content": "They are late."},
    ]
    tools = [{"type": "function", "function": {"name": "get_order", "parameters": {}}}]
    return {"messages": messages, "tools": tools, **row}


# Renders tools and calls (Qwen 2.5-like) and, when the row turns them off, says so.
PARALLEL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}"
    "{% if parallel_tool_calls is defined and not parallel_tool_calls %}\nOne call at a time."
    "{% endif %}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TOOL_TEMPLATE = PARALLEL_TEMPLATE.replace(
    "{% if parallel_tool_calls is defined and not parallel_tool_calls %}\nOne call at a time."
    "{% endif %}",
    "",
)


def _tool_tokenizer(template: str):
    tok = AutoTokenizer.from_pretrained(models.resolve("tiny-llama"))
    tok.chat_template = template
    return tok


def _render(tok, row: dict) -> str:
    ex = to_example(row, "chat")
    given = {"messages": ex.messages, "text": "", "tools": ex.tools}
    if ex.parallel_tool_calls is False:
        given["parallel_tool_calls"] = False
    text, _ = tokens.render_sft(tok, given, True)
    return text


def test_parallel_tool_calls_false_must_be_rendered():
    row = _tools_chat(parallel_tool_calls=False)
    assert "One call at a time." in _render(_tool_tokenizer(PARALLEL_TEMPLATE), row)
    with pytest.raises(RowError) as e:
        _render(_tool_tokenizer(TOOL_TEMPLATE), row)
    assert (e.value.kind, e.value.field) == ("template_error", "parallel_tool_calls")
    # true is what every template does anyway: nothing to render
    plain = _render(_tool_tokenizer(TOOL_TEMPLATE), _tools_chat())
    assert _render(_tool_tokenizer(TOOL_TEMPLATE), _tools_chat(parallel_tool_calls=True)) == plain


@pytest.mark.parametrize(
    "row, kind, field",
    [
        (_tools_chat(parallel_tool_calls="no"), "wrong_type", "parallel_tool_calls"),
        (
            _tools_chat(calls=2, parallel_tool_calls=False),
            "conflicting_keys",
            "messages[1].tool_calls",
        ),
        (_tools_chat(functions=[{"name": "get_order"}]), "unsupported", "functions"),
        (
            {
                "messages": [
                    {"role": "user", "content": "Where is A1?"},
                    {"role": "assistant", "content": None, "function_call": _call(1)["function"]},
                    {"role": "function", "name": "get_order", "content": "late"},
                    {"role": "assistant", "content": "Late."},
                ]
            },
            "unsupported",
            "messages[1].function_call",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Where is A1?"},
                    {"role": "function", "name": "get_order", "content": "late"},
                    {"role": "assistant", "content": "Late."},
                ]
            },
            "unknown_role",
            "messages[1].role",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Insult me."},
                    {"role": "assistant", "content": None, "refusal": "I will not."},
                ]
            },
            "unsupported",
            "messages[1].refusal",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi", "tool_calls": [_call(1)]},
                    {"role": "assistant", "content": "Hello"},
                ]
            },
            "unsupported",
            "messages[0].tool_calls",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": "Hi"},
                    {"role": "assistant", "content": "Hello", "tool_call_id": "call_1"},
                ]
            },
            "unsupported",
            "messages[1].tool_call_id",
        ),
    ],
)
def test_tools_format_keys_are_validated_or_reported(row, kind, field):
    with pytest.raises(RowError) as e:
        to_example(row, "chat")
    assert (e.value.kind, e.value.field) == (kind, field)
    assert field in e.value.reason or kind in ("wrong_type", "unknown_role", "conflicting_keys")


def test_the_legacy_function_role_says_what_to_write_instead():
    row = {
        "messages": [
            {"role": "user", "content": "Where is A1?"},
            {"role": "function", "name": "get_order", "content": "late"},
            {"role": "assistant", "content": "Late."},
        ]
    }
    with pytest.raises(RowError) as e:
        to_example(row, "chat")
    assert "legacy function calling" in e.value.reason and "'tool'" in e.value.reason


# --------------------------------------------------------------------------- preference


def _openai_pref(**changes) -> dict:
    """OpenAI's own preference example: input {messages, tools: [], parallel_tool_calls}."""
    row = {
        "input": {
            "messages": [{"role": "user", "content": "How cold is San Francisco today?"}],
            "tools": [],
            "parallel_tool_calls": True,
        },
        "preferred_output": [{"role": "assistant", "content": "A high near 68F, low 57F."}],
        "non_preferred_output": [{"role": "assistant", "content": "Not cold."}],
    }
    for path, value in changes.items():
        *keys, last = path.split(".")
        target = row
        for k in keys:
            target = target[int(k)] if k.isdigit() else target[k]
        target[last] = value
    return row


def test_openai_preference_example_is_accepted():
    ex = to_example(_openai_pref(), "preference")
    assert ex.prompt == [{"role": "user", "content": "How cold is San Francisco today?"}]
    assert (ex.chosen, ex.rejected) == ("A high near 68F, low 57F.", "Not cold.")
    assert to_example(_openai_pref(**{"input.parallel_tool_calls": False}), "preference") == ex


@pytest.mark.parametrize(
    "changes, kind, field",
    [
        ({"input.tools": [{"type": "function"}]}, "unsupported", "input.tools"),
        ({"input.functions": [{"name": "f"}]}, "unsupported", "input.functions"),
        ({"input.parallel_tool_calls": "yes"}, "wrong_type", "input.parallel_tool_calls"),
        ({"input.messages.0.name": "alice"}, "unsupported", "input.messages[0].name"),
        ({"input.messages.0.weight": 1}, "bad_weight", "input.messages[0].weight"),
        ({"preferred_output.0.weight": 0}, "bad_weight", "preferred_output[0].weight"),
        ({"preferred_output.0.name": "bot"}, "unsupported", "preferred_output[0].name"),
        (
            {"non_preferred_output.0.tool_calls": [_call(1)]},
            "unsupported",
            "non_preferred_output[0].tool_calls",
        ),
        (
            {"preferred_output.0.refusal": "No."},
            "unsupported",
            "preferred_output[0].refusal",
        ),
        (
            {
                "preferred_output": [
                    {"role": "assistant", "content": "Let me look."},
                    {"role": "assistant", "content": "A high near 68F."},
                ]
            },
            "unsupported",
            "preferred_output",
        ),
    ],
)
def test_preference_keys_rayft_cannot_train_with_are_reported(changes, kind, field):
    with pytest.raises(RowError) as e:
        to_example(_openai_pref(**changes), "preference")
    assert (e.value.kind, e.value.field) == (kind, field)


# --------------------------------------------------------------------------- Parquet nulls


def test_parquet_rows_with_every_key_null_where_unset_are_accepted():
    # Arrow gives every message of a column every key: a user turn's weight, name,
    # tool_calls and tool_call_id come back null, which is "not set"
    rows = [
        {
            "messages": [
                {"role": "user", "content": "Hi", "name": "ann", "weight": None},
                {"role": "assistant", "content": "Hello", "name": None, "weight": 0},
                {"role": "user", "content": "Bye", "name": None, "weight": None},
                {"role": "assistant", "content": "Bye!", "name": None, "weight": None},
            ]
        }
    ]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    f = sources.InputFile("c.parquet", "c.parquet", "file", 0, "")
    raw = sources.split_files(
        pa.table({"bytes": [buf.getvalue()], "path": ["c.parquet"]}), {"c.parquet": f}, "auto"
    )
    (row,) = stages.validate_clean(raw, True, [], 32, 3, False).to_pylist()
    assert row["error_kind"] is None, row["reason"]
    assert json.loads(row["messages"]) == [
        {"role": "user", "content": "Hi", "name": "ann"},
        {"role": "assistant", "content": "Hello", "weight": 0},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "Bye!"},
    ]


# --------------------------------------------------------------------------- prepare


def test_prepare_masks_weight_0_and_writes_every_reported_key_to_the_rejects(
    tmp_path, tiny_model, ray_local
):
    good = DEMO.read_text().splitlines()[:8]
    lines = [
        *good,
        json.dumps(_weighed_chat(weight=0)),  # 9: kept, its first answer masked
        json.dumps(_weighed_chat(weight=2)),  # 10
        json.dumps(_weighed_chat(weight="1")),  # 11
        json.dumps(_weighed_chat(weight=True, where=4)),  # 12
        json.dumps(_named(1)),  # 13: the template drops names
        json.dumps(_named(2, name="support-bot")),  # 14
        json.dumps(_tools_chat(functions=[{"name": "get_order"}])),  # 15
    ]
    src = tmp_path / "openai.jsonl"
    src.write_text("\n".join(lines) + "\n")
    cfg = JobConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"base": tiny_model},
            "data": {"train_files": [str(src)], "max_seq_len": 256, "on_error": "skip"},
        }
    )
    rep = prepare(cfg).report  # check_accounting runs inside
    assert rep["rows_in"] == 15
    assert rep["rejected"] == {"bad_weight": 3, "template_error": 2, "unsupported": 1}
    assert rep["duplicates_removed"] == {"exact": 0, "near": 0}
    assert rep["overlength"]["dropped"] == 0
    assert sum(rep["rows_out"].values()) == 15 - 6 == 9
    assert rep["rows_in"] == sum(rep["rows_out"].values()) + sum(rep["rejected"].values())

    data = Path(cfg.run_dir) / "data"
    rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"], r["field"]) for r in rejects] == [
        (10, "bad_weight", "messages[2].weight"),
        (11, "bad_weight", "messages[2].weight"),
        (12, "bad_weight", "messages[4].weight"),
        (13, "template_error", "messages[1].name"),
        (14, "template_error", "messages[2].name"),
        (15, "unsupported", "functions"),
    ]
    assert all(r["file"] == str(src) for r in rejects)
    assert "got 2" in rejects[0]["reason"] and 'got "1"' in rejects[1]["reason"]
    assert "got true" in rejects[2]["reason"]
    assert rejects[0]["row"] == lines[9]  # the input line as read
    assert json.loads(rejects[3]["row"])["messages"][1]["name"] == "alice"

    kept = pd.concat(
        [pd.read_parquet(data / f"{s}.parquet") for s in ("train", "validation", "test")]
    )
    row = kept[kept["source"] == f"{src}:9"].iloc[0]
    assert json.loads(row["messages"])[2] == {
        "role": "assistant",
        "content": "Let me check.",
        "weight": 0,
    }
    tok = AutoTokenizer.from_pretrained(tiny_model)
    trained = tok.decode([t for t in row["labels"] if t != IGNORE])
    assert "ships on Friday" in trained and "Let me check." not in trained
