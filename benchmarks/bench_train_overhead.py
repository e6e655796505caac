"""Ray Train overhead: step time of `rayft train` (TorchTrainer, 1 worker, data streamed from Ray
Data, metrics buffered and reported at evaluations and checkpoints) against the same TRL loop in
a plain process reading the same rows from Parquet. tiny-llama on CPU, one run, median over steps after warm-up.

    .venv/bin/python benchmarks/bench_train_overhead.py [--steps 60]

Goal: ratio <= 1.05.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
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
            # The worker gets the machine's cores, as the plain loop does: Ray sets a worker's
            # OMP/torch threads to its CPU count, so 1 CPU would halve its compute.
            "cluster": {"num_workers": 1, "cpus_per_worker": os.cpu_count() or 1},
        }
    )


def step_times(times: list[float]) -> tuple[float, float]:
    """Median and mean seconds per step from per-step log timestamps, after warm-up. The mean
    includes what happens between epochs (a new Ray Data pass, when the shard is not cached)."""
    diffs = [b - a for a, b in zip(times, times[1:], strict=False)][WARMUP:]
    return statistics.median(diffs), statistics.fmean(diffs)


def plain_loop(run_dir: Path, steps: int) -> tuple[float, float]:
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


def ray_loop(run_dir: Path, steps: int) -> tuple[float, float]:
    import ray

    from rayft.training import train

    # Logical CPUs beyond the worker's, for the Ray Data read tasks that feed it.
    cpus = (os.cpu_count() or 1) + 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        train(_config(run_dir, steps))
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return step_times([r["time"] for r in rows if "loss" in r])


def plain_ddp_loop(run_dir: Path, steps: int) -> tuple[float, float]:
    """The plain loop in a fresh process with a gloo process group of one, so that HF wraps the
    model in DistributedDataParallel as it does inside a Ray Train worker: splits the overhead
    into what DDP costs and what Ray itself costs."""
    env = dict(
        os.environ,
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(_free_port()),
        RANK="0",
        WORLD_SIZE="1",
        LOCAL_RANK="0",
        LOCAL_WORLD_SIZE="1",
    )
    out = subprocess.run(
        [sys.executable, __file__, "--plain-ddp", str(run_dir), "--steps", str(steps)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return tuple(json.loads(out.strip().splitlines()[-1].removeprefix("PLAIN_DDP ")))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--plain-ddp", help=argparse.SUPPRESS)  # the child of plain_ddp_loop
    opts = parser.parse_args()
    steps = opts.steps
    if opts.plain_ddp:
        import torch.distributed as dist

        dist.init_process_group("gloo")
        print(f"PLAIN_DDP {json.dumps(plain_loop(Path(opts.plain_ddp), steps))}")
        return

    from train_data import write_sft

    from rayft import models

    tiny = str(models.pull("tiny-llama"))
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir, ray_dir = Path(tmp, "plain"), Path(tmp, "ray")
        for d in (plain_dir, ray_dir):
            write_sft(d, tiny, n_train=512, n_val=0, max_len=256)
        t_plain = plain_loop(plain_dir, steps)
        t_ddp = plain_ddp_loop(plain_dir, steps)
        t_ray = ray_loop(ray_dir, steps)
    print(f"steps: {steps} (after {WARMUP} warm-up steps), tiny-llama, CPU, batch 4 x 256")
    print("                              median ms/step   mean ms/step")
    for name, (med, mean) in (
        ("plain TRL loop", t_plain),
        ("plain loop + DDP of one", t_ddp),
        ("Ray Train (1 worker)", t_ray),
    ):
        print(f"{name:28s}  {med * 1000:14.1f}  {mean * 1000:13.1f}")
    print(f"overhead ratio (median): {t_ray[0] / t_plain[0]:.3f}   (goal <= 1.05)")
    print(f"overhead ratio (mean):   {t_ray[1] / t_plain[1]:.3f}")
    print(f"  DDP alone (median):    {t_ddp[0] / t_plain[0]:.3f}")
    print(f"  Ray beyond DDP:        {t_ray[0] / t_ddp[0]:.3f}")


if __name__ == "__main__":
    main()
