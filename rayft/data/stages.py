"""The Ray Data batch functions of `rayft prepare`, in pipeline order.

Each takes and returns a pyarrow Table with a fixed schema, so blocks from different files
(and rows that were rejected) always line up.
"""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pyarrow as pa

from rayft.data import clean, dedupe, formats, pack, split, tokens
from rayft.data.formats import RowError
from rayft.data.sources import UNREADABLE

PII_TYPES = tuple(clean.PLACEHOLDERS)
CLEAN_SCHEMA = pa.schema(
    [
        ("file", pa.string()),
        ("line", pa.int64()),
        ("order", pa.int32()),
        ("split_hint", pa.string()),
        ("format", pa.string()),
        # rejected rows: what was wrong, and the row as it was
        ("error_kind", pa.string()),
        ("error_field", pa.string()),
        ("reason", pa.string()),
        ("raw", pa.string()),
        # valid rows, cleaned
        ("id", pa.string()),
        ("kind", pa.string()),
        ("messages", pa.string()),
        ("tools", pa.string()),  # chat rows with tool schemas: JSON; not written out
        ("text", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("minhash", pa.binary()),
        *[(f"pii_{t}", pa.int32()) for t in PII_TYPES],
    ]
)
INT_LIST = pa.list_(pa.int32())
SFT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("messages", pa.string()),
        ("text", pa.string()),
        ("input_ids", INT_LIST),
        ("labels", INT_LIST),
        ("num_tokens", pa.int32()),
    ]
)
PREFERENCE_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("num_tokens", pa.int32()),
    ]
)
# What the tokenize step adds for the driver's accounting; dropped before writing. Rows the
# chat template refuses carry error_kind, error_field, reason and raw, as rejects do above.
BOOKKEEPING = [
    ("split", pa.string()),
    ("overlength", pa.string()),
    ("error_kind", pa.string()),
    ("error_field", pa.string()),
    ("reason", pa.string()),
    ("raw", pa.string()),
]


# --------------------------------------------------------------------------- validate + clean


def _clean_messages(messages, fix, pii_types, counts) -> list[dict[str, Any]]:
    out = []
    for m in messages:
        m = {**m, "content": fix(m["content"], pii_types, counts)}
        if "tool_calls" in m:  # arguments are text the model learns to write: scrubbed too
            m["tool_calls"] = [_scrub_call(c, pii_types, counts) for c in m["tool_calls"]]
        out.append(m)
    return out


def _scrub_call(call: dict[str, Any], pii_types: list[str], counts: Counter) -> dict[str, Any]:
    arguments = call["function"]["arguments"]
    if pii_types:
        arguments = clean.scrub(arguments, pii_types, counts)
    return {**call, "function": {**call["function"], "arguments": arguments}}


def clean_row(
    raw: str, fmt: str, normalize: bool, pii_types: list[str], counts: Counter
) -> formats.Example:
    """Parse, validate, normalise and scrub one row; raises RowError."""
    if fmt == UNREADABLE:  # `raw` holds the parser's message, not a row
        raise RowError("bad_json", "(file)", raw)
    if fmt == "unknown":
        raise RowError(
            "unknown_format",
            "(row)",
            "no known format keys (messages, conversations, instruction/output, "
            "prompt/completion, text, prompt/chosen/rejected); set data.format explicitly",
        )

    def fix(text: str, types: list[str], c: Counter) -> str:
        text = clean.normalize(text) if normalize else text
        return clean.scrub(text, types, c) if types else text

    ex = formats.to_example(formats.parse_line(raw), fmt)
    # Validate again after cleaning: whitespace-only content is empty content.
    if ex.messages is not None:
        ex.messages = _clean_messages(ex.messages, fix, pii_types, counts)
        for i, m in enumerate(ex.messages):
            if not m["content"] and "tool_calls" not in m:
                raise RowError("empty_content", f"messages[{i}].content", "content is empty")
    if ex.text is not None:
        ex.text = fix(ex.text, pii_types, counts)
        if not ex.text:
            raise RowError("empty_content", "text", "'text' is empty")
    if ex.prompt is not None:
        ex.prompt = _clean_messages(ex.prompt, fix, pii_types, counts)
        ex.chosen = fix(ex.chosen or "", pii_types, counts)
        ex.rejected = fix(ex.rejected or "", pii_types, counts)
        for name in ("chosen", "rejected"):
            if not getattr(ex, name):
                raise RowError("empty_content", name, f"'{name}' is empty")
    return ex


