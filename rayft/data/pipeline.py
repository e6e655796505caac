"""`rayft prepare`: validate -> clean -> dedupe -> split -> template -> tokenize -> pack on Ray Data.

One Ray Data pass reads every file, validates, cleans and signs each row (content hash +
MinHash), assigns its split (a hash of the content) and tokenizes it, in the same tasks; it is
materialised in the object store. The driver then makes the global decisions that need all
rows at once (rejects and fail-fast, exact and near duplicates across files) from the small
columns, and the splits are written and packed without the duplicates: by the driver for
outputs that small, by Ray Data per block beyond DRIVER_TOKENS.

Tokenizing before dedupe spends the tokenizer on the duplicates too (a few percent of rows);
the second pass it replaced, with an actor pool of its own, spent seconds starting before it
tokenized a row.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from rayft.config import DataConfig, JobConfig
from rayft.data import dedupe, report, sources, stages, write
from rayft.errors import RayftError

# Up to this many tokens (int32 ids and labels: 8 bytes a token, 128 MiB here) the driver,
# which reads every tokenized block for the counts anyway, keeps the kept rows and writes the
# splits itself and packs each split whole: one plan over a split leaves one partly filled
# sequence where packing per block leaves one per block, and a Ray Data write job costs
# seconds of scheduling for a few MB. Larger outputs are written and packed per block.
DRIVER_TOKENS = 16_000_000


class DataValidationError(RayftError):
    """Bad rows with data.on_error: fail."""


@dataclass
class DataArtifacts:
    """What `prepare` wrote: split directories, packed directories and the report."""

    data_dir: Path
    splits: dict[str, Path]
    packed: dict[str, Path] = field(default_factory=dict)
    report: dict[str, Any] = field(default_factory=dict)


def prepare(cfg: JobConfig) -> DataArtifacts:
    """Run the whole data stage for `cfg` and record it in run.json."""
    from rayft import manifest, models
    from rayft.cluster.connect import local_cpus, ray_session
    from rayft.cluster.watchdog import Watchdog

    start = time.perf_counter()
    d = cfg.data
    if not d.train_files:
        raise sources.DataInputError("data.train_files is empty: list at least one input file")
    files, notes = sources.assign_files(d.train_files, d.validation_files, d.test_files)
    data_dir = cfg.run_path / "data"
    _clear(data_dir)
    model_path = models.resolve(cfg.model.base, cfg.model.revision)

    c = cfg.cluster
    with (
        ray_session(
            c.address, num_cpus=local_cpus(c.num_workers, c.cpus_per_worker), dashboard=False
        ),
        # progress: every block a Ray Data execution in this process produces or takes
        Watchdog(c.stall_timeout, "data block", stage="prepare", autoscaling=c.autoscaling) as dog,
    ):
        objective = cfg.training.objective  # grpo reads chat rows as reinforcement prompts
        tokenized = _read_clean_tokenize(files, d, model_path, objective).materialize()
        facts = _collect_cleaned(tokenized)
        marks = [start]
        timings = {"read_validate_clean_tokenize": _lap(marks)}
        _announce_formats(facts["formats"], d.format, objective)
        _progress(
            f"read, validated, cleaned and tokenized {facts['rows_in']} rows "
            f"({len(facts['rejects'])} rejected)",
            timings["read_validate_clean_tokenize"],
        )
        rejects = facts["rejects"]  # the template's refusals too
        _record_rejects(rejects, data_dir, d.on_error)
        kind = _single_kind(facts["kinds"])
        with dog.paused():  # the driver's own work: no Ray Data blocks
            exact, near = dedupe.find_duplicates(
                facts["signatures"],
                d.dedupe.near,
                d.dedupe.near_threshold,
                d.dedupe.num_perm,
                exact_dedupe=d.dedupe.exact,
            )
        timings["dedupe"] = _lap(marks)
        _progress(
            f"dedupe: {len(exact)} exact and {len(near)} near duplicates among "
            f"{len(facts['signatures'])} valid rows",
            timings["dedupe"],
        )
        schema = stages.SCHEMAS[kind]
        drop = frozenset(exact | near)
        stats = _collect_tokenized(tokenized, schema, drop)
        timings["collect"] = _lap(marks)
        splits = write.splits(tokenized, data_dir, schema, stats, drop)
        timings["write"] = _lap(marks)
        _progress(
            "wrote " + ", ".join(f"{s} {stats['rows'][s]} rows" for s in report.SPLITS),
            timings["collect"] + timings["write"],
        )
        packed, packing = {}, {}
        if kind == "sft" and d.pack:
            packed, packing = write.packed(tokenized, data_dir, d.max_seq_len, stats, drop)
        timings["pack"] = _lap(marks)
        if packed:
            counts = ", ".join(f"{s} {n}" for s, n in packing["sequences"].items())
            _progress(f"packed into {d.max_seq_len}-token sequences: {counts}", timings["pack"])

    data_report = {
        "rows_in": facts["rows_in"],
        "rows_out": {s: stats["rows"][s] for s in report.SPLITS},
        "rejected": dict(Counter(r["kind"] for r in rejects)),
        "duplicates_removed": {"exact": len(exact), "near": len(near)},
        "pii_redactions": facts["pii"],
        "overlength": {"dropped": stats["dropped"], "truncated": stats["truncated"]},
        "tokens": {s: stats["tokens"][s] for s in report.SPLITS},
        "packing_efficiency": packing.get("efficiency", 0.0),
        "packing": packing,
        "kind": kind,
        "formats": facts["formats"],
        "tokenizer": cfg.model.base,
        "max_seq_len": d.max_seq_len,
        "seconds": {k: round(v, 2) for k, v in timings.items()},
    }
    report.check_accounting(data_report)
    (data_dir / "data_report.json").write_text(json.dumps(data_report, indent=2) + "\n")
    seconds = time.perf_counter() - start
    report.print_summary(data_report, data_dir, seconds, notes)
    manifest.record_stage(
        cfg.run_path, "prepare", cfg, data_hash=stats["hash"], report=data_report, seconds=seconds
    )
    return DataArtifacts(data_dir, splits, packed, data_report)


def _progress(what: str, seconds: float) -> None:
    """One line when a phase ends: the driver's phases show no Ray Data progress bar."""
    from rich.console import Console

    Console().print(f"[rayft prepare] {what} ({seconds:.1f} s)", markup=False, highlight=False)


