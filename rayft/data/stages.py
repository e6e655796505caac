"""The Ray Data batch functions of `rayft prepare`, in pipeline order.

Each takes and returns a pyarrow Table with a fixed schema, so blocks from different files
(and rows that were rejected) always line up.
"""

from __future__ import annotations

import functools
import json
from collections import Counter
from typing import Any

import pyarrow as pa

from rayft.data import clean, dedupe, formats, split, tokens
from rayft.data.formats import RowError
from rayft.data.sources import ORIGIN, UNREADABLE

PII_TYPES = tuple(clean.PLACEHOLDERS)
CLEAN_SCHEMA = pa.schema(
    [
        *ORIGIN,
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
        ("parallel_tool_calls", pa.bool_()),  # chat rows that set it false; not written out
        ("text", pa.string()),
        ("prompt", pa.string()),
        ("chosen", pa.string()),
        ("rejected", pa.string()),
        ("item", pa.string()),  # prompt rows: JSON object
        ("completion", pa.string()),
        ("label", pa.bool_()),
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
# The other kinds stay text, as TRL's trainers take them: `prompt` is a JSON list of messages.
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
PROMPT_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("item", pa.string()),  # JSON object: the row's other keys, for the grader
        ("num_tokens", pa.int32()),
    ]
)
UNPAIRED_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("source", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("completion", pa.string()),
        ("label", pa.bool_()),
        ("num_tokens", pa.int32()),
    ]
)
SCHEMAS = {
    "sft": SFT_SCHEMA,
    "preference": PREFERENCE_SCHEMA,
    "prompt": PROMPT_SCHEMA,
    "unpaired": UNPAIRED_SCHEMA,
}
# --------------------------------------------------------------------------- validate + clean


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
            "prompt/completion, text, prompt/chosen/rejected, prompt/completion/label); set "
            "data.format explicitly (prompts for reinforcement fine-tuning: reinforcement)",
        )
    ex = formats.to_example(formats.parse_line(raw), fmt)
    return clean.example(ex, normalize, pii_types, counts)


def content_parts(ex: formats.Example) -> list[tuple[str, str]]:
    """(role, text) of everything an example says, for the dedupe keys."""
    if ex.messages is not None:
        parts = []
        for k, m in enumerate(ex.messages):
            parts.append((m["role"], m["content"]))
            for c in m.get("tool_calls", []):
                parts.append(("tool_call", f"{c['function']['name']} {c['function']['arguments']}"))
            # rows that differ in who speaks or in what is learned are different examples
            if "name" in m:
                parts.append(("name", f"{k} {m['name']}"))
            if m.get("weight") == 0:
                parts.append(("weight", f"{k} 0"))
        if ex.tools:
            parts.append(("tools", json.dumps(ex.tools, sort_keys=True)))
        return parts
    if ex.text is not None:
        return [("text", ex.text)]
    prompt = [(m["role"], m["content"]) for m in ex.prompt or []]
    if ex.kind == "prompt":  # one prompt with two references is two examples
        return [*prompt, ("item", json.dumps(ex.item, sort_keys=True, ensure_ascii=False))]
    if ex.kind == "unpaired":  # and one answer labelled both ways too: KTO sees the conflict
        return [*prompt, ("completion", ex.completion or ""), ("label", str(ex.label).lower())]
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
    near_keys: list[tuple[int, str]] = []  # (row, key): signed together after the loop
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
                parallel_tool_calls=ex.parallel_tool_calls,
                text=ex.text or "",
                prompt=json.dumps(ex.prompt, ensure_ascii=False) if ex.prompt else None,
                chosen=ex.chosen,
                rejected=ex.rejected,
                item=json.dumps(ex.item, ensure_ascii=False) if ex.kind == "prompt" else None,
                completion=ex.completion,
                label=ex.label,
            )
            if near:
                near_keys.append((len(cols["id"]), dedupe.near_key(parts)))
            for t in PII_TYPES:
                out[f"pii_{t}"] = counts[t]
        for k, v in out.items():
            cols[k].append(v)
    signed = dedupe.signatures([key for _, key in near_keys], num_perm, shingle_size)
    for (i, _), sig in zip(near_keys, signed, strict=True):
        cols["minhash"][i] = sig
    return pa.table(cols, schema=CLEAN_SCHEMA)


# --------------------------------------------------------------------------- split + tokenize

# Cleaned rows with their place and tokens: `text` becomes the rendered text of SFT rows.
TOKENIZED_SCHEMA = CLEAN_SCHEMA
for _name, _type in [
    ("source", pa.string()),
    ("split", pa.string()),
    ("input_ids", INT_LIST),
    ("labels", INT_LIST),
    ("num_tokens", pa.int32()),
    ("overlength", pa.string()),
]:
    TOKENIZED_SCHEMA = TOKENIZED_SCHEMA.append(pa.field(_name, _type))