def content_parts(ex: formats.Example) -> list[tuple[str, str]]:
    """(role, text) of everything an example says, for the dedupe keys."""
    if ex.messages is not None:
        parts = []
        for m in ex.messages:
            parts.append((m["role"], m["content"]))
            for c in m.get("tool_calls", []):
                parts.append(("tool_call", f"{c['function']['name']} {c['function']['arguments']}"))
        if ex.tools:
            parts.append(("tools", json.dumps(ex.tools, sort_keys=True)))
        return parts
    if ex.text is not None:
        return [("text", ex.text)]
    prompt = [(m["role"], m["content"]) for m in ex.prompt or []]
    return [*prompt, ("chosen", ex.chosen or ""), ("rejected", ex.rejected or "")]


def validate_clean(
    batch: pa.Table,
    normalize: bool,
    pii_types: list[str],
    num_perm: int,
    shingle_size: int,
    near: bool,
) -> pa.Table:
    """Raw rows -> cleaned rows with content id and MinHash, or rejected rows with a reason."""
    cols: dict[str, list[Any]] = {name: [] for name in CLEAN_SCHEMA.names}
    for row in batch.to_pylist():
        counts: Counter = Counter()
        out = dict.fromkeys(CLEAN_SCHEMA.names)
        out.update({k: row[k] for k in ("file", "line", "order", "split_hint", "format")})
        try:
            if row["bad_encoding"] is not None:  # not text: there is nothing to parse
                raise RowError("bad_encoding", "(row)", row["bad_encoding"])
            ex = clean_row(row["raw"], row["format"], normalize, pii_types, counts)
        except RowError as e:
            out.update(error_kind=e.kind, error_field=e.field, reason=e.reason, raw=row["raw"])
        else:
            parts = content_parts(ex)
            out.update(
                id=dedupe.content_id(dedupe.exact_key(parts)),
                kind=ex.kind,
                messages=json.dumps(ex.messages, ensure_ascii=False) if ex.messages else "",
                tools=json.dumps(ex.tools, ensure_ascii=False) if ex.tools else None,
                text=ex.text or "",
                prompt=json.dumps(ex.prompt, ensure_ascii=False) if ex.prompt else None,
                chosen=ex.chosen,
                rejected=ex.rejected,
                minhash=(
                    dedupe.signature(dedupe.near_key(parts), num_perm, shingle_size)
                    if near
                    else None
                ),
            )
            for t in PII_TYPES:
                out[f"pii_{t}"] = counts[t]
        for k, v in out.items():
            cols[k].append(v)
    return pa.table(cols, schema=CLEAN_SCHEMA)


# --------------------------------------------------------------------------- keep + split


def keep_and_split(
    batch: pa.Table, drop: frozenset[str], validation: float, test: float, seed: int
) -> pa.Table:
    """Valid, non-duplicate rows with their `source` and `split`."""
    import pyarrow.compute as pc

    source = pc.binary_join_element_wise(batch["file"], pc.cast(batch["line"], pa.string()), ":")
    keep = pc.is_null(batch["error_kind"])
    if drop:
        keep = pc.and_(keep, pc.invert(pc.is_in(source, pa.array(list(drop), pa.string()))))
    batch = batch.append_column("source", source).filter(keep)
    hints, ids = batch["split_hint"].to_pylist(), batch["id"].to_pylist()
    splits = [
        h or split.assign(cid, validation, test, seed) for h, cid in zip(hints, ids, strict=True)
    ]
    keep_cols = [
        *("id", "source", "kind", "messages", "tools", "text"),
        *("prompt", "chosen", "rejected"),
    ]
    return batch.select(keep_cols).append_column("split", pa.array(splits, pa.string()))


# --------------------------------------------------------------------------- tokenize


