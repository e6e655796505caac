"""`rayft prepare` end to end on a real local Ray: outputs, accounting, fail mode, s3:// input."""

from __future__ import annotations

import json
import shutil
import socket
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from transformers import AutoTokenizer

from rayft.cli import main as cli_main
from rayft.config import JobConfig
from rayft.data import DataValidationError, pipeline, prepare, split
from rayft.manifest import read_manifest

DEMO = Path(__file__).parent.parent / "examples" / "data" / "support.jsonl"
LONG = (
    "My blender from order A123456 arrived with a cracked jug and the lid does not close, "
    "I have tried to use it twice and it leaks all over the counter every single time so "
    "I would like a replacement sent to my home address as soon as possible please"
)
NEAR = LONG.replace("My blender", "Our blender")  # filler only: Jaccard 0.93 with the answer


def _chat(user: str, answer: str) -> dict:
    return {
        "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    }


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    return path


def _read(path: Path) -> pd.DataFrame:
    return pd.read_parquet(path)


def _config(tmp_path: Path, tiny_model: str, files: list[str] | None = None, **data) -> JobConfig:
    if files is not None:
        data["train_files"] = files
    return JobConfig.model_validate(
        {
            "run_dir": str(tmp_path / "run"),
            "model": {"base": tiny_model},
            "data": {"max_seq_len": 256, "on_error": "skip", **data},
        }
    )


@pytest.mark.slow
def test_prepare_multi_file_skip_mode(tmp_path, tiny_model, ray_local):
    demo = DEMO.read_text().splitlines()[:60]
    a = _write_jsonl(
        tmp_path / "a.jsonl",
        [
            *demo[:30],
            _chat("Reach me at jane.doe@example.com or +1 415 555 0132.", "We will call you."),
            "{broken json",
            _chat(LONG, "We will send a replacement."),
            {"messages": [{"role": "user", "content": "No answer here"}]},
        ],
    )
    b = _write_jsonl(
        tmp_path / "b.jsonl",
        [
            *demo[30:],
            demo[3],  # exact duplicate of a row in a.jsonl
            _chat(NEAR, "We will send a replacement."),  # near dup
            _chat("Tell me a long story. " * 5, "Once upon a time " * 80),  # over 256 tokens
        ],
    )
    pq.write_table(
        pa.Table.from_pylist(
            [
                {
                    "conversations": [
                        {"from": "human", "value": f"Is item {i} in stock?"},
                        {"from": "gpt", "value": f"Item {i} ships in {i + 2} days."},
                    ]
                }
                for i in range(10)
            ]
        ),
        tmp_path / "c.parquet",
    )
    cfg = _config(tmp_path, tiny_model, [str(tmp_path / "*.jsonl"), str(tmp_path / "c.parquet")])
    art = prepare(cfg)
    data = Path(cfg.run_dir) / "data"
    rep = json.loads((data / "data_report.json").read_text())
    assert rep == art.report
    assert rep["rows_in"] == 34 + 33 + 10
    assert rep["rejected"] == {"bad_json": 1, "no_assistant": 1}
    assert rep["duplicates_removed"] == {"exact": 1, "near": 1}
    assert rep["overlength"] == {"dropped": 1, "truncated": 0}
    assert rep["pii_redactions"]["email"] == 1 and rep["pii_redactions"]["phone"] == 1
    assert rep["formats"] == {
        str(a): "chat",
        str(b): "chat",
        str(tmp_path / "c.parquet"): "sharegpt",
    }
    assert rep["kind"] == "sft"
    assert sum(rep["rows_out"].values()) == 77 - 2 - 2 - 1

    splits = {s: _read(data / f"{s}.parquet") for s in ("train", "validation", "test")}
    for s, df in splits.items():
        assert list(df.columns) == [
            "id",
            "source",
            "kind",
            "messages",
            "text",
            "input_ids",
            "labels",
            "num_tokens",
        ]
        assert len(df) == rep["rows_out"][s] and df["num_tokens"].sum() == rep["tokens"][s]
        assert (df["num_tokens"] <= 256).all()
        assert all(
            len(i) == len(lab) == n
            for i, lab, n in zip(df.input_ids, df.labels, df.num_tokens, strict=True)
        )
    assert len(splits["train"]) > len(splits["validation"]) > 0 and len(splits["test"]) > 0
    ids = [set(df["id"]) for df in splits.values()]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])  # nothing crosses splits
    everything = pd.concat(splits.values())
    assert everything["id"].is_unique and everything["source"].is_unique
    # the kept copies are the first occurrences; PII is replaced by placeholders in the outputs
    sources = set(everything["source"])
    assert f"{a}:4" in sources and f"{b}:31" not in sources and f"{a}:33" in sources
    pii_row = everything[everything["source"] == f"{a}:31"].iloc[0]
    assert "<EMAIL>" in pii_row["messages"] and "<PHONE>" in pii_row["messages"]
    assert "jane.doe" not in everything["text"].str.cat()
    assert json.loads(pii_row["messages"])[1] == {
        "role": "assistant",
        "content": "We will call you.",
    }

    rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["kind"]) for r in rejects] == [
        (str(a), 32, "bad_json"),
        (str(a), 34, "no_assistant"),
    ]
    assert rejects[1]["field"] == "messages" and rejects[0]["row"] == "{broken json"

    packed = {s: _read(data / "packed" / f"{s}.parquet") for s in ("train", "validation")}
    for s, df in packed.items():
        assert sum(len(x) for x in df.input_ids) == rep["tokens"][s]
        for ids_, pos, lens in zip(df.input_ids, df.position_ids, df.seq_lengths, strict=True):
            assert len(ids_) <= 256 and sum(lens) == len(ids_)
            assert list(pos) == [p for n in lens for p in range(n)]
    real = rep["tokens"]["train"] + rep["tokens"]["validation"]
    assert rep["packing_efficiency"] == pytest.approx(
        real / ((len(packed["train"]) + len(packed["validation"])) * 256), abs=1e-4
    )
    stage = read_manifest(cfg.run_dir)["stages"]["prepare"]
    assert stage["data_hash"] and stage["report"]["rows_in"] == 77