def tokenize(
    batch: pa.Table,
    model_path: str,
    assistant_only: bool,
    max_len: int,
    overlength: str,
    validation: float,
    test: float,
    seed: int,
) -> pa.Table:
    """Cleaned rows -> the same rows with `source`, and for valid rows their `split` and
    tokens; a row the chat template refuses becomes a reject like those of validation.

    This runs before dedupe, in the same tasks as validation: tokenizing the duplicates
    (a few percent of rows) costs less than a second pass over the data with its own actors,
    which took seconds to start before they tokenized anything. The split is a hash of the
    content id, known here already.
    """
    stage = _stage(model_path, assistant_only, max_len, overlength)
    rows = batch.to_pylist()
    valid = []
    for r in rows:
        r["source"] = f"{r['file']}:{r['line']}"
        if r["error_kind"] is None:
            r["split"] = r["split_hint"] or split.assign(r["id"], validation, test, seed)
            valid.append(r)
    sft = [r for r in valid if r["kind"] == "sft"]
    text = [r for r in valid if r["kind"] != "sft"]
    for r, out in zip(sft + text, stage.sft(sft) + stage.text(text), strict=True):
        r.update(out)
    return pa.Table.from_pylist(rows, schema=TOKENIZED_SCHEMA)


@functools.lru_cache(maxsize=4)
def _stage(model_path: str, assistant_only: bool, max_len: int, overlength: str) -> Tokenize:
    # One tokenizer per worker process: loaded by its first batch, kept for the next ones.
    return Tokenize(model_path, assistant_only, max_len, overlength)


class Tokenize:
    """Rendering, tokenization and the over-length policy with one loaded tokenizer."""

    def __init__(self, model_path: str, assistant_only: bool, max_len: int, overlength: str):
        self.tok = tokens.load_tokenizer(model_path)
        self.assistant_only = assistant_only
        self.max_len, self.overlength = max_len, overlength

    def sft(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per row (messages, tools, parallel_tool_calls, text): text, input_ids, labels,
        num_tokens, overlength; or the template's refusal."""
        out: list[dict[str, Any]] = []
        rendered, where = [], []
        for r in rows:
            messages = json.loads(r["messages"]) if r["messages"] else None
            given = {"tools": json.loads(r["tools"])} if r.get("tools") else {}
            if r.get("parallel_tool_calls") is False:
                given["parallel_tool_calls"] = False
            row = {"messages": messages, "text": r["text"], **given}
            try:
                rendered.append(tokens.render_sft(self.tok, row, self.assistant_only))
            except RowError as e:  # only chat rows meet a template
                out.append(_template_reject(e, {"messages": messages, **given}))
                continue
            where.append(len(out))
            out.append({})
        for k, (text, ids, labels) in zip(
            where, tokens.encode_sft(self.tok, rendered), strict=True
        ):
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
            out[k] = {
                "text": text,
                "input_ids": ids,
                "labels": labels,
                "num_tokens": len(ids),
                "overlength": status,
            }
        return out

    def text(self, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Per preference, prompt or unpaired row: num_tokens (the prompt with the generation
        prompt, and its longer answer where it has any), overlength; or the refusal."""
        out = []
        for r in rows:
            prompt = json.loads(r["prompt"])
            try:
                if r["kind"] == "preference":
                    n = tokens.preference_tokens(self.tok, prompt, r["chosen"], r["rejected"])
                else:
                    n = tokens.prompt_tokens(self.tok, prompt, r["completion"])
            except RowError as e:
                row = {"prompt": prompt} | {k: r[k] for k in _BESIDE_PROMPT[r["kind"]]}
                out.append(_template_reject(e, row))
                continue
            status = ""
            if n > self.max_len:
                # Text columns cannot be cut here; TRL truncates to max_length at train time.
                status = "truncated" if self.overlength == "truncate" else "dropped"
            out.append({"num_tokens": n, "overlength": status})
        return out


# The columns of each text kind beside its prompt: a template's refusal shows them in `row`.
_BESIDE_PROMPT = {
    "preference": ("chosen", "rejected"),
    "prompt": ("item",),
    "unpaired": ("completion", "label"),
}


def _template_reject(e: RowError, row: dict[str, Any]) -> dict[str, Any]:
    # `raw` is the cleaned row as the template saw it: that is what it refused.
    return {
        "error_kind": e.kind,
        "error_field": e.field,
        "reason": e.reason,
        "raw": json.dumps(row, ensure_ascii=False),
    }


# --------------------------------------------------------------------------- write + pack


def split_rows(
    batch: pa.Table, name: str | None, columns: list[str], drop: frozenset[str] = frozenset()
) -> pa.Table:
    """Rows of split `name` (None: all splits) that were neither rejected, nor duplicates
    (sources in `drop`), nor dropped as over length, in `columns`."""
    import pyarrow.compute as pc

    mask = pc.and_(pc.not_equal(batch["overlength"], "dropped"), pc.is_null(batch["error_kind"]))
    if drop:
        mask = pc.and_(mask, pc.invert(pc.is_in(batch["source"], pa.array(list(drop)))))
    if name is not None:
        mask = pc.and_(mask, pc.equal(batch["split"], name))
    return batch.filter(mask).select(columns)
