"""Input files: expand paths and globs (local or any fsspec URL such as s3://) and split each
file into raw rows that remember their file and 1-based line.

Files are read whole by Ray Data (`read_binary_files`) rather than with `read_json`: a reader
that parses for us would fail on the first bad line, and validation must see every bad line
with its number. JSON arrays and Parquet files number their items 1, 2, ... instead of lines.
"""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa

from rayft.data.formats import detect, parse_line
from rayft.errors import RayftError

UNREADABLE = "unreadable"  # the format of a file that cannot be split into rows
DIRECTORY_SUFFIXES = (".jsonl", ".json", ".ndjson", ".parquet")
RAW_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("order", pa.int32()),
        ("split_hint", pa.string()),
        ("format", pa.string()),
        ("raw", pa.string()),
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


def expand(patterns: list[str], split_hint: str, start: int) -> list[InputFile]:
    """Files behind `patterns` (paths, globs, directories), in a stable order."""
    out: list[InputFile] = []
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
            display = p if protocol in ("file", "local") else fs.unstrip_protocol(p)
            out.append(InputFile(p, display, protocol, start + len(out), split_hint))
    return out


def _items(data: bytes, path: str) -> list[tuple[int, str]]:
    """(1-based line or item number, raw JSON text) of every non-blank row of one file."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(io.BytesIO(data)).to_pylist()
        return [(i + 1, json.dumps(r, default=str)) for i, r in enumerate(rows)]
    text = data.decode("utf-8", errors="replace")
    if path.endswith(".json") and text.lstrip().startswith("["):
        items = json.loads(text)  # a broken array has no rows to number: see split_files
        return [(i + 1, json.dumps(r)) for i, r in enumerate(items)]
    return [(i + 1, line) for i, line in enumerate(text.split("\n")) if line.strip()]


def detect_format(raws: list[str], sample: int = 50) -> str:
    """Majority format among the first parsable rows; `unknown` when none matches."""
    votes: Counter = Counter()
    for raw in raws:
        try:
            fmt = detect(parse_line(raw))
        except ValueError:
            continue
        if fmt:
            votes[fmt] += 1
        if sum(votes.values()) >= sample:
            break
    return votes.most_common(1)[0][0] if votes else "unknown"


def split_files(batch: pa.Table, files: dict[str, InputFile], fmt: str) -> pa.Table:
    """Ray Data UDF: files (bytes, path) -> raw rows with file, line and detected format."""
    cols: dict[str, list[Any]] = {name: [] for name in RAW_SCHEMA.names}
    for data, path in zip(batch["bytes"].to_pylist(), batch["path"].to_pylist(), strict=True):
        f = files[path]
        try:
            items = _items(data, path)
            file_fmt = fmt if fmt != "auto" else detect_format([raw for _, raw in items])
        except (json.JSONDecodeError, pa.ArrowInvalid) as e:
            # One reject for the whole file (at the parser's line), so fail/skip and the
            # accounting treat it like any bad row; raising here would lose the message
            # inside Ray's task error.
            line = e.lineno if isinstance(e, json.JSONDecodeError) else 1
            items, file_fmt = [(line, f"cannot read the file: {e}")], UNREADABLE
        for line, raw in items:
            cols["file"].append(f.display)
            cols["line"].append(line)
            cols["order"].append(f.order)
            cols["split_hint"].append(f.split_hint)
            cols["format"].append(file_fmt)
            cols["raw"].append(raw)
    return pa.table(cols, schema=RAW_SCHEMA)
