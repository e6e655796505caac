"""`rayft prepare`'s outputs: the kept rows written as the split directories, and the packed
train and validation sets; by the driver when it holds the kept rows (small outputs), else by
Ray Data per block (see pipeline.DRIVER_TOKENS)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from rayft.data import pack, report, stages

STAGING = ".splits"


def splits(
    ds, data_dir: Path, schema: pa.Schema, stats: dict[str, Any], drop: frozenset[str]
) -> dict[str, Path]:
    # Into staging, one directory a split as a hive-partitioned write makes them (Ray Data's
    # drops the split column; the driver's writes the kept rows it holds); the directories are
    # then renamed to the contract's names.
    staging = data_dir / STAGING
    if stats["kept"] is not None:
        for name, table in by_split(stats["kept"], schema).items():
            (staging / f"split={name}").mkdir(parents=True)
            pq.write_table(table, staging / f"split={name}" / "part-0.parquet")
    else:
        ds.map_batches(
            stages.split_rows,
            batch_format="pyarrow",
            fn_kwargs={"name": None, "columns": [*schema.names, "split"], "drop": drop},
        ).write_parquet(str(staging.resolve()), partition_cols=["split"])
    out = {}
    for name in report.SPLITS:
        path = data_dir / f"{name}.parquet"
        if stats["rows"][name]:
            (staging / f"split={name}").rename(path)
        else:  # an empty split still has a schema, so readers need no special case
            path.mkdir(parents=True, exist_ok=True)
            pq.write_table(schema.empty_table(), path / "empty.parquet")
        out[name] = path
    shutil.rmtree(staging, ignore_errors=True)
    return out


def by_split(kept: pa.Table, schema: pa.Schema) -> dict[str, pa.Table]:
    """The non-empty splits of the kept rows, in `schema`."""
    out = {}
    for name in report.SPLITS:
        table = kept.filter(pc.equal(kept["split"], name)).select(schema.names)
        if table.num_rows:
            out[name] = table
    return out


def packed(
    ds, data_dir: Path, max_len: int, stats: dict[str, Any], drop: frozenset[str]
) -> tuple[dict[str, Path], dict[str, Any]]:
    out, sequences = {}, {}
    for name in ("train", "validation"):
        if not stats["rows"][name]:
            continue
        path = data_dir / "packed" / f"{name}.parquet"
        if stats["kept"] is not None:
            split = stats["kept"].filter(pc.equal(stats["kept"]["split"], name))
            packed = pack.pack(split.select(["input_ids", "labels"]), max_len)
            path.mkdir(parents=True, exist_ok=True)
            pq.write_table(packed, path / "packed.parquet", row_group_size=1024)
            sequences[name] = packed.num_rows
        else:
            streamed = (
                ds.map_batches(
                    stages.split_rows,
                    batch_format="pyarrow",
                    fn_kwargs={"name": name, "columns": ["input_ids", "labels"], "drop": drop},
                )
                # Large batches: the plan leaves at most a partly filled bin or two per batch.
                .map_batches(
                    pack.pack,
                    batch_size=16384,
                    batch_format="pyarrow",
                    fn_kwargs={"max_len": max_len},
                )
                .materialize()
            )
            sequences[name] = streamed.count()
            streamed.write_parquet(str(path.resolve()))
        out[name] = path
    real = sum(stats["tokens"][s] for s in sequences)
    packing = {
        "efficiency": round(pack.efficiency(real, sum(sequences.values()), max_len), 4),
        "sequences": sequences,
        "definition": "real tokens / (packed sequences x max_seq_len)",
    }
    return out, packing