class Tokenize:
    """Ray Data callable class: one tokenizer per actor, loaded once."""

    def __init__(
        self, model_path: str, kind: str, assistant_only: bool, max_len: int, overlength: str
    ):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(model_path)
        self.kind, self.assistant_only = kind, assistant_only
        self.max_len, self.overlength = max_len, overlength

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        if not rows:  # every row of the block was a reject or a duplicate
            schema = SFT_SCHEMA if self.kind == "sft" else PREFERENCE_SCHEMA
            return _with_bookkeeping(schema).empty_table()
        return self._preference(rows) if self.kind == "preference" else self._sft(rows)

    def _sft(self, rows: list[dict[str, Any]]) -> pa.Table:
        cols: dict[str, list[Any]] = {name: [] for name in _with_bookkeeping(SFT_SCHEMA).names}
        rendered, keep = [], []
        for r in rows:
            messages = json.loads(r["messages"]) if r["messages"] else None
            tools = json.loads(r["tools"]) if r.get("tools") else None
            row = {"messages": messages, "text": r["text"], "tools": tools}
            try:
                rendered.append(tokens.render_sft(self.tok, row, self.assistant_only))
            except RowError as e:  # only chat rows meet a template
                shown = {"messages": messages, **({"tools": tools} if tools else {})}
                _append(cols, _template_reject(r, e, shown))
                continue
            keep.append(r)
        for r, (text, ids, labels) in zip(keep, tokens.encode_sft(self.tok, rendered), strict=True):
            status = ""
            if len(ids) > self.max_len:
                if self.overlength == "truncate":
                    ids, labels, status = ids[: self.max_len], labels[: self.max_len], "truncated"
                    # an example cut before its first answer token teaches nothing: drop it
                    if all(x == tokens.IGNORE for x in labels):
                        status = "dropped"
                else:
                    status = "dropped"
            if status == "dropped":
                ids, labels = [], []
            _append(
                cols,
                {
                    **{k: r[k] for k in ("id", "source", "kind", "messages", "split")},
                    "text": text,
                    "input_ids": ids,
                    "labels": labels,
                    "num_tokens": len(ids),
                    "overlength": status,
                },
            )
        return pa.table(cols, schema=_with_bookkeeping(SFT_SCHEMA))

    def _preference(self, rows: list[dict[str, Any]]) -> pa.Table:
        out = []
        for r in rows:
            keep = {k: r[k] for k in ("id", "source", "kind", "prompt", "chosen", "rejected")}
            keep["split"] = r["split"]
            prompt = json.loads(r["prompt"])
            try:
                n = tokens.preference_tokens(self.tok, prompt, r["chosen"], r["rejected"])
            except RowError as e:
                row = {"prompt": prompt, "chosen": r["chosen"], "rejected": r["rejected"]}
                out.append(_template_reject(keep, e, row))
                continue
            status = ""
            if n > self.max_len:
                # Text columns cannot be cut here; TRL truncates to max_length at train time.
                status = "truncated" if self.overlength == "truncate" else "dropped"
            out.append({**keep, "num_tokens": n, "overlength": status})
        return pa.Table.from_pylist(out, schema=_with_bookkeeping(PREFERENCE_SCHEMA))


def _append(cols: dict[str, list[Any]], row: dict[str, Any]) -> None:
    for name, values in cols.items():
        values.append(row.get(name))


def _template_reject(keep: dict[str, Any], e: RowError, row: dict[str, Any]) -> dict[str, Any]:
    # Rejected after dedupe and split: the driver adds it to the rejects, and split_rows
    # leaves it out. `raw` is the cleaned row, since the input line is not carried this far.
    return {
        **keep,
        "num_tokens": 0,
        "overlength": "",
        "error_kind": e.kind,
        "error_field": e.field,
        "reason": e.reason,
        "raw": json.dumps(row, ensure_ascii=False),
    }


def _with_bookkeeping(schema: pa.Schema) -> pa.Schema:
    for name, typ in BOOKKEEPING:
        schema = schema.append(pa.field(name, typ))
    return schema


# --------------------------------------------------------------------------- write + pack


def split_rows(batch: pa.Table, name: str | None, columns: list[str]) -> pa.Table:
    """Rows of split `name` (None: all splits) that were neither dropped nor rejected, in
    `columns`."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.not_equal(batch["overlength"], "dropped"), pc.is_null(batch["error_kind"]))
    if name is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], name))
    return batch.filter(mask).select(columns)


def pack_batch(batch: pa.Table, max_len: int) -> pa.Table:
    return pack.pack(batch, max_len)
