"""`rayft prepare` throughput and packing efficiency, measured in one run on this machine.

    .venv/bin/python benchmarks/bench_prepare.py [--rows 30000]

1. Throughput: a synthetic support set (the demo generator, --rows rows) through the whole
   pipeline (validate, clean, PII, exact + near dedupe, split, template, tokenize, pack, write)
   with SmolLM2's tokenizer, against a raw fast-tokenizer batch encode of the same rendered
   text. Ratio = raw encode time / prepare time (the same tokens in both). Goal >= 0.7.
   Ray is started (as `rayft prepare` starts it) before the clock: its start-up is not counted.
   Also printed: what the pipeline's own batch functions take a row on one core without Ray
   (a sample of the same rows), and the ratio that leaves if Ray and the driver cost nothing.
2. Packing efficiency (real tokens / capacity of the emitted sequences) on the demo data and on
   a mixed-length synthetic set. Goal >= 0.97.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VOCAB = (
    "sea river mountain cloud order refund parcel window garden lamp coffee paper train city "
    "music light stone bridge market winter summer letter answer question"
)


def _generator():
    spec = importlib.util.spec_from_file_location("generate", ROOT / "examples/data/generate.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _config(run_dir: Path, files: list[str], max_seq_len: int, **data):
    from rayft.config import JobConfig

    return JobConfig.model_validate(
        {
            "run_dir": str(run_dir),
            "model": {"base": "smollm2-135m-instruct"},
            "data": {"train_files": files, "max_seq_len": max_seq_len, "on_error": "skip", **data},
        }
    )


def raw_encode_seconds(model_path: str, rows: list[dict]) -> tuple[float, int]:
    """Seconds and tokens of one batched encode of the rendered conversations."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path)
    texts = [tok.apply_chat_template(r["messages"], tokenize=False) for r in rows]
    start = time.perf_counter()
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    return time.perf_counter() - start, sum(map(len, ids))


def per_row_work(model_path: str, path: Path, sample: int) -> dict[str, float]:
    """Seconds a row of the pipeline's own batch functions take on one core without Ray, on the
    first `sample` rows of `path`: splitting the file into rows, validating and cleaning
    (dedupe signatures included), templating and tokenizing. What prepare cannot go below
    however little Ray and the driver cost."""
    import pyarrow as pa

    from rayft.data import pipeline, sources, stages

    d = _config(path.parent, [str(path)], 512).data  # as the timed run is configured
    (f,), _ = sources.assign_files([str(path)], [], [])
    clean, tok = pipeline.clean_args(d), pipeline.tokenize_args(d, model_path)
    lines = path.open("rb").readlines()

    def rows(n: int) -> pa.Table:
        data = pa.table({"bytes": [b"".join(lines[:n])], "path": [f.path]})
        return sources.split_files(data, {f.path: f}, d.format)

    before = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core, as in a data worker
    try:
        # the tokenizer loaded outside the clock, as a worker keeps it from batch to batch
        stages.tokenize(stages.validate_clean(rows(1), **clean), **tok)
        marks = [time.process_time()]
        split = rows(sample)
        marks.append(time.process_time())
        cleaned = stages.validate_clean(split, **clean)
        marks.append(time.process_time())
        stages.tokenize(cleaned, **tok)
        marks.append(time.process_time())
    finally:
        if before is None:
            os.environ.pop("TOKENIZERS_PARALLELISM")
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = before
    names = ("split into rows", "validate + clean + sign", "template + tokenize")
    return {
        n: (b - a) / split.num_rows for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)
    }


def mixed_length_rows(n: int, seed: int = 0) -> list[dict]:
    """Plain-text rows whose lengths spread log-uniformly from ~10 to ~900 tokens."""
    rng, words = random.Random(seed), VOCAB.split()
    rows = []
    for i in range(n):
        n = int(round(10 ** rng.uniform(1, 2.9)))
        rows.append({"text": f"Note {i}: " + " ".join(rng.choice(words) for _ in range(n))})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=30000, help="synthetic chat rows")
    parser.add_argument("--mixed-rows", type=int, default=4000, help="mixed-length text rows")
    args = parser.parse_args()

    from rayft import models
    from rayft.cluster.connect import ray_session
    from rayft.data import prepare

    model_path = models.resolve("smollm2-135m-instruct")
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-"))
    rows = _generator().generate(args.rows, seed=123)
    big = work / "synthetic.jsonl"
    big.write_text("".join(json.dumps(r) + "\n" for r in rows))
    raw_s, raw_tokens = raw_encode_seconds(model_path, rows)
    per_row = per_row_work(model_path, big, min(args.rows, 8192))
    mixed = work / "mixed.jsonl"
    mixed.write_text("".join(json.dumps(r) + "\n" for r in mixed_length_rows(args.mixed_rows)))

    # The embedded Ray as `rayft prepare` starts it (its worker environment included), started
    # before the clock: its fixed start-up is not part of the pipeline.
    with ray_session(num_cpus=os.cpu_count(), dashboard=False):
        start = time.perf_counter()
        big_report = prepare(_config(work / "big", [str(big)], 512)).report
        prep_s = time.perf_counter() - start
        demo_report = prepare(
            _config(work / "demo", [str(ROOT / "examples/data/support.jsonl")], 512)
        ).report
        mixed_report = prepare(
            _config(work / "mixed", [str(mixed)], 1024, split={"validation": 0.0, "test": 0.0})
        ).report

    raw_tps, prep_tps = raw_tokens / raw_s, raw_tokens / prep_s
    print("\n=== bench_prepare (SmolLM2-135M tokenizer, this machine, one run)")
    print(f"synthetic chat rows        {args.rows}")
    print(f"raw batch encode           {raw_tokens} tokens in {raw_s:.2f} s = {raw_tps:,.0f} tok/s")
    print(
        f"rayft prepare (end to end) {raw_tokens} tokens in {prep_s:.2f} s = {prep_tps:,.0f} tok/s"
    )
    print(f"throughput ratio           {prep_tps / raw_tps:.3f}  (goal >= 0.7)")
    cores = os.cpu_count() or 1
    floor_s = sum(per_row.values()) * args.rows / cores
    print(
        f"  without Ray, one core, first {min(args.rows, 8192)} rows (us a row): "
        + ", ".join(f"{k} {v * 1e6:.0f}" for k, v in per_row.items())
        + f"; the raw encode: {raw_s / args.rows * cores * 1e6:.0f} us a row on one of {cores}"
    )
    print(
        f"  ceiling of the ratio with that work spread over {cores} cores and Ray, dedupe, "
        f"pack and write free: {raw_s / floor_s:.3f}"
    )
    print(
        f"  prepare kept {sum(big_report['rows_out'].values())} rows; "
        f"duplicates removed {big_report['duplicates_removed']}"
    )
    print(f"  prepare phases (s): {big_report['seconds']}")
    for name, rep in (
        ("demo data", demo_report),
        ("synthetic chat", big_report),
        ("mixed-length text", mixed_report),
    ):
        print(
            f"packing efficiency {name:18s} {rep['packing_efficiency']:.4f}  "
            f"sequences={rep['packing']['sequences']} max_seq_len={rep['max_seq_len']} (goal >= 0.97)"
        )


if __name__ == "__main__":
    main()
