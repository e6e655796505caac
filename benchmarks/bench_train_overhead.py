"""Ray Train overhead: step time of `rayft train` (TorchTrainer, 1 worker, data streamed from Ray
Data, metrics buffered and reported at evaluations and checkpoints) against the same TRL loop in
a plain process reading the same rows from Parquet. tiny-llama on CPU, one run of the script:
the loops take turns for --rounds rounds, each timed by its median step after warm-up, and the
ratio is the median over rounds of the ratio within a round (drift on a shared machine lands
on both sides of a ratio, not between them).

    .venv/bin/python benchmarks/bench_train_overhead.py [--steps 60] [--rounds 3] [--threads N]

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
# Threads of each loop (Ray gives a worker as many as it has CPUs): the machine's cores unless
# --threads leaves some to the rest of the machine (Ray's own processes, for one).
THREADS = os.cpu_count() or 1


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
            "cluster": {"num_workers": 1, "cpus_per_worker": THREADS},
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
    import torch
    from datasets import IterableDataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    from rayft import models
    from rayft.training.data import collator, features
    from rayft.training.driver import _worker_config
    from rayft.training.facts import resolve
    from rayft.training.model import adapter_config, load_base
    from rayft.training.worker import _read_own_shard, _training_args

    torch.set_num_threads(THREADS)  # what Ray sets in a worker with THREADS CPUs
    cfg = _config(run_dir, steps)
    base = models.resolve("tiny-llama")
    wc = _worker_config(cfg, resolve(cfg, None, base), "sft", "sft", None, has_val=False)
    table = pads.dataset(run_dir / "data" / "packed" / "train.parquet").to_table()
    rows = table.select(["input_ids", "labels", "seq_lengths"]).to_pylist()

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
    model = load_base(base, wc["facts"], use_gpu=False)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=IterableDataset.from_generator(endless, features=features("sft")),
        processing_class=tok,
        data_collator=collator(tok.pad_token_id or 0),
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
    cpus = THREADS + 2
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        train(_config(run_dir, steps))
    finally:
        ray.shutdown()
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return step_times([r["time"] for r in rows if "loss" in r])


def plain_in_train_worker(run_dir: Path, steps: int) -> tuple[float, float]:
    """The plain loop as the function of a bare 1-worker TorchTrainer (no Ray Data, no rayft
    callbacks): what Ray Train's worker costs by itself, so the rest of the gap is rayft's own
    path (data streamed from Ray Data, metrics reported)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    here = Path(__file__).resolve().parent
    path = f"{here}{os.pathsep}{here.parent / 'tests'}"
    ray.init(
        address="local",
        num_cpus=THREADS + 2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": path, "TOKENIZERS_PARALLELISM": "false"}},
    )
    try:
        trainer = TorchTrainer(
            _plain_worker,
            train_loop_config={"run_dir": str(run_dir), "steps": steps, "threads": THREADS},
            scaling_config=ScalingConfig(num_workers=1, resources_per_worker={"CPU": THREADS}),
            run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="bench-train-worker-")),
        )
        trainer.fit()
    finally:
        ray.shutdown()
    return tuple(json.loads((run_dir / "worker_step_times.json").read_text()))


def _plain_worker(config: dict) -> None:
    from bench_train_overhead import plain_loop

    from rayft.training.worker import _alone_without_ddp

    _alone_without_ddp()  # as rayft's worker does for a world of one
    global THREADS
    THREADS = config["threads"]
    run_dir = Path(config["run_dir"])  # one machine: the driver reads the file
    times = plain_loop(run_dir, config["steps"])
    (run_dir / "worker_step_times.json").write_text(json.dumps(times))


def main() -> None:
    global THREADS
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="alternating rounds of the three loops; ratios are taken within a round",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=THREADS,
        help="intra-op threads of every loop (default: all cores, as rayft gives one worker)",
    )
    opts = parser.parse_args()
    steps = opts.steps
    THREADS = opts.threads
    from train_data import write_sft

    from rayft import models

    tiny = str(models.pull("tiny-llama"))
    names = ("plain TRL loop", "plain loop in a Train worker", "Ray Train (1 worker)")
    rounds: list[dict[str, tuple[float, float]]] = []
    with tempfile.TemporaryDirectory() as tmp:
        plain_dir = Path(tmp, "plain")
        write_sft(plain_dir, tiny, n_train=512, n_val=0, max_len=256)
        # Alternating rounds: whatever else the machine does drifts over minutes, and one
        # loop timed long after another would carry that drift into their ratio.
        for i in range(opts.rounds):
            ray_dir = Path(tmp, f"ray-{i}")  # a fresh run each round, on the same rows
            write_sft(ray_dir, tiny, n_train=512, n_val=0, max_len=256)
            rounds.append(
                {
                    names[0]: plain_loop(plain_dir, steps),
                    names[1]: plain_in_train_worker(plain_dir, steps),
                    names[2]: ray_loop(ray_dir, steps),
                }
            )
    print(
        f"steps: {steps} (after {WARMUP} warm-up steps), tiny-llama, CPU, batch 4 x 256, "
        f"{opts.rounds} alternating rounds, {THREADS} thread(s) of {os.cpu_count()} cores"
    )
    print("                              median ms/step per round")
    for name in names:
        print(f"{name:28s}  " + "  ".join(f"{r[name][0] * 1000:7.1f}" for r in rounds))

    def ratio(a: str, b: str, i: int) -> list[float]:
        return sorted(r[a][i] / r[b][i] for r in rounds)

    for label, a, b in (
        ("overhead ratio", names[2], names[0]),
        ("  Ray Train's worker alone", names[1], names[0]),
        ("  rayft beyond that", names[2], names[1]),
    ):
        med = ratio(a, b, 0)
        print(
            f"{label:28s}  median of rounds {statistics.median(med):.3f}  "
            f"(rounds: {', '.join(f'{x:.3f}' for x in med)})"
            + ("   goal <= 1.05" if label == "overhead ratio" else "")
        )
    mean = ratio(names[2], names[0], 1)
    print(f"overhead ratio of mean step times (incl. epoch turns): {statistics.median(mean):.3f}")


if __name__ == "__main__":
    main()
