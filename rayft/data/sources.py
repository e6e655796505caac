"""Input files: expand paths and globs (local or any fsspec URL such as s3://) and split each
file into raw rows that remember their file and 1-based line.

Files are read whole by Ray Data (`read_binary_files`) rather than with `read_json`: a reader
that parses for us would fail on the first bad line, and validation must see every bad line
with its number. JSON arrays and Parquet files number their items 1, 2, ... instead of lines.
Gzipped JSONL and JSON files (.gz) are read as the text they hold.
"""

from __future__ import annotations

import codecs
import gzip
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import fsspec
import pyarrow as pa

from rayft.data.formats import detect, parse_line
from rayft.errors import RayftError

UNREADABLE = "unreadable"  # the format of a file that cannot be split into rows
DIRECTORY_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")
DIRECTORY_SUFFIXES += tuple(s + ".gz" for s in DIRECTORY_SUFFIXES if s != ".parquet")
_GZIP_MAGIC = b"\x1f\x8b"
# Where a row comes from: every table of the pipeline starts with these columns.
ORIGIN = [
    ("file", pa.string()),
    ("line", pa.int64()),
    ("order", pa.int32()),
    ("split_hint", pa.string()),
    ("format", pa.string()),
]
RAW_SCHEMA = pa.schema(
    [
        *ORIGIN,
        ("raw", pa.string()),
        ("bad_encoding", pa.string()),  # why `raw` is no text, for lines that are not UTF-8
    ]
)


class DataInputError(RayftError):
    """Input files missing or unreadable."""


@dataclass(frozen=True)
class InputFile:
    path: str  # as the filesystem names it (no protocol for remote files)
    display: str  # as the user wrote it, with protocol: used in sources, rejects, reports
    protocol: str  # "file", "s3", ...
    order: int  # priority for dedupe: lower is kept first
    split_hint: str  # "" for train files; "validation" / "test" for explicit split files


def filesystem(protocol: str) -> fsspec.AbstractFileSystem:
    return fsspec.filesystem(protocol)


def expand(patterns: list[str], split_hint: str) -> list[InputFile]:
    """Files behind `patterns` (paths, globs, directories), in a stable order, each once.

    `order` is left at 0: `assign_files` numbers the files of all splits together."""
    out: list[InputFile] = []
    seen: set[tuple[str, str]] = set()
    for pattern in patterns:
        fs, _, paths = fsspec.core.get_fs_token_paths(pattern)
        protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
        found: list[str] = []
        for p in paths:
            if fs.isdir(p):
                found += [f for f in sorted(fs.find(p)) if f.endswith(DIRECTORY_SUFFIXES)]
            elif fs.exists(p):
                found.append(p)
        if not found:
            raise DataInputError(
                f"data: no input files match '{pattern}'; check the path in data.train_files / "
                "validation_files / test_files (globs and s3:// URLs are allowed)"
            )
        for p in sorted(found):
            local = protocol in ("file", "local")
            p = os.path.normpath(p) if local else p
            key = _identity(p, protocol)
            if key in seen:  # the same glob twice, or a file inside a listed directory
                continue
            seen.add(key)
            display = p if local else fs.unstrip_protocol(p)
            out.append(InputFile(p, display, protocol, 0, split_hint))
    return out


def _identity(path: str, protocol: str) -> tuple[str, str]:
    # Local files by their real path, so a symlink or a relative spelling is the same file.
    return protocol, os.path.realpath(path) if protocol in ("file", "local") else path


def assign_files(
    train: list[str], validation: list[str], test: list[str]
) -> tuple[list[InputFile], list[str]]:
    """Every input file once, with its split, and notes on the overlaps that were resolved.

    A file named in data.test_files or data.validation_files belongs to that split, also
    when a train glob matches it too: a held-out file read again as train data would leak
    into training, and read twice its rows would be duplicates of themselves. Order is the
    priority for dedupe: held-out files first (a train row repeating a test row is the copy
    that goes), then files and lines in the order given.
    """
    files = expand(test, "test") + expand(validation, "validation")
    owner: dict[tuple[str, str], InputFile] = {}
    for f in files:
        if owner.setdefault(_identity(f.path, f.protocol), f) is not f:
            raise DataInputError(
                f"data: {f.display} is listed in both data.test_files and "
                "data.validation_files; a file can hold out rows for one split only"
            )
    notes = []
    for f in expand(train, ""):
        held_as = owner.get(_identity(f.path, f.protocol))
        if held_as is None:
            files.append(f)
        else:
            notes.append(
                f"{f.display} matches data.train_files but is listed in "
                f"data.{held_as.split_hint}_files: read once, as {held_as.split_hint} data only"
            )
    if not any(f.split_hint == "" for f in files):
        raise DataInputError(
            "data: every file of data.train_files is also a validation or test file; "
            "nothing is left to train on"
        )
    return [replace(f, order=i) for i, f in enumerate(files)], notes


