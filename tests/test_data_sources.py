"""Input files: each read once and owned by one split, decoding (BOM, invalid UTF-8), and the
accounting check (no Ray: these are the plain functions the pipeline maps and calls)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest

from rayft.data import report, sources, stages
from rayft.errors import RayftError

CHAT = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


def _run(name: str, data: bytes) -> list[dict]:
    """Split one file and validate/clean its rows as the pipeline does."""
    f = sources.InputFile(name, name, "file", 0, "")
    raw = sources.split_files(pa.table({"bytes": [data], "path": [name]}), {name: f}, "auto")
    return stages.validate_clean(raw, True, [], 32, 3, True).to_pylist()


def test_a_utf8_bom_is_not_part_of_the_first_row():
    line = json.dumps(CHAT, ensure_ascii=False).encode()
    rows = _run("bom.jsonl", b"\xef\xbb\xbf" + line + b"\n" + line.replace(b"Hi", b"Hey") + b"\n")
    assert [(r["line"], r["error_kind"], r["format"]) for r in rows] == [
        (1, None, "chat"),
        (2, None, "chat"),
    ]
    assert json.loads(rows[0]["messages"]) == CHAT["messages"]
    # a JSON array, and files concatenated with `cat` (a BOM at the start of a later line)
    rows = _run("bom.json", b"\xef\xbb\xbf[" + line + b"]")
    assert [(r["line"], r["error_kind"]) for r in rows] == [(1, None)]
    rows = _run("cat.jsonl", b"\xef\xbb\xbf" + line + b"\n\xef\xbb\xbf" + line + b"\n")
    assert [r["error_kind"] for r in rows] == [None, None]


def test_a_line_that_is_not_utf8_is_a_bad_encoding_reject():
    good = json.dumps(CHAT).encode()
    latin1 = json.dumps({"text": "Caf\u00e9 au lait"}, ensure_ascii=False).encode("latin-1")
    rows = _run("mixed.jsonl", good + b"\n" + latin1 + b"\n" + good.replace(b"Hi", b"Yo") + b"\n")
    assert [(r["line"], r["error_kind"]) for r in rows] == [
        (1, None),
        (2, "bad_encoding"),
        (3, None),
    ]
    bad = rows[1]
    assert bad["error_field"] == "(row)" and "not valid UTF-8 (byte 0xe9" in bad["reason"]
    assert "\ufffd" not in bad["raw"] and "Caf\\xe9" in bad["raw"]  # the bytes, shown
    # a JSON array cannot be split into rows: one reject for the file, at the line of the byte
    rows = _run("array.json", b"[\n" + good + b",\n" + latin1 + b"\n]")
    assert [(r["line"], r["error_kind"]) for r in rows] == [(3, "bad_json")]
    assert "not valid UTF-8" in rows[0]["reason"]


def test_gzipped_files_are_read_as_the_text_they_hold(tmp_path):
    import gzip

    line = json.dumps(CHAT).encode()
    data = gzip.compress(line + b"\n\n" + b"{not json\n" + line.replace(b"Hi", b"Yo") + b"\n")
    rows = _run("rows.jsonl.gz", data)
    assert [(r["line"], r["error_kind"], r["format"]) for r in rows] == [
        (1, None, "chat"),
        (3, "bad_json", "chat"),
        (4, None, "chat"),
    ]
    rows = _run("rows.json.gz", gzip.compress(b"[" + line + b"]"))
    assert [(r["line"], r["error_kind"]) for r in rows] == [(1, None)]
    # a torn download: one reject for the file that says why, not a crashed job
    (row,) = _run("torn.jsonl.gz", data[: len(data) // 2])
    assert row["error_kind"] == "bad_json" and "cannot read the file" in row["reason"]
    # a directory lists its .gz files with the others
    d = tmp_path / "gz"
    d.mkdir()
    (d / "a.jsonl.gz").write_bytes(data)
    (d / "b.jsonl").write_bytes(line + b"\n")
    (d / "notes.txt.gz").write_bytes(data)
    assert [Path(f.path).name for f in sources.expand([str(d)], "")] == ["a.jsonl.gz", "b.jsonl"]


def _files(tmp_path: Path, *names: str) -> Path:
    d = tmp_path / "d"
    d.mkdir()
    for name in names:
        (d / name).write_text(json.dumps(CHAT) + "\n")
    return d


def test_each_file_is_read_once_and_a_held_out_file_leaves_the_train_globs(tmp_path):
    d = _files(tmp_path, "a.jsonl", "b.jsonl", "test.jsonl", "val.jsonl")
    files, notes = sources.assign_files(
        [f"{d}/*.jsonl", f"{d}/*.jsonl", str(d / ".." / "d" / "a.jsonl"), str(d)],
        [str(d / "val.jsonl")],
        [str(d / "test.jsonl")],
    )
    assert [(Path(f.path).name, f.split_hint, f.order) for f in files] == [
        ("test.jsonl", "test", 0),
        ("val.jsonl", "validation", 1),
        ("a.jsonl", "", 2),
        ("b.jsonl", "", 3),
    ]
    assert len(notes) == 2
    assert "test.jsonl matches data.train_files but is listed in data.test_files" in notes[0]
    assert "val.jsonl" in notes[1] and "data.validation_files" in notes[1]


def test_a_file_cannot_be_held_out_twice_or_be_all_there_is(tmp_path):
    d = _files(tmp_path, "a.jsonl", "held.jsonl")
    with pytest.raises(sources.DataInputError, match="both data.test_files and data.valid"):
        sources.assign_files([str(d / "a.jsonl")], [f"{d}/h*.jsonl"], [str(d / "held.jsonl")])
    with pytest.raises(sources.DataInputError, match="nothing is left to train on"):
        sources.assign_files([str(d / "held.jsonl")], [], [str(d / "held.jsonl")])


def test_accounting_mismatch_is_a_rayft_error_naming_the_counts():
    rep = {
        "rows_in": 10,
        "rows_out": {"train": 5, "validation": 1, "test": 1},
        "rejected": {"bad_json": 1},
        "duplicates_removed": {"exact": 1, "near": 0},
        "overlength": {"dropped": 0, "truncated": 2},
    }
    with pytest.raises(report.AccountingError) as e:
        report.check_accounting(rep)
    assert isinstance(e.value, RayftError)
    msg = str(e.value)
    assert "rows_in=10" in msg and "rows_out 7" in msg and "rejected 1" in msg
    assert "duplicates_removed 1" in msg and "overlength.dropped 0" in msg
    assert "= 9 (+1 rows unaccounted for)" in msg
    rep["overlength"]["dropped"] = 1
    report.check_accounting(rep)