def test_fail_mode_writes_no_split(tmp_path, tiny_model, ray_local, capsys):
    rows = DEMO.read_text().splitlines()[:8]
    rows[2] = '{"messages": [{"role": "user", "content": "x"}, {"role": "bot", "content": "y"}]}'
    rows[5] = "not json at all"
    src = _write_jsonl(tmp_path / "bad.jsonl", rows)
    job = tmp_path / "job.yaml"
    job.write_text(
        yaml.safe_dump(
            {
                "run_dir": str(tmp_path / "run"),
                "model": {"base": tiny_model},
                "data": {"train_files": [str(src)]},
            }
        )
    )
    assert cli_main(["prepare", str(job)]) == 2
    err = capsys.readouterr().err
    assert f"{src}:3 messages[1].role" in err and f"{src}:6 (row)" in err
    assert "unknown_role=1" in err and "bad_json=1" in err
    data = tmp_path / "run" / "data"
    assert not any((data / f"{s}.parquet").exists() for s in ("train", "validation", "test"))
    assert not (data / "packed").exists() and not (data / "data_report.json").exists()
    assert len((data / "rejects.jsonl").read_text().splitlines()) == 2


def test_demo_bad_rows_fail_with_every_line_named(tmp_path, tiny_model, ray_local):
    bad = DEMO.parent / "support_bad.jsonl"
    cfg = _config(tmp_path, tiny_model, [str(bad)], on_error="fail")
    with pytest.raises(DataValidationError, match="7 bad rows") as e:
        prepare(cfg)
    assert f"{bad}:3 (row): not valid JSON" in str(e.value)
    rejects = [
        json.loads(x)
        for x in (Path(cfg.run_dir) / "data/rejects.jsonl").read_text().split("\n")
        if x
    ]
    assert [(r["line"], r["kind"]) for r in rejects] == [
        (3, "bad_json"),
        (6, "not_object"),
        (9, "missing_key"),
        (12, "no_assistant"),
        (15, "unknown_role"),
        (18, "empty_content"),
        (21, "wrong_type"),
    ]
    assert not (Path(cfg.run_dir) / "data/train.parquet").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def s3_bucket(monkeypatch):
    """A moto S3 server on localhost; s3fs talks to it through fsspec's config."""
    import boto3
    import fsspec.config
    import s3fs
    from moto.server import ThreadedMotoServer

    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    opts = {
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{port}", "region_name": "us-east-1"},
    }
    monkeypatch.setitem(fsspec.config.conf, "s3", opts)
    s3fs.S3FileSystem.clear_instance_cache()
    boto3.client(
        "s3", aws_access_key_id="testing", aws_secret_access_key="testing", **opts["client_kwargs"]
    ).create_bucket(Bucket="rayft-test")
    yield s3fs.S3FileSystem(**opts)
    s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


