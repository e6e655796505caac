"""`rayft prepare` of the row kinds that stay text for TRL's online and unpaired trainers, end to
end on a real local Ray: `prompt` rows (OpenAI's reinforcement fine-tuning format, for GRPO)
and `unpaired` rows (TRL's KTO format)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_data_pipeline import _config, _read, _refusing_model, _write_jsonl
from transformers import AutoTokenizer

from rayft.data import DataValidationError, prepare
from rayft.data.stages import Tokenize

SPLITS = ("train", "validation", "test")
PROMPT_COLUMNS = {
    "id": pa.string(),
    "source": pa.string(),
    "kind": pa.string(),
    "prompt": pa.string(),
    "item": pa.string(),
    "num_tokens": pa.int32(),
}
UNPAIRED_COLUMNS = {
    "id": pa.string(),
    "source": pa.string(),
    "kind": pa.string(),
    "prompt": pa.string(),
    "completion": pa.string(),
    "label": pa.bool_(),
    "num_tokens": pa.int32(),
}
SYSTEM = {"role": "developer", "content": "Answer with the number only."}


def _rft(question: str, answer: str, **keys) -> dict:
    return {
        "messages": [SYSTEM, {"role": "user", "content": question}],
        "reference_answer": answer,
        **keys,
    }


def _rft_rows() -> list:
    """OpenAI's RFT rows: 12 prompts, one asked twice with another reference, one copied, one
    over 256 tokens, and three bad rows (lines 16, 17 and 18)."""
    rows: list = [_rft(f"How many legs do {n} spiders have?", str(8 * n)) for n in range(1, 10)]
    rows[0] = _rft(
        "Mail the count to jane.doe@example.com: how many legs do 1 spiders have?",
        "8 (sent to jane.doe@example.com)",
        meta={"notify": ["jane.doe@example.com"], "difficulty": 1},
    )
    multi_turn = {
        "messages": [
            {"role": "user", "content": "I have 3 cats."},
            {"role": "assistant", "content": "Noted: 3 cats."},
            {"role": "user", "content": "How many paws in total?"},
        ],
        "reference_answer": "12",
    }
    rows += [
        multi_turn,  # line 10: context before the last user turn
        _rft("How many legs do 2 spiders have?", "sixteen"),  # 11: another reference
        rows[2],  # 12: an exact copy of line 3
        _rft("Count the words: " + "word " * 300, "300"),  # 13: over max_seq_len
        _rft("How many wheels do 4 bicycles have?", "8"),
        _rft("How many sides do 3 triangles have?", "9"),
        {  # 16: the answer in the prompt
            "messages": [
                {"role": "user", "content": "How many legs does a bird have?"},
                {"role": "assistant", "content": "2"},
            ],
            "reference_answer": "2",
        },
        {"messages": [], "reference_answer": "0"},  # 17: empty prompt
        '{"messages": [{"role": "user", "content": "unterminated',  # 18: not JSON
    ]
    return rows


def _splits(data: Path) -> dict[str, pa.Table]:
    return {s: pq.read_table(data / f"{s}.parquet") for s in SPLITS}


def _prompt_tokens(tok, prompt: list[dict]) -> int:
    text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return len(tok(text, add_special_tokens=False)["input_ids"])


def _check_rft_output(cfg, src: Path, tiny_model: str) -> dict[str, pa.Table]:
    data = Path(cfg.run_dir) / "data"
    rep = json.loads((data / "data_report.json").read_text())
    assert rep["kind"] == "prompt" and rep["formats"] == {str(src): "reinforcement"}
    assert rep["rows_in"] == 18
    assert rep["rejected"] == {"not_user_last": 1, "empty_content": 1, "bad_json": 1}
    assert rep["duplicates_removed"] == {"exact": 1, "near": 0}
    assert rep["overlength"] == {"dropped": 1, "truncated": 0}
    assert sum(rep["rows_out"].values()) == 18 - 3 - 1 - 1
    assert rep["pii_redactions"]["email"] == 3  # once in the prompt, twice in the item

    splits = _splits(data)
    for name, table in splits.items():  # empty splits too: the contract's columns, typed
        assert dict(zip(table.schema.names, table.schema.types, strict=True)) == PROMPT_COLUMNS
        assert table.num_rows == rep["rows_out"][name]
        assert sum(table["num_tokens"].to_pylist()) == rep["tokens"][name]
    assert not (data / "packed").exists()
    rows = {r["source"]: r for t in splits.values() for r in t.to_pylist()}
    assert set(rows) == {f"{src}:{i}" for i in range(1, 16) if i not in (12, 13)}
    assert {r["kind"] for r in rows.values()} == {"prompt"}

    first = rows[f"{src}:1"]
    prompt, item = json.loads(first["prompt"]), json.loads(first["item"])
    # developer is the system prompt for open models' templates; the last turn is the user's
    assert prompt == [
        {"role": "system", "content": "Answer with the number only."},
        {"role": "user", "content": "Mail the count to <EMAIL>: how many legs do 1 spiders have?"},
    ]
    # the grader's reference is scrubbed as the prompt is: the same placeholder in both
    assert item == {
        "reference_answer": "8 (sent to <EMAIL>)",
        "meta": {"notify": ["<EMAIL>"], "difficulty": 1},
    }
    assert not any("jane.doe" in r["prompt"] + r["item"] for r in rows.values())
    assert json.loads(rows[f"{src}:4"]["item"]) == {"reference_answer": "32"}
    assert [m["role"] for m in json.loads(rows[f"{src}:10"]["prompt"])] == [
        "user",
        "assistant",
        "user",
    ]
    # one prompt with two references: two examples
    assert rows[f"{src}:2"]["prompt"] == rows[f"{src}:11"]["prompt"]
    assert rows[f"{src}:2"]["id"] != rows[f"{src}:11"]["id"]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for r in rows.values():
        assert r["num_tokens"] == _prompt_tokens(tok, json.loads(r["prompt"])) <= 256

    rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["kind"], r["field"]) for r in rejects] == [
        (str(src), 16, "not_user_last", "messages[1].role"),
        (str(src), 17, "empty_content", "messages"),
        (str(src), 18, "bad_json", "(row)"),
    ]
    assert "ends with a user turn" in rejects[0]["reason"]
    assert json.loads(rejects[0]["row"])["reference_answer"] == "2"
    return splits


@pytest.mark.slow
def test_openai_rft_file_prepares_prompt_rows(tmp_path, tiny_model, ray_local, capsys):
    src = _write_jsonl(tmp_path / "rft.jsonl", _rft_rows())
    cfg = _config(tmp_path / "a", tiny_model, [str(src)], format="reinforcement")
    prepare(cfg)  # check_accounting runs inside
    explicit = _check_rft_output(cfg, src, tiny_model)
    assert f"{src}: format reinforcement (configured)" in " ".join(capsys.readouterr().out.split())

    # The same file under data.format: auto is read as reinforcement prompts for a grpo job
    cfg = _config(tmp_path / "b", tiny_model, [str(src)])
    cfg.training.objective = "grpo"
    prepare(cfg)
    detected = _check_rft_output(cfg, src, tiny_model)
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert f"{src}: format reinforcement (detected, as training.objective is grpo)" in out
    for name in SPLITS:
        assert detected[name].equals(explicit[name])


@pytest.mark.slow
def test_kto_file_prepares_unpaired_rows(tmp_path, tiny_model, ray_local):
    rows: list = [
        {"prompt": f"Is {n} even?", "completion": "Yes." if n % 2 == 0 else "No.", "label": True}
        for n in range(1, 9)
    ]
    rows += [
        {"prompt": "Is 9 even?", "completion": "Yes.", "label": False},
        {"prompt": "Is 9 even?", "completion": "Yes.", "label": True},  # 10: the conflict, kept
        {  # 11: messages, an address in the completion
            "prompt": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "Where do I send the form?"},
            ],
            "completion": [{"role": "assistant", "content": "To forms@example.com."}],
            "label": False,
        },
        {"prompt": "Is 10 even?", "completion": "Yes.", "label": "yes"},  # 12: not a boolean
        {"prompt": "Is 11 even?", "completion": "No."},  # 13: no label
    ]
    src = _write_jsonl(tmp_path / "kto.jsonl", rows)
    cfg = _config(tmp_path, tiny_model, [str(src)])
    rep = prepare(cfg).report
    assert rep["kind"] == "unpaired" and rep["formats"] == {str(src): "kto"}
    assert rep["rows_in"] == 13 and rep["rejected"] == {"wrong_type": 1, "missing_key": 1}
    assert rep["duplicates_removed"] == {"exact": 0, "near": 0}
    assert sum(rep["rows_out"].values()) == 11 and rep["pii_redactions"]["email"] == 1

    data = Path(cfg.run_dir) / "data"
    splits = _splits(data)
    for name, table in splits.items():
        assert dict(zip(table.schema.names, table.schema.types, strict=True)) == UNPAIRED_COLUMNS
        assert table.num_rows == rep["rows_out"][name]
    assert not (data / "packed").exists()
    out = {r["source"]: r for t in splits.values() for r in t.to_pylist()}
    assert {s: r["label"] for s, r in out.items()} == {
        f"{src}:{i}": row["label"] for i, row in enumerate(rows[:11], 1)
    }
    assert {r["kind"] for r in out.values()} == {"unpaired"}
    assert out[f"{src}:9"]["id"] != out[f"{src}:10"]["id"]
    form = out[f"{src}:11"]
    assert form["completion"] == "To <EMAIL>." and json.loads(form["prompt"])[0] == {
        "role": "system",
        "content": "Answer briefly.",
    }
    assert json.loads(out[f"{src}:1"]["prompt"]) == [{"role": "user", "content": "Is 1 even?"}]
    tok = AutoTokenizer.from_pretrained(tiny_model)
    for r in out.values():  # the prompt with the generation prompt, the answer, its end of turn
        answer = len(tok(r["completion"], add_special_tokens=False)["input_ids"])
        assert r["num_tokens"] == _prompt_tokens(tok, json.loads(r["prompt"])) + answer + 1

    rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
    assert [(r["line"], r["kind"], r["field"]) for r in rejects] == [
        (12, "wrong_type", "label"),
        (13, "missing_key", "label"),
    ]
    assert "true" in rejects[0]["reason"] and '"yes"' in rejects[0]["reason"]

    # a KTO file beside a chat file: one run trains one objective
    chat = _write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {
                "messages": [
                    {"role": "user", "content": "Is 12 even?"},
                    {"role": "assistant", "content": "Yes."},
                ]
            }
        ],
    )
    with pytest.raises(DataValidationError, match="mix kinds of rows"):
        prepare(_config(tmp_path / "mixed", tiny_model, [str(src), str(chat)]))
    assert list(_read(data / "train.parquet").columns) == list(UNPAIRED_COLUMNS)  # and pandas


def test_text_rows_over_length_and_refused_by_the_template(tiny_model, tmp_path):
    model = _refusing_model(tiny_model, tmp_path / "model")  # a system turn must come first
    user, system = {"role": "user", "content": "Hi"}, {"role": "system", "content": "Be kind."}
    rows = [
        {"kind": "prompt", "prompt": json.dumps([user]), "item": "{}", "completion": None},
        {"kind": "prompt", "prompt": json.dumps([{**user, "content": "Hi " * 80}]), "item": "{}",
         "completion": None},
        {"kind": "unpaired", "prompt": json.dumps([user]), "completion": "Hello " * 80,
         "label": True},
        {"kind": "prompt", "prompt": json.dumps([user, system, user]), "item": '{"a": 1}',
         "completion": None},
    ]  # fmt: skip
    tok = AutoTokenizer.from_pretrained(model)
    for overlength, status in (("truncate", "truncated"), ("drop", "dropped")):
        out = Tokenize(model, True, 64, overlength).text(rows)
        assert [r.get("overlength") for r in out] == ["", status, status, None]
        # the policy writes the answer: the prompt ends with the template's generation prompt
        text = "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
        assert out[0]["num_tokens"] == len(tok(text, add_special_tokens=False)["input_ids"])
        refused = out[3]
        assert (refused["error_kind"], refused["error_field"]) == ("template_error", "prompt")
        assert json.loads(refused["raw"])["item"] == '{"a": 1}'
