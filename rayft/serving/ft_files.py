"""Uploaded files: streamed to the state directory in chunks (a large upload never sits in
memory), checked as UTF-8 JSONL on the way, stored under their id (never overwritten; the
client's filename is only a label); and a job's files checked row by row with `rayft prepare`'s
own row rules (rayft.data.formats) before the job is queued."""

from __future__ import annotations

import codecs
import json
import os
from pathlib import Path
from typing import BinaryIO

from rayft.data import formats
from rayft.data.fields import RowError
from rayft.serving.errors import BadRequest

CHUNK = 1 << 20


def check_filename(name: str | None) -> str:
    """A label, never a path: no directories, no `..`, no control characters."""
    if not name:
        raise BadRequest("file: the upload has no filename", "file", "invalid_file")
    if (
        len(name) > 255
        or any(c in name for c in "/\\")
        or name in (".", "..")
        or any(ord(c) < 32 for c in name)
    ):
        raise BadRequest(
            f"file: filename {name[:80]!r} is a path or has control characters; send the "
            "file's own name (no directories)",
            "file",
            "invalid_file",
        )
    return name


def store_upload(src: BinaryIO, dest: Path, max_bytes: int, max_rows: int) -> tuple[int, int]:
    """Copy `src` to `dest` (created, never replaced); (bytes, rows). Every line must be a
    JSON object in UTF-8; the first that is not is refused by its line number."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".part")
    decoder = codecs.getincrementaldecoder("utf-8")()
    size, rows, line_no, pending = 0, 0, 0, ""
    try:
        with open(tmp, "xb") as out:
            while chunk := src.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise BadRequest(
                        f"file: larger than the server's limit of {max_bytes / 1e6:g} MB "
                        "(serve.fine_tuning.max_file_mb); split it or ask the operator",
                        "file",
                        "file_too_large",
                    )
                out.write(chunk)
                try:
                    text = pending + decoder.decode(chunk)
                except UnicodeDecodeError as e:
                    line = line_no + 1 + chunk[: max(e.start, 0)].count(b"\n")
                    raise _bad(line, f"not UTF-8 ({e.reason})") from None
                *lines, pending = text.split("\n")
                for line in lines:
                    line_no += 1
                    rows += _row(line, line_no)
                if rows > max_rows:
                    raise BadRequest(
                        f"file: more than {max_rows} rows (serve.fine_tuning.max_rows)",
                        "file",
                        "too_many_rows",
                    )
            try:
                pending += decoder.decode(b"", final=True)
            except UnicodeDecodeError as e:
                raise _bad(line_no + 1, f"not UTF-8 ({e.reason})") from None
            rows += _row(pending, line_no + 1)
        if rows == 0:
            raise BadRequest("file: no rows (an empty JSONL file)", "file", "invalid_file")
        if rows > max_rows:
            raise BadRequest(
                f"file: more than {max_rows} rows (serve.fine_tuning.max_rows)",
                "file",
                "too_many_rows",
            )
        _publish(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return size, rows


def _publish(tmp: Path, dest: Path) -> None:
    """Give the finished upload its name, never replacing a file: a hard link fails when the
    name exists; on a mount without hard links, an exclusive create claims the name first."""
    try:
        os.link(tmp, dest)
    except FileExistsError:
        raise
    except OSError:
        os.close(os.open(dest, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        tmp.replace(dest)


def _row(line: str, line_no: int) -> int:
    if not line.strip():
        return 0
    try:
        obj = json.loads(line)
    except ValueError as e:
        raise _bad(line_no, f"not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise _bad(line_no, f"a JSONL row is a JSON object, got {type(obj).__name__}")
    return 1


def _bad(line: int, why: str) -> BadRequest:
    return BadRequest(
        f"file: line {line} is {why}; fine-tuning files are JSONL, one JSON object per line",
        "file",
        "invalid_file",
    )


# The rows each method trains on: (prepare's kind, as the error names them)
WANT = {
    "supervised": ("sft", "chat or text rows"),
    "dpo": ("preference", "preference rows (input, preferred_output, non_preferred_output)"),
    "reinforcement": ("prompt", "prompt rows (messages ending with a user turn, plus fields)"),
}


def check_rows(path: Path, file_id: str, param: str, kind: str) -> dict[str, str] | None:
    """The first row of the file that `rayft prepare` would reject, or a row of the wrong kind
    for the method (supervised: chat or text rows; dpo: preference rows), as a job error;
    None when every row is good."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)  # checked at upload
            fmt = formats.detect(obj, "grpo" if kind == "reinforcement" else "auto")
            try:
                if fmt is None:
                    raise RowError(
                        "unknown_format", "(row)", "no known format's keys (messages, ...)"
                    )
                example = formats.to_example(obj, fmt)
            except RowError as e:
                return row_error(param, file_id, line_no, e.field, e.reason)
            want, need = WANT[kind]
            if example.kind != want:
                what = "a preference row" if example.kind == "preference" else f"a {fmt} row"
                return row_error(
                    param, file_id, line_no, "(row)", f"{what}; method {kind} needs {need}"
                )
    return None


def row_error(param: str, file_id: str, line: int, field: str, reason: str) -> dict[str, str]:
    """A job's error for a bad row of its `param` file (the service's check and prepare's)."""
    return file_error(param, f"{file_id} line {line}, field {field}: {reason}")


def file_error(param: str, message: str) -> dict[str, str]:
    return {"code": f"invalid_{param}", "param": param, "message": message}