@pytest.mark.slow
def test_prepare_reads_s3_uris_preference_rows(tmp_path, tiny_model, ray_local, s3_bucket):
    def pref(i: int) -> dict:
        return {
            "input": {
                "messages": [
                    {"role": "user", "content": f"Which plan fits team {i} of {i + 3} people?"}
                ]
            },
            "preferred_output": [
                {"role": "assistant", "content": f"The Team plan covers {i + 3} seats."}
            ],
            "non_preferred_output": [{"role": "assistant", "content": "No idea."}],
        }

    for name, rows in (("train/a", range(12)), ("train/b", range(12, 24)), ("held", range(24, 30))):
        s3_bucket.pipe(
            f"rayft-test/{name}.jsonl", "".join(json.dumps(pref(i)) + "\n" for i in rows).encode()
        )
    cfg = _config(
        tmp_path,
        tiny_model,
        ["s3://rayft-test/train/*.jsonl"],
        test_files=["s3://rayft-test/held.jsonl"],
    )
    art = prepare(cfg)
    rep = art.report
    assert rep["kind"] == "preference"
    assert rep["formats"] == {
        f"s3://rayft-test/{n}.jsonl": "preference" for n in ("train/a", "train/b", "held")
    }
    assert (
        rep["rows_out"]["test"] == 6
        and rep["rows_out"]["train"] + rep["rows_out"]["validation"] == 24
    )
    test = _read(art.splits["test"])
    assert set(test["source"]) == {f"s3://rayft-test/held.jsonl:{i}" for i in range(1, 7)}
    train = _read(art.splits["train"])
    assert list(train.columns) == [
        "id",
        "source",
        "kind",
        "prompt",
        "chosen",
        "rejected",
        "num_tokens",
    ]
    row = train.iloc[0]
    assert json.loads(row["prompt"])[0]["role"] == "user" and row["rejected"] == "No idea."
    assert all(s.startswith("s3://rayft-test/") for s in train["source"])
    assert not (art.data_dir / "packed").exists()


def test_prepare_formats_held_out_files_truncation_and_stable_splits(
    tmp_path, tiny_model, ray_local, capsys
):
    # test.jsonl is matched by the train glob too, and the glob is listed twice; its first
    # line starts with the BOM Windows editors write. Alpaca, prompt/completion and text files
    # sit beside it, an explicit validation file outside, and one text row is over length.
    d = tmp_path / "d"
    d.mkdir()
    demo = DEMO.read_text().splitlines()
    train = _write_jsonl(d / "train.jsonl", demo[:20])
    test = d / "test.jsonl"
    test.write_bytes(b"\xef\xbb\xbf" + "\n".join(demo[20:26]).encode() + b"\n")
    alpaca = _write_jsonl(
        d / "alpaca.jsonl",
        [
            {"instruction": "Triage this ticket.", "input": "My kettle leaks.", "output": "RET-7"},
            {"instruction": "Name the capital of Peru.", "output": "Lima is the capital."},
        ],
    )
    completions = _write_jsonl(
        d / "completions.jsonl",
        [
            {"prompt": "Translate 'winter' to German:", "completion": "Winter, masculine."},
            {"prompt": "How many legs has a spider?", "completion": "Eight legs in total."},
        ],
    )
    notes = _write_jsonl(
        d / "notes.jsonl",
        [
            {"text": "Refunds reach the card within five working days of approval."},
            {"text": "Warehouse B closes early on public holidays in Bavaria."},
            {"text": "Long note: " + " ".join(f"item{i}" for i in range(400))},
        ],
    )
    held = _write_jsonl(tmp_path / "held.jsonl", demo[26:30])
    files = {
        "train_files": [f"{d}/*.jsonl", f"{d}/*.jsonl"],
        "test_files": [str(test)],
        "validation_files": [str(held)],
    }
    cfg = _config(tmp_path, tiny_model, pack=False, overlength="truncate", **files)
    rep = prepare(cfg).report
    assert rep["rows_in"] == 20 + 6 + 2 + 2 + 3 + 4 and rep["rejected"] == {}
    assert rep["duplicates_removed"] == {"exact": 0, "near": 0}
    assert rep["formats"][str(alpaca)] == "alpaca" and rep["formats"][str(notes)] == "text"
    assert rep["formats"][str(completions)] == "prompt_completion"
    assert rep["rows_out"] == {"train": 27, "validation": 4, "test": 6}  # held-out files only
    assert rep["overlength"] == {"dropped": 0, "truncated": 1}
    data = Path(cfg.run_dir) / "data"
    splits = {s: _read(data / f"{s}.parquet") for s in ("train", "validation", "test")}
    assert set(splits["test"]["source"]) == {f"{test}:{i}" for i in range(1, 7)}
    assert set(splits["validation"]["source"]) == {f"{held}:{i}" for i in range(1, 5)}
    trained = splits["train"]
    assert {f"{train}:{i}" for i in range(1, 21)} <= set(trained["source"])
    tok = AutoTokenizer.from_pretrained(tiny_model)
    by_source = trained.set_index("source")

    def learned(source: str) -> str:
        row = by_source.loc[source]
        return tok.decode([t for t in row["labels"] if t != -100])

    # alpaca and prompt/completion rows learn the answer only; text rows learn everything
    assert "RET-7" in learned(f"{alpaca}:1") and "kettle" not in learned(f"{alpaca}:1")
    assert "Eight legs" in learned(f"{completions}:2") and "spider" not in learned(
        f"{completions}:2"
    )
    assert learned(f"{notes}:1").startswith("Refunds reach the card")
    long = by_source.loc[f"{notes}:3"]
    assert long["num_tokens"] == len(long["input_ids"]) == 256
    out = " ".join(capsys.readouterr().out.split())  # rich wraps long lines
    assert "test.jsonl matches data.train_files but is listed in data.test_files" in out

    # The same rows listed in another order land in the same splits (content, not position)
    again = {**files, "train_files": [str(notes), str(alpaca), str(completions), str(train)]}
    cfg2 = _config(tmp_path / "again", tiny_model, pack=False, overlength="truncate", **again)
    prepare(cfg2)
    for s in ("train", "validation", "test"):
        first = splits[s].set_index("id")["source"].to_dict()
        second = _read(Path(cfg2.run_dir) / "data" / f"{s}.parquet")
        assert second.set_index("id")["source"].to_dict() == first


