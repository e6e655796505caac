"""Label masking from prefix renderings of the chat template, and packing boundaries."""

from __future__ import annotations

import json
import math
import random

import pyarrow as pa
import pytest
from transformers import AutoTokenizer

from rayft import models
from rayft.data import pack, tokens
from rayft.data.formats import RowError
from rayft.data.tokens import IGNORE

CONVO = [
    {"role": "system", "content": "You are Acme's support triage assistant."},
    {"role": "user", "content": "My order A123456 is late."},
    {"role": "assistant", "content": '{"category": "shipping"}'},
    {"role": "user", "content": "And the refund?"},
    {"role": "assistant", "content": "On its way."},
]


@pytest.fixture(scope="module", params=["tiny-llama", "smollm2-135m-instruct"])
def tok(request):
    return AutoTokenizer.from_pretrained(models.resolve(request.param))


def _tokenize(tok, rows: list[dict], assistant_only: bool) -> list[tuple[str, list, list]]:
    return tokens.encode_sft(tok, [tokens.render_sft(tok, r, assistant_only) for r in rows])


def _trained_text(tok, ids, labels) -> str:
    return tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE])


def test_only_assistant_turns_are_learned(tok):
    ((text, ids, labels),) = _tokenize(tok, [{"messages": CONVO, "text": ""}], True)
    assert text == tok.apply_chat_template(CONVO, tokenize=False)
    assert ids == tok(text, add_special_tokens=False)["input_ids"]
    trained = _trained_text(tok, ids, labels)
    # both answers and their end-of-turn token are learned; nothing of the prompt is
    assert '{"category": "shipping"}' in trained and "On its way." in trained
    assert trained.count("<|im_end|>") == 2
    for prompt_piece in ("support triage", "A123456", "refund", "user", "system"):
        assert prompt_piece not in trained
    assert labels[0] == IGNORE
    assert all(lab in (IGNORE, i) for i, lab in zip(ids, labels, strict=True))


def test_unmasked_and_plain_text(tok):
    ((_, ids, labels),) = _tokenize(tok, [{"messages": CONVO, "text": ""}], False)
    assert labels == ids
    ((text, ids, labels),) = _tokenize(tok, [{"messages": None, "text": "Hello sea."}], True)
    assert text == "Hello sea." + tok.eos_token and labels == ids and ids[-1] == tok.eos_token_id


def test_non_prefix_stable_template_is_refused(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    # a template that numbers turns from the end changes earlier text when a turn is added
    tok.chat_template = (
        "{% for m in messages %}{{ (messages|length - loop.index)|string + m['content'] }}"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}"
    )
    with pytest.raises(tokens.TemplateError, match="prefix-stable"):
        _tokenize(tok, [{"messages": CONVO, "text": ""}], True)


@pytest.mark.parametrize("system", [False, True])
def test_an_answer_in_the_first_turn_is_learned(tok, system):
    # A chat may open with the assistant (a greeting), alone or after the system prompt; the
    # prefix before the first answer used to be rendered as an empty conversation and crash.
    convo = [
        {"role": "assistant", "content": "Hi, I am Acme's assistant. How can I help?"},
        {"role": "user", "content": "Where is order A123456?"},
        {"role": "assistant", "content": "It ships tomorrow."},
    ]
    if system:
        convo.insert(0, {"role": "system", "content": "You are Acme's support triage assistant."})
    ((text, ids, labels),) = _tokenize(tok, [{"messages": convo, "text": ""}], True)
    assert text == tok.apply_chat_template(convo, tokenize=False)
    trained = _trained_text(tok, ids, labels)
    assert "How can I help?" in trained and "It ships tomorrow." in trained
    assert trained.count("<|im_end|>") == 2
    # neither the prompt nor what the template writes before the first answer (SmolLM2 adds
    # its default system prompt when there is none) is learned
    for prompt_piece in ("A123456", "support triage", "SmolLM", "system", "user"):
        assert prompt_piece not in trained