def _lap(marks: list[float]) -> float:
    """Seconds since the last mark (and set a new one)."""
    marks.append(time.perf_counter())
    return marks[-1] - marks[-2]


def _record_rejects(rejects: list[dict[str, Any]], data_dir: Path, on_error: str) -> None:
    """Write rejects.jsonl; with data.on_error: fail, stop before anything else is written."""
    report.write_rejects(data_dir / "rejects.jsonl", rejects)
    if rejects and on_error == "fail":
        raise DataValidationError(
            f"{len(rejects)} bad rows (data.on_error: fail, nothing written but "
            f"{data_dir / 'rejects.jsonl'}):\n{report.error_summary(rejects)}\n"
            "Fix the rows, or set data.on_error: skip to leave them out."
        )


def _clear(data_dir: Path) -> None:
    # Ray Data appends files to existing directories: stale splits would mix with new ones.
    for name in ("train.parquet", "validation.parquet", "test.parquet", "packed", write.STAGING):
        shutil.rmtree(data_dir / name, ignore_errors=True)
    for name in ("rejects.jsonl", "data_report.json"):
        (data_dir / name).unlink(missing_ok=True)
    data_dir.mkdir(parents=True, exist_ok=True)


def _read_clean_tokenize(
    files: list[sources.InputFile], d: DataConfig, model_path: str, objective: str
):
    import ray.data
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    parts = []
    for protocol in sorted({f.protocol for f in files}):
        group = [f for f in files if f.protocol == protocol]
        fs = None
        if protocol not in ("file", "local"):
            fs = PyFileSystem(FSSpecHandler(sources.filesystem(protocol)))
        ds = ray.data.read_binary_files(
            [f.path for f in group], include_paths=True, filesystem=fs
        ).map_batches(
            sources.split_files,
            batch_size=1,
            batch_format="pyarrow",
            fn_kwargs={
                "files": {f.path: f for f in group},
                "fmt": d.format,
                "objective": objective,
            },
        )
        parts.append(ds)
    ds = parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]
    # A file arrives as one block; re-block it so the rows are cleaned and tokenized in
    # parallel. Both steps run in the same tasks (Ray Data fuses them).
    return (
        ds.repartition(target_num_rows_per_block=d.batch_size * 4)
        .map_batches(
            stages.validate_clean,
            batch_size=d.batch_size,
            batch_format="pyarrow",
            fn_kwargs=clean_args(d),
        )
        .map_batches(
            stages.tokenize,
            batch_size=d.batch_size,
            batch_format="pyarrow",
            fn_kwargs=tokenize_args(d, model_path),
        )
    )