def test_hash_split_ignores_file_order_and_blocks(tmp_path, tiny_model, ray_local):
    # No held-out files: every split comes from the hash of the content. The same rows in
    # the other file order and in 16-row blocks must land in the same splits, each row where
    # split.assign puts its content id.
    demo = DEMO.read_text().splitlines()
    a = _write_jsonl(tmp_path / "a.jsonl", demo[:60])
    b = _write_jsonl(tmp_path / "b.jsonl", demo[60:120])
    fractions = {"validation": 0.2, "test": 0.2, "seed": 3}
    runs = []
    for files, batch in (([a, b], 1024), ([b, a], 16)):
        cfg = _config(
            tmp_path / f"run-{batch}",
            tiny_model,
            [str(f) for f in files],
            pack=False,
            batch_size=batch,
            split=fractions,
        )
        prepare(cfg)
        data = Path(cfg.run_dir) / "data"
        runs.append({s: _read(data / f"{s}.parquet") for s in ("train", "validation", "test")})
    for name, frame in runs[0].items():
        assert len(frame) >= 10, name  # every split has rows: the checks below can fail
        assert {split.assign(i, 0.2, 0.2, 3) for i in frame["id"]} == {name}
        assert set(runs[1][name]["id"]) == set(frame["id"])
        assert set(runs[1][name]["source"]) == set(frame["source"])
    assert sum(len(f) for f in runs[0].values()) == 120


def test_train_copies_of_held_out_rows_are_the_duplicates_removed(
    tmp_path, tiny_model, ray_local, capsys
):
    # A test-file row copied into a train file (spacing changed) and one copied with its last
    # word changed (Jaccard 0.93) are duplicates of the held-out rows: the train copies go,
    # whatever the file order, and the test split keeps its rows.
    answer = '{"category": "returns", "priority": "high", "reply": "We will replace it."}'
    exact = _chat("Where is my parcel with order A555123? It is late by nine days.", "Soon.")
    held = _write_jsonl(tmp_path / "test.jsonl", [exact, _chat(LONG, answer)])
    copies = [
        _chat("Where is my parcel  with order A555123?\nIt is late by nine days.", "Soon."),
        _chat(LONG.replace("My blender", "Our blender"), answer),
    ]
    demo = DEMO.read_text().splitlines()[:30]
    train = _write_jsonl(tmp_path / "train.jsonl", [*copies[:1], *demo, *copies[1:]])
    cfg = _config(tmp_path, tiny_model, [str(train)], test_files=[str(held)], pack=False)
    rep = prepare(cfg).report
    assert rep["duplicates_removed"] == {"exact": 1, "near": 1}
    assert rep["rows_out"]["test"] == 2 and rep["rows_in"] == 34
    data = Path(cfg.run_dir) / "data"
    assert set(_read(data / "test.parquet")["source"]) == {f"{held}:1", f"{held}:2"}
    kept = set(_read(data / "train.parquet")["source"]) | set(
        _read(data / "validation.parquet")["source"]
    )
    assert kept == {f"{train}:{i}" for i in range(2, 32)}
    # each phase of the driver says what it did
    out = " ".join(capsys.readouterr().out.split())
    assert "[rayft prepare] read, validated, cleaned and tokenized 34 rows (0 rejected)" in out
    assert "[rayft prepare] dedupe: 1 exact and 1 near duplicates among 34 valid rows" in out
    assert f"[rayft prepare] wrote train {rep['rows_out']['train']} rows" in out


