"""Tiny `<run_dir>/data/` in the format `rayft prepare` writes (docs/contracts.md), for train tests.

Built here rather than by `rayft prepare` so the training tests do not depend on the data stage:
chat rows are rendered with the tokenizer's ChatML template message by message, labels are -100
everywhere but assistant turns, and examples are packed greedily with restarting position ids.
"""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

TOPICS = ["order", "refund", "password", "email", "package", "ticket", "account", "billing"]
ANSWERS = ["shipping", "billing", "account", "technical", "returns"]


def chat_rows(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    """Deterministic little support conversations; answers follow a learnable pattern."""
    rows = []
    for i in range(n):
        topic = TOPICS[(i * 7 + seed) % len(TOPICS)]
        answer = ANSWERS[(i * 3 + seed) % len(ANSWERS)]
        rows.append(
            [
                {"role": "user", "content": f"My {topic} has a problem. Ticket {i}."},
                {"role": "assistant", "content": f'{{"category": "{answer}", "priority": "low"}}'},
            ]
        )
    return rows


def tokenize_chat(tok, messages: list[dict[str, str]]) -> tuple[list[int], list[int]]:
    """input_ids and labels (-100 outside assistant turns) of one conversation."""
    input_ids: list[int] = []
    labels: list[int] = []
    for m in messages:
        piece = tok.apply_chat_template([m], tokenize=False)
        ids = tok(piece, add_special_tokens=False)["input_ids"]
        input_ids += ids
        labels += ids if m["role"] == "assistant" else [-100] * len(ids)
    return input_ids, labels


def pack(examples: list[tuple[list[int], list[int]]], max_len: int) -> list[dict[str, list[int]]]:
    """Greedy packing in order; position ids restart at 0 for each example."""
    packs: list[dict[str, list[int]]] = []
    cur: dict[str, list[int]] = {
        "input_ids": [],
        "labels": [],
        "position_ids": [],
        "seq_lengths": [],
    }
    for ids, labels in examples:
        if cur["input_ids"] and len(cur["input_ids"]) + len(ids) > max_len:
            packs.append(cur)
            cur = {"input_ids": [], "labels": [], "position_ids": [], "seq_lengths": []}
        cur["input_ids"] += ids
        cur["labels"] += labels
        cur["position_ids"] += list(range(len(ids)))
        cur["seq_lengths"].append(len(ids))
    if cur["input_ids"]:
        packs.append(cur)
    return packs


def _write(table: pa.Table, directory: Path, files: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    per = max(1, -(-table.num_rows // files))
    for i, start in enumerate(range(0, table.num_rows, per)):
        pq.write_table(table.slice(start, per), directory / f"part-{i:03d}.parquet")


def _int_lists(rows: list[dict], key: str) -> pa.Array:
    return pa.array([r[key] for r in rows], type=pa.list_(pa.int32()))


def write_sft(
    run_dir: str | Path,
    tokenizer_path: str,
    n_train: int = 64,
    n_val: int = 8,
    max_len: int = 96,
    packed: bool = True,
) -> Path:
    """Write train/validation(/test) SFT splits (and packed splits) under run_dir/data."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_path)
    data = Path(run_dir) / "data"
    for split, n, seed in (("train", n_train, 0), ("validation", n_val, 1), ("test", n_val, 2)):
        if n == 0:
            continue
        rows = []
        for j, msgs in enumerate(chat_rows(n, seed)):
            ids, labels = tokenize_chat(tok, msgs)
            blob = json.dumps(msgs)
            rows.append(
                {
                    "id": hashlib.sha256(blob.encode()).hexdigest()[:16],
                    "source": f"chat.jsonl:{j + 1}",
                    "kind": "sft",
                    "messages": blob,
                    "text": tok.apply_chat_template(msgs, tokenize=False),
                    "input_ids": ids,
                    "labels": labels,
                    "num_tokens": len(ids),
                }
            )
        table = pa.table(
            {
                **{k: [r[k] for r in rows] for k in ("id", "source", "kind", "messages", "text")},
                "input_ids": _int_lists(rows, "input_ids"),
                "labels": _int_lists(rows, "labels"),
                "num_tokens": pa.array([r["num_tokens"] for r in rows], type=pa.int32()),
            }
        )
        _write(table, data / f"{split}.parquet", files=2)
        if packed and split != "test":
            packs = pack([(r["input_ids"], r["labels"]) for r in rows], max_len)
            ptable = pa.table(
                {
                    k: _int_lists(packs, k)
                    for k in ("input_ids", "labels", "position_ids", "seq_lengths")
                }
            )
            _write(ptable, data / "packed" / f"{split}.parquet", files=2)
    report = {"kind": "sft", "rows_out": {"train": n_train, "validation": n_val, "test": n_val}}
    (data / "data_report.json").write_text(json.dumps(report))
    return data


def write_preference(run_dir: str | Path, n_train: int = 32, n_val: int = 8) -> Path:
    """Write preference splits: prompt (JSON messages), chosen, rejected."""
    data = Path(run_dir) / "data"
    for split, n, seed in (("train", n_train, 0), ("validation", n_val, 1), ("test", n_val, 2)):
        if n == 0:
            continue
        prompts, chosen, rejected = [], [], []
        for msgs in chat_rows(n, seed):
            prompts.append(json.dumps(msgs[:1]))
            chosen.append(msgs[1]["content"])
            rejected.append("I do not know.")
        table = pa.table(
            {
                "id": [hashlib.sha256(p.encode()).hexdigest()[:16] for p in prompts],
                "source": [f"pref.jsonl:{i + 1}" for i in range(n)],
                "kind": ["preference"] * n,
                "prompt": prompts,
                "chosen": chosen,
                "rejected": rejected,
                "num_tokens": pa.array([40] * n, type=pa.int32()),
            }
        )
        _write(table, data / f"{split}.parquet", files=2)
    report = {
        "kind": "preference",
        "rows_out": {"train": n_train, "validation": n_val, "test": n_val},
    }
    (data / "data_report.json").write_text(json.dumps(report))
    return data


def write_prompts(run_dir: str | Path, rows: dict[str, list[dict]]) -> Path:
    """Write prompt-only splits (GRPO): `rows[split]` holds {"prompt": text, **item fields}."""
    return _write_kind(
        run_dir, "prompt", "rl.jsonl", rows,
        lambda r: json.dumps({k: v for k, v in r.items() if k != "prompt"}),
        lambda items: {"item": [json.dumps({k: v for k, v in r.items() if k != "prompt"})
                                for r in items]},
    )  # fmt: skip


def write_unpaired(run_dir: str | Path, rows: dict[str, list[dict]]) -> Path:
    """Write KTO splits: `rows[split]` holds {"prompt": text, "completion": text, "label": bool}."""
    return _write_kind(
        run_dir, "unpaired", "kto.jsonl", rows, lambda r: r["completion"],
        lambda items: {
            "completion": [r["completion"] for r in items],
            "label": pa.array([bool(r["label"]) for r in items], type=pa.bool_()),
        },
    )  # fmt: skip


def _write_kind(run_dir, kind: str, source: str, rows: dict[str, list[dict]], key, columns):
    """Splits of `kind`: one user-turn prompt per row, ids from the prompt and key(row), the
    kind's own `columns(rows)` after the prompt, and a data_report.json naming the kind."""
    data = Path(run_dir) / "data"
    for split, items in rows.items():
        prompts = [json.dumps([{"role": "user", "content": r["prompt"]}]) for r in items]
        ids = [hashlib.sha256((p + key(r)).encode()).hexdigest()[:16]
               for p, r in zip(prompts, items, strict=True)]  # fmt: skip
        table = pa.table(
            {
                "id": ids,
                "source": [f"{source}:{i + 1}" for i in range(len(items))],
                "kind": [kind] * len(items),
                "prompt": prompts,
                **columns(items),
                "num_tokens": pa.array([20] * len(items), type=pa.int32()),
            }
        )
        _write(table, data / f"{split}.parquet", files=1)
    report = {"kind": kind, "rows_out": {s: len(r) for s, r in rows.items()}}
    (data / "data_report.json").write_text(json.dumps(report))
    return data


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_result_script(script: str, *args: str, timeout: int) -> dict:
    """Run `script` in a fresh Python (its own Ray) and return the JSON it printed on its
    `RESULT ` line; fails with the script's output when it did not succeed."""
    proc = subprocess.run(
        [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))
