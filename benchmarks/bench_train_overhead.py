"""Ray Train overhead: step time of `rayft train` (TorchTrainer, 1 worker, data streamed from Ray
Data, a `ray.train.report` per step) against the same TRL loop in a plain process reading the
same rows from Parquet. tiny-llama on CPU, one run, median over steps after warm-up.

    .venv/bin/python benchmarks/bench_train_overhead.py [--steps 60]

Goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

WARMUP = 5


def _config(run_dir: Path, steps: int):
    from rayft.config import JobConfig

    return JobConfig.model_validate(
        {
            "name": "bench",
            "run_dir": str(run_dir),
            "model": {"base": "tiny-llama"},
            "training": {
                "max_steps": steps,
                "learning_rate": 1e-3,
                "per_device_batch_size": 4,
                "lora": {"dropout": 0.0},
            },
            "cluster": {"num_workers": 1, "cpus_per_worker": 1},
        }
    )


def step_times(times: list[float]) -> float:
    """Median seconds per step from consecutive per-step log timestamps, after warm-up."""
    diffs = [b - a for a, b in zip(times, times[1:], strict=False)][WARMUP:]
    return statistics.median(diffs)


def plain_loop(run_dir: Path, steps: int) -> float:
    """The worker's TRL loop without Ray: same args, model, collator, rows."""
    import pyarrow.dataset as pads
    from datasets import IterableDataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from rayft import models
    from rayft.training.data import collate_padding_free, features
    from rayft.training.driver import _worker_config
    from rayft.training.model import adapter_config, compute_dtype, load_base
    from rayft.training.worker import _read_own_shard, _training_args

    cfg = _config(run_dir, steps)
    base = models.resolve("tiny-llama")
    wc = _worker_config(cfg, base, "sft", "sft", None, has_val=False)
    table = pads.dataset(run_dir / "data" / "packed" / "train.parquet").to_table()
    rows = table.select(["input_ids", "labels", "position_ids"]).to_pylist()

    def endless():
        while True:
            yield from rows

    times: list[float] = []

    class Clock(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            times.append(time.time())

    args = _training_args("sft", wc, tempfile.mkdtemp(prefix="bench-plain-"))
    args.save_strategy = "no"
    tok = AutoTokenizer.from_pretrained(base)
    model = load_base(base, "lora", compute_dtype("auto", False), wc["quant"], 0, False)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=IterableDataset.from_generator(endless, features=features("sft")),
        processing_class=tok,
        data_collator=collate_padding_free,
        peft_config=adapter_config("lora", wc["lora"]),
        callbacks=[Clock()],
    )
    _read_own_shard(trainer)
    trainer.train()
    return step_times(times)


def ray_loop(run_dir: Path, steps: int) -> float:
    import ray

    from rayft.training import train

    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        train(_config(run_dir, steps))
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return step_times([r["time"] for r in rows if "loss" in r])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    steps = parser.parse_args().steps

    from train_data import write_sft

    from rayft import models

    tiny = str(models.pull("tiny-llama"))
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, ray_dir = Path(tmp, "plain"), Path(tmp, "ray")
        for d in (plain_dir, ray_dir):
            write_sft(d, tiny, n_train=512, n_val=0, max_len=256)
        t_plain = plain_loop(plain_dir, steps)
        t_ray = ray_loop(ray_dir, steps)
    print(f"steps: {steps} (median after {WARMUP} warm-up steps), tiny-llama, CPU, batch 4 x 256")
    print(f"plain TRL loop:      {t_plain * 1000:8.1f} ms/step")
    print(f"Ray Train (1 worker): {t_ray * 1000:8.1f} ms/step")
    print(f"overhead ratio:      {t_ray / t_plain:8.3f}  (goal <= 1.05)")


if __name__ == "__main__":
    main()