def test_a_conversation_the_template_refuses_is_a_row_error(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    # as Llama 2 / Mistral templates do for roles out of order
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('System message must come first') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    late_system = [CONVO[1], CONVO[0], CONVO[2]]
    for assistant_only in (True, False):
        with pytest.raises(RowError, match="System message must come first") as e:
            tokens.render_sft(tok, {"messages": late_system, "text": ""}, assistant_only)
        assert (e.value.kind, e.value.field) == ("template_error", "messages")
    with pytest.raises(RowError) as e:
        tokens.preference_tokens(tok, late_system[:2], "yes", "no")
    assert (e.value.kind, e.value.field) == ("template_error", "prompt")
    assert _tokenize(tok, [{"messages": CONVO, "text": ""}], True)[0][0].count("<|im_start|>") == 5


def _shaped(i: int, answer: str = "") -> list[dict]:
    """Conversations of one shape whose contents differ row by row."""
    return [
        {"role": "system", "content": f"You are assistant {i}."},
        {"role": "user", "content": f"Where is order A{i:06d}?"},
        {"role": "assistant", "content": answer or f'{{"order": "A{i:06d}", "late": {i % 2}}}'},
    ]


def _rendered_like_the_template(tok, convos: list[list[dict]]) -> None:
    """Each conversation's text is the template's own, and its answer spans are the ones the
    prefix renderings give."""
    for convo in convos:
        text, spans = tokens.render_chat(tok, convo)
        assert text == tok.apply_chat_template(convo, tokenize=False)
        assert spans == tokens._prefix_spans(tok, convo, text)


def test_a_verbatim_template_is_trusted_after_its_first_rows(tok):
    # SmolLM2's and tiny-llama's ChatML templates only write contents out: after VERIFY_FIRST
    # rows compared, rows of the shape are filled into the skeleton without a render
    convos = [_shaped(i) for i in range(tokens.VERIFY_FIRST + 1)]
    _rendered_like_the_template(tok, convos)
    roles = ("system", "user", "assistant")
    skeleton = tokens._SKELETONS[(tok.name_or_path, tok.chat_template, roles)]
    assert skeleton.verbatim and skeleton.trusted
    # contents a careless fill would get wrong: edges, quotes, newlines, braces, placeholders
    odd = ["  padded  ", 'say "hi"\n\nthen {{ x }}', "<|im_end|> inside", "\ue000 0 \ue001", "🙂"]
    _rendered_like_the_template(tok, [_shaped(7, a) for a in odd])


READING_TEMPLATES = {
    # Llama 3 style: contents trimmed
    "trim": "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] | trim + '<|im_end|>\\n' }}",
    # reasoning templates: a branch on what the content says
    "in": "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% if '<think>' in m['content'] %} (thought){% endif %}{{ '<|im_end|>\\n' }}",
    "length": "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] }}"
    "{% if m['content']|length > 40 %} (long){% endif %}{{ '<|im_end|>\\n' }}",
    "method": "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'].replace('late', 'LATE') }}"
    "{{ '<|im_end|>\\n' }}",
    "tojson": "{{ '<|im_start|>' + m['role'] + '\\n' }}{{ m['content'] | tojson }}{{ '<|im_end|>\\n' }}",
    # read in C, out of a probe's sight: refused by name
    "wordcount": "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>' }}"
    "{{ m['content'] | wordcount }}\\n",
}


@pytest.mark.parametrize("kind", sorted(READING_TEMPLATES))
def test_a_template_that_reads_contents_is_rendered_row_by_row(tiny_model, kind):
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}" + READING_TEMPLATES[kind] + "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    convos = [_shaped(i) for i in range(tokens.VERIFY_FIRST + 2)]
    # rows past the first ones whose contents take the template's other way
    convos += [
        _shaped(90, "  <think>late</think> yes  "),
        _shaped(91, "x" * 60),
        _shaped(92, 'one "two" three four five'),
    ]
    _rendered_like_the_template(tok, convos)
    skeleton = tokens._SKELETONS[
        (tok.name_or_path, tok.chat_template, ("system", "user", "assistant"))
    ]
    assert skeleton is None or not skeleton.verbatim