def clean_args(d: DataConfig) -> dict[str, Any]:
    """The arguments of `stages.validate_clean` for data config `d`."""
    return {
        "normalize": d.normalize,
        "pii_types": list(d.pii.types) if d.pii.enabled else [],
        "num_perm": d.dedupe.num_perm,
        "shingle_size": d.dedupe.shingle_size,
        "near": d.dedupe.near,
    }


def tokenize_args(d: DataConfig, model_path: str) -> dict[str, Any]:
    """The arguments of `stages.tokenize` for data config `d`."""
    return {
        "model_path": model_path,
        "assistant_only": d.assistant_only_loss,
        "max_len": d.max_seq_len,
        "overlength": d.overlength,
        # explicit held-out files replace the fractions
        "validation": 0.0 if d.validation_files else d.split.validation,
        "test": 0.0 if d.test_files else d.split.test,
        "seed": d.split.seed,
    }


def _collect_cleaned(ds) -> dict[str, Any]:
    """The driver's view of leg one: rejects, signatures, formats, kinds and PII counts."""
    rejects, signatures, formats, kinds, pii = [], [], {}, Counter(), Counter()
    rows_in = 0
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        rows_in += batch.num_rows
        for t in stages.PII_TYPES:
            pii[t] += pc.sum(batch[f"pii_{t}"]).as_py() or 0
        small = batch.select(
            ["file", "line", "order", "format", "error_kind", "error_field", "reason", "raw"]
            + ["kind", "id", "minhash"]
        )
        for r in small.to_pylist():
            formats[r["file"]] = r["format"]
            if r["error_kind"] is not None:
                rejects.append(
                    {
                        "file": r["file"],
                        "line": r["line"],
                        "field": r["error_field"],
                        "kind": r["error_kind"],
                        "reason": r["reason"],
                        "row": r["raw"],
                    }
                )
                continue
            kinds[r["kind"]] += 1
            source = f"{r['file']}:{r['line']}"
            signatures.append(((r["order"], r["line"]), source, r["id"], r["minhash"]))
    rejects.sort(key=lambda r: (r["file"], r["line"]))
    return {
        "rows_in": rows_in,
        "rejects": rejects,
        "signatures": [s[1:] for s in sorted(signatures, key=lambda s: s[0])],
        "formats": dict(sorted(formats.items())),
        "kinds": kinds,
        "pii": {t: pii[t] for t in stages.PII_TYPES},
    }


def _announce_formats(formats: dict[str, str], configured: str, objective: str) -> None:
    from rich.console import Console

    how = "detected" if configured == "auto" else "configured"
    for f, fmt in formats.items():
        why = (
            f", as training.objective is {objective}"
            if how == "detected" and fmt == "reinforcement"
            else ""
        )
        Console().print(f"[bold]{f}[/bold]: format {fmt} ({how}{why})")


def _single_kind(kinds: Counter) -> str:
    if len(kinds) > 1:
        raise DataValidationError(
            f"the inputs mix kinds of rows ({dict(kinds)}); one run trains one objective: "
            "prepare them as separate runs"
        )
    if not kinds:
        raise DataValidationError("no valid rows: every input row was rejected (see rejects.jsonl)")
    return next(iter(kinds))


def _collect_tokenized(ds, schema: pa.Schema, drop: frozenset[str]) -> dict[str, Any]:
    """Counts of the valid rows that are not duplicates and the content hash; and those rows
    (`schema` and split) while they stay under DRIVER_TOKENS (`kept` None once they pass it)."""
    rows, tokens, dropped, truncated = Counter(), Counter(), 0, 0
    ids = []
    kept: list[pa.Table] | None = []
    columns = ["id", "source", "split", "num_tokens", "overlength", "error_kind"]
    for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
        if kept is not None:
            kept.append(stages.split_rows(batch, None, [*schema.names, "split"], drop))
        for r in batch.select(columns).to_pylist():
            if r["error_kind"] is not None or r["source"] in drop:
                continue
            if r["overlength"] == "dropped":
                dropped += 1
                continue
            truncated += r["overlength"] == "truncated"
            rows[r["split"]] += 1
            tokens[r["split"]] += r["num_tokens"]
            ids.append(f"{r['split']}:{r['id']}")
        if sum(tokens.values()) > DRIVER_TOKENS:
            kept = None
    # Content-addressed: the same prepared examples give the same hash, wherever they came from.
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
    return {
        "rows": rows,
        "tokens": tokens,
        "dropped": dropped,
        "truncated": truncated,
        "hash": digest,
        "kept": pa.concat_tables(kept).combine_chunks() if kept else None,
    }