def _items(data: bytes, path: str) -> list[tuple[int, str, str | None]]:
    """(1-based line or item number, raw JSON text, decoding error or None) of every
    non-blank row of one file. Gzip files (rows.jsonl.gz) are read as the file they hold, and
    their rows numbered as its lines."""
    if data[:2] == _GZIP_MAGIC:
        data, path = gzip.decompress(data), path.removesuffix(".gz")
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [(i + 1, json.dumps(r, default=str), None) for i, r in enumerate(rows)]
    # Editors on Windows write a UTF-8 BOM; it is not part of the first row.
    data = data.removeprefix(codecs.BOM_UTF8)
    if path.endswith(".json") and data.lstrip().startswith(b"["):
        # A broken array has no rows to number: split_files turns the error into one reject.
        items = json.loads(data.decode("utf-8"))
        return [(i + 1, json.dumps(r), None) for i, r in enumerate(items)]
    out = []
    for i, line in enumerate(data.split(b"\n")):
        try:
            # A BOM at the start of a later line comes from concatenated files (cat a b).
            text = line.decode("utf-8").removeprefix("\ufeff")
        except UnicodeDecodeError as e:
            # Decoding with replacement characters would train on mojibake without a word;
            # the line is a reject that shows its bytes instead.
            reason = (
                f"not valid UTF-8 (byte {line[e.start]:#04x} at byte {e.start + 1} of the line); "
                "re-encode the file as UTF-8"
            )
            out.append((i + 1, line.decode("utf-8", errors="backslashreplace"), reason))
            continue
        if text.strip():
            out.append((i + 1, text, None))
    return out


def detect_format(raws: list[str], sample: int = 50, objective: str = "auto") -> str:
    """Majority format among the first parsable rows; `unknown` when none matches. Chat rows
    are reinforcement prompts for `training.objective` grpo (`formats.detect`)."""
    votes: Counter = Counter()
    for raw in raws:
        try:
            fmt = detect(parse_line(raw), objective)
        except ValueError:
            continue
        if fmt:
            votes[fmt] += 1
        if sum(votes.values()) >= sample:
            break
    return votes.most_common(1)[0][0] if votes else "unknown"


def split_files(
    batch: pa.Table, files: dict[str, InputFile], fmt: str, objective: str = "auto"
) -> pa.Table:
    """Ray Data UDF: files (bytes, path) -> raw rows with file, line and detected format
    (`fmt` auto; `objective` is the job's training.objective, which detection heeds)."""
    cols: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA.names}
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist(), strict=True):
        f = files[path]
        try:
            items = _items(data, path)
            texts = [raw for _, raw, error in items if error is None]
            file_fmt = fmt if fmt != "auto" else detect_format(texts, objective=objective)
        except UnicodeDecodeError as e:  # a JSON array that is not UTF-8
            line = data[: e.start].count(b"\n") + 1
            items = [(line, "cannot read the file: not valid UTF-8; re-encode it as UTF-8", None)]
            file_fmt = UNREADABLE
        except (json.JSONDecodeError, pa.ArrowInvalid, OSError, EOFError) as e:
            # One reject for the whole file (at the parser's line), so fail/skip and the
            # accounting treat it like any bad row; raising here would lose the message
            # inside Ray's task error. OSError and EOFError: a corrupt or truncated gzip file.
            line = e.lineno if isinstance(e, json.JSONDecodeError) else 1
            items, file_fmt = [(line, f"cannot read the file: {e}", None)], UNREADABLE
        for line, raw, error in items:
            cols["file"].append(f.display)
            cols["line"].append(line)
            cols["order"].append(f.order)
            cols["split_hint"].append(f.split_hint)
            cols["format"].append(file_fmt)
            cols["raw"].append(raw)
            cols["bad_encoding"].append(error)
    return pa.table(cols, schema=RAW_SCHEMA)