def test_a_template_that_only_tests_the_type_of_contents_is_verbatim(tiny_model):
    # `is string` (multimodal templates ask it) reads nothing of the text
    tok = AutoTokenizer.from_pretrained(tiny_model)
    tok.chat_template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' }}"
        "{% if m['content'] is string %}{{ m['content'] }}{% else %}[parts]{% endif %}"
        "{{ '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    _rendered_like_the_template(tok, [_shaped(i) for i in range(tokens.VERIFY_FIRST + 2)])
    skeleton = tokens._SKELETONS[
        (tok.name_or_path, tok.chat_template, ("system", "user", "assistant"))
    ]
    assert skeleton.verbatim and skeleton.trusted


def test_answer_labels_from_span_lookups_equal_those_from_every_offset(tok):
    rows = [_shaped(i) for i in range(20)]
    rows += [_shaped(5, a) for a in (" 🙂 emoji  ", "世界 \n\n  x", "ends with newline\n", "a")]
    rendered = [tokens.render_sft(tok, {"messages": r, "text": ""}, True) for r in rows]
    encodings = tok.backend_tokenizer.encode_batch(
        [t for t, _ in rendered], add_special_tokens=False
    )
    for (text, spans), enc in zip(rendered, encodings, strict=True):
        expected = tokens.mask_labels(enc.ids, enc.offsets, spans)
        assert tokens.span_labels(enc, enc.ids, spans, len(text)) == expected
        assert any(x != IGNORE for x in expected)


def test_packing_keeps_examples_whole_and_positions_restart():
    lengths = [7, 3, 5, 2, 9, 4, 1, 6]
    ids = [[100 * k + j for j in range(n)] for k, n in enumerate(lengths)]
    labels = [[IGNORE] + x[1:] for x in ids]
    packs = pack.pack(pa.table({"input_ids": ids, "labels": labels}), max_len=10).to_pylist()
    seen = []
    for p in packs:
        assert len(p["input_ids"]) == len(p["labels"]) == len(p["position_ids"]) <= 10
        assert sum(p["seq_lengths"]) == len(p["input_ids"])
        start = 0
        for n in p["seq_lengths"]:
            chunk = p["input_ids"][start : start + n]
            assert p["position_ids"][start : start + n] == list(range(n))
            k = chunk[0] // 100
            assert chunk == ids[k] and p["labels"][start : start + n] == labels[k]
            seen.append(k)
            start += n
    assert sorted(seen) == list(range(len(lengths)))
    assert len(packs) == 4  # 37 tokens need at least 4 bins of 10, and 4 it is
    assert pack.efficiency(37, len(packs), 10) == pytest.approx(0.925)


def test_packing_leaves_no_tail_bins_minimum_bin_slack_would():
    # Chat examples of a fifth of a bin, many of one length (the demo data's shape): minimum
    # bin slack fills early bins exactly and leaves two bins where the tokens need one.
    rng = random.Random(0)
    lengths = [90 if rng.random() < 0.4 else rng.randint(72, 104) for _ in range(120)]
    need = math.ceil(sum(lengths) / 512)
    assert len(pack._bins_by_slack(lengths, 512)) == need + 1
    bins = pack.plan(lengths, 512)
    assert len(bins) == need and bins == pack.plan(lengths, 512)  # and deterministic
    assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 512 for b in bins)


def test_packing_rejects_examples_longer_than_the_bin():
    with pytest.raises(ValueError, match="does not fit"):
        pack.plan([11], max_len=10)


