"""Training data: Ray Datasets over `<run_dir>/data/` on the driver, per-worker row streams and
the padding-free collator inside the workers.

Sample order is reproducible (a resumed run replays it exactly): the driver asks Ray Data to
preserve order, so `streaming_split` hands each worker the same blocks in the same order every
time, and each epoch is shuffled locally with a seed derived from the epoch number.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from rayft.errors import RayftError

SFT_COLUMNS = ["input_ids", "labels", "seq_lengths"]
PREFERENCE_COLUMNS = ["prompt", "chosen", "rejected"]
PROMPT_COLUMNS = ["prompt", "item"]  # grpo: the grader reads `item` (a JSON object)
UNPAIRED_COLUMNS = ["prompt", "completion", "label"]  # kto
COLUMNS = {
    "sft": SFT_COLUMNS,
    "preference": PREFERENCE_COLUMNS,
    "prompt": PROMPT_COLUMNS,
    "unpaired": UNPAIRED_COLUMNS,
}


class TrainDataError(RayftError):
    """Prepared data missing or not in the contract format."""


def data_kind(data_dir: Path) -> str:
    """`sft`, `preference`, `prompt` or `unpaired`, from data_report.json (or the first row)."""
    if not (data_dir / "train.parquet").exists():
        raise TrainDataError(
            f"{data_dir}/train.parquet: no prepared data; run `rayft prepare CONFIG` first "
            "(train reads what prepare wrote into <run_dir>/data/)"
        )
    report = data_dir / "data_report.json"
    if report.exists():
        kind = json.loads(report.read_text()).get("kind")
        if kind in COLUMNS:
            return kind
    import pyarrow.dataset as pads

    head = pads.dataset(split_path(data_dir, "train", packed=False), format="parquet").head(1)
    return head.column("kind")[0].as_py() if head.num_rows else "sft"


def split_path(data_dir: Path, split: str, packed: bool) -> Path:
    path = data_dir / "packed" / f"{split}.parquet" if packed else data_dir / f"{split}.parquet"
    return path


def read_splits(data_dir: Path, kind: str) -> dict[str, Any]:
    """Ray Datasets `train` (and `validation` when present), packed when prepare packed them."""
    import ray.data

    packed = kind == "sft" and (data_dir / "packed" / "train.parquet").exists()
    columns = COLUMNS[kind]
    out = {}
    for split in ("train", "validation"):
        path = split_path(data_dir, split, packed)
        # prepare writes an empty split (data.split.validation: 0) as one file of no rows: a
        # validation set of none is no validation set (DPO's trainer fails on one)
        if not path.exists() or not sum(_rows_in(f) for f in path.glob("*.parquet")):
            continue
        read_cols = columns if packed or kind != "sft" else ["input_ids", "labels"]
        out[split] = ray.data.read_parquet(str(path), columns=read_cols)
    return out


def _rows_in(parquet: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(parquet).metadata.num_rows


def features(kind: str):
    """`datasets.Features` of the rows the workers stream (so nothing peeks at the stream)."""
    from datasets import Features, List, Value

    if kind == "sft":
        return Features({c: List(Value("int32")) for c in SFT_COLUMNS})
    message = {"role": Value("string"), "content": Value("string")}
    if kind == "prompt":
        return Features({"prompt": List(message), "item": Value("string")})
    if kind == "unpaired":
        return Features(
            {"prompt": List(message), "completion": List(message), "label": Value("bool")}
        )
    return Features({c: List(message) for c in PREFERENCE_COLUMNS})


def _rows(batch: dict[str, Any], kind: str) -> Iterator[dict[str, Any]]:
    n = len(next(iter(batch.values())))
    for i in range(n):
        if kind == "sft":
            ids = [int(x) for x in batch["input_ids"][i]]
            lengths = batch.get("seq_lengths")  # packed rows: the examples in them
            yield {
                "input_ids": ids,
                "labels": [int(x) for x in batch["labels"][i]],
                "seq_lengths": [int(x) for x in lengths[i]] if lengths is not None else [len(ids)],
            }
        elif kind == "prompt":
            yield {"prompt": json.loads(batch["prompt"][i]), "item": str(batch["item"][i] or "{}")}
        elif kind == "unpaired":
            yield {
                "prompt": json.loads(batch["prompt"][i]),
                "completion": [{"role": "assistant", "content": str(batch["completion"][i])}],
                "label": bool(batch["label"][i]),
            }
        else:
            yield {
                "prompt": json.loads(batch["prompt"][i]),
                "chosen": [{"role": "assistant", "content": str(batch["chosen"][i])}],
                "rejected": [{"role": "assistant", "content": str(batch["rejected"][i])}],
            }


def endless_rows(
    shard, kind: str, seed: int, shuffle_buffer: int = 64, cache_bytes: int = 0
) -> Iterator[dict[str, Any]]:
    """This worker's shard, epoch after epoch; epoch e is shuffled locally with seed + e.

    One endless stream lets the HF Trainer count steps across epochs, so resuming skips exactly
    `global_step x accumulation` batches of the same stream an uninterrupted run saw.

    Every pass over a Ray Data shard starts a new execution (planning, read tasks; seconds each
    on a small machine), which dominates training on a small dataset of many short epochs. So
    the first epoch is kept (as int32 arrays) when this worker's rows fit in `cache_bytes`, and
    later epochs are seeded permutations of it: still deterministic, still only this worker's
    rows. A shard that outgrows the cache is streamed again every epoch.
    """
    cache: list[dict[str, np.ndarray]] | None = [] if kind == "sft" and cache_bytes > 0 else None
    size = 0
    for epoch in itertools.count():
        if epoch > 0 and cache is not None:
            for i in np.random.default_rng(seed + epoch).permutation(len(cache)):
                yield {k: v.tolist() for k, v in cache[i].items()}
            continue
        empty = True
        for batch in shard.iter_batches(
            batch_size=32,
            batch_format="numpy",
            local_shuffle_buffer_size=shuffle_buffer,
            local_shuffle_seed=seed + epoch,
        ):
            for row in _rows(batch, kind):
                empty = False
                if epoch == 0 and cache is not None:
                    kept = {k: np.asarray(v, dtype=np.int32) for k, v in row.items()}
                    size += sum(a.nbytes for a in kept.values())
                    if size <= cache_bytes:
                        cache.append(kept)
                    else:
                        cache = None
                yield row
        if empty:
            raise TrainDataError("this worker's training shard is empty: fewer rows than workers")


def one_pass(shard, kind: str) -> Iterator[dict[str, Any]]:
    """One ordered pass over this worker's shard (evaluation)."""
    for batch in shard.iter_batches(batch_size=32, batch_format="numpy"):
        yield from _rows(batch, kind)


def collator(pad_token_id: int):
    """TRL's padding-free collator: a micro-batch becomes one row without an attention mask,
    position ids restart at every example (from `seq_lengths`), and each example's first label
    is -100 (else the previous example's last token would be trained to predict it).
    transformers turns restarting position ids into a block-diagonal causal mask, so packed
    examples never attend to each other; the collator also passes the sequence boundaries
    (`cu_seq_lens_*`) that flash-attention kernels on GPU would otherwise derive from the
    position ids with a device-to-host sync in every layer."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=pad_token_id, padding_free=True)