def _refusing_model(tiny_model: str, dest: Path) -> str:
    """tiny-llama with a template that refuses a system turn after the first, as the Llama 2
    and Mistral templates refuse roles out of order."""
    shutil.copytree(tiny_model, dest)
    (dest / "chat_template.jinja").write_text(
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('System message must come first') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    )
    return str(dest)


def test_template_refusals_are_rejects_and_first_turn_answers_train(
    tmp_path, tiny_model, ray_local, monkeypatch
):
    # outputs this small are written and packed by the driver; here they take the Ray Data
    # write and the per-block packing that larger ones take
    monkeypatch.setattr(pipeline, "DRIVER_TOKENS", 0)
    system = {"role": "system", "content": "You are Acme's support triage assistant."}
    greeting = {"role": "assistant", "content": "Hi, Acme support here. How can I help?"}
    lines = DEMO.read_text().splitlines()[:10] + [
        json.dumps({"messages": [greeting, *_chat("Where is A123456?", "It ships.")["messages"]]}),
        json.dumps({"messages": [system, greeting]}),
        json.dumps({"messages": [*_chat("Hi", "Hello")["messages"], system, greeting]}),
    ]
    src = tmp_path / "rows.jsonl"
    src.write_bytes("\n".join(lines).encode() + b"\n" + '{"text": "caf\xe9"}\n'.encode("latin-1"))
    model = _refusing_model(tiny_model, tmp_path / "model")
    cfg = _config(tmp_path, model, [str(src)])
    rep = prepare(cfg).report  # check_accounting runs inside
    assert rep["rows_in"] == 14
    assert rep["rejected"] == {"template_error": 1, "bad_encoding": 1}
    assert sum(rep["rows_out"].values()) == 12 and rep["overlength"]["dropped"] == 0
    data = Path(cfg.run_dir) / "data"
    rejects = [json.loads(x) for x in (data / "rejects.jsonl").read_text().splitlines()]
    assert [(r["file"], r["line"], r["kind"], r["field"]) for r in rejects] == [
        (str(src), 13, "template_error", "messages"),
        (str(src), 14, "bad_encoding", "(row)"),
    ]
    assert "System message must come first" in rejects[0]["reason"]
    assert json.loads(rejects[0]["row"])["messages"][2] == system
    everything = pd.concat([_read(data / f"{s}.parquet") for s in ("train", "validation", "test")])
    assert f"{src}:13" not in set(everything["source"])
    packed = pd.concat([_read(data / "packed" / f"{s}.parquet") for s in ("train", "validation")])
    assert (
        sum(len(x) for x in packed.input_ids)
        == rep["tokens"]["train"] + rep["tokens"]["validation"]
    )
    tok = AutoTokenizer.from_pretrained(model)
    for line in (11, 12):  # the greeting is learned, the system prompt is not
        row = everything[everything["source"] == f"{src}:{line}"].iloc[0]
        trained = tok.decode([t for t in row["labels"] if t != -100])
        assert "How can I help?" in trained and "triage" not in trained

    # on_error: fail stops at the template's refusal too (found only when tokenizing, after
    # the rows that fail validation have been reported), before any split is written
    src = _write_jsonl(tmp_path / "refused.jsonl", lines)
    cfg = _config(tmp_path, model, [str(src)], on_error="fail")
    with pytest.raises(DataValidationError, match="1 bad rows") as e:
        prepare(cfg)
    assert f"{src}:13 messages: the chat template" in str(e.value)
    assert "template_error=1" in str(e.value)
    assert not (data / "train.parquet").exists() and not (data / "data_report.json").exists()
    assert len((data / "rejects.jsonl").read_text().splitlines()) == 1