def _tokenize_rows(model: str, overlength: str, max_len: int, answers: list[str]) -> list[dict]:
    import json

    from rayft.data.stages import Tokenize

    rows = [
        {
            "messages": json.dumps(
                [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
            ),
            "text": "",
        }
        for u, a in answers
    ]
    return Tokenize(model, True, max_len, overlength).sft(rows)


def test_overlength_drop_and_truncate(tiny_model):
    convos = [("Hi", "Short."), ("Hi", "A long answer " * 40), ("Tell me " * 60, "Late answer.")]
    dropped = _tokenize_rows(tiny_model, "drop", 64, convos)
    assert [r["overlength"] for r in dropped] == ["", "dropped", "dropped"]
    assert dropped[0]["num_tokens"] == len(dropped[0]["input_ids"]) <= 64
    cut = _tokenize_rows(tiny_model, "truncate", 64, convos)
    # the long answer is cut to 64 tokens; the long prompt leaves no answer token: dropped
    assert [r["overlength"] for r in cut] == ["", "truncated", "dropped"]
    assert cut[1]["num_tokens"] == len(cut[1]["input_ids"]) == len(cut[1]["labels"]) == 64
    assert any(x != IGNORE for x in cut[1]["labels"])


# A template that renders tool schemas and calls the way tool-capable ones do (Qwen 2.5-like).
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>"
    "{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tool_row() -> dict:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_order", "arguments": '{"order_id": "A123456"}'},
    }
    return {
        "messages": [
            {"role": "user", "content": "Where is order A123456?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"status": "delayed"}'},
            {"role": "assistant", "content": "It is delayed by a day."},
        ],
        "tools": [{"type": "function", "function": {"name": "get_order", "parameters": {}}}],
        "text": "",
    }


def test_tool_calls_are_learned_and_tool_results_are_not(tok):
    tok = AutoTokenizer.from_pretrained(tok.name_or_path)
    tok.chat_template = TOOL_TEMPLATE
    ((text, ids, labels),) = _tokenize(tok, [_tool_row()], True)
    assert "Tools: " in text and "get_order" in text
    trained = _trained_text(tok, ids, labels)
    assert '"name": "get_order"' in trained and "A123456" in trained  # the call
    assert "It is delayed by a day." in trained  # the answer
    assert 'delayed"}' not in trained and "Tools" not in trained  # the result, the schemas
    assert "Where is order" not in trained


def test_a_template_without_tools_rejects_tool_rows(tok):
    # SmolLM2's and tiny-llama's templates know no tools: they would render the call as an
    # empty turn and drop the schemas, so the row is a template error, not silent bad data
    for assistant_only in (True, False):
        with pytest.raises(RowError) as e:
            tokens.render_sft(tok, _tool_row(), assistant_only)
        assert e.value.kind == "template_error" and "does not render tools" in e.value.reason
        assert e.value.field == "messages[1].tool_calls"


def test_tool_rows_through_the_pipeline_stages(tiny_model):
    # validate/clean -> split + tokenize, as Ray Data maps them: the schemas travel in
    # their own column, and a template that cannot render them rejects the row, not the job
    import json

    from rayft.data import sources, stages

    row = _tool_row()
    row["messages"][1]["content"] = None  # as OpenAI writes it
    lines = [json.dumps({k: row[k] for k in ("messages", "tools")}), json.dumps({"text": "x"})]
    f = sources.InputFile("t.jsonl", "t.jsonl", "file", 0, "")
    data = ("\n".join(lines) + "\n").encode()
    raw = sources.split_files(
        pa.table({"bytes": [data], "path": ["t.jsonl"]}), {"t.jsonl": f}, "chat"
    )
    cleaned = stages.validate_clean(raw, True, ["email"], 32, 3, False)
    assert cleaned["error_kind"].to_pylist() == [None, "missing_key"]  # a text row in a chat file
    out, text_row = stages.tokenize(cleaned, tiny_model, True, 256, "drop", 0.0, 0.0, 0).to_pylist()
    assert (out["error_kind"], out["error_field"]) == ("template_error", "messages[1].tool_calls")
    assert json.loads(out["raw"])["tools"] == row["tools"] and out["source"] == "t.jsonl:1"
    assert text_row["error_kind"] == "missing_key" and text_row["input_ids"] is None


def test_the_data_workers_tokenizer_is_the_auto_tokenizer(tok, tmp_path):
    mine = tokens.load_tokenizer(tok.name_or_path)
    assert type(mine) is type(tok) and mine.is_fast
    assert mine.backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()
    assert mine.special_tokens_map == tok.special_tokens_map
    assert mine.apply_chat_template(CONVO, tokenize=False) == tok.apply_chat_template(
        CONVO, tokenize=False
    )
    # a tokenizer_config.json that names no class: the auto class decides
    tok.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("tokenizer_class", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    fallback = tokens.load_tokenizer(str(tmp_path))
    assert fallback.is_fast and fallback.encode("Hello sea.") == tok.encode("Hello sea.")
