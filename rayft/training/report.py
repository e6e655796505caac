"""Metrics and checkpoints from the workers to Ray Train, and from Ray Train to the run dir.

`RayReport` runs in every worker (an HF TrainerCallback): each HF log becomes a
`ray.train.report`, each HF checkpoint a Ray Train checkpoint. `ray.train.report` is a collective
in Train V2, so every rank reports at the same points (HF calls on_log/on_save on all ranks).
`MetricsFile` runs in the Ray Train controller, which Ray pins to the driver's node: it appends
rank 0's metrics to `<run_dir>/metrics.jsonl` and prints progress the driver can see.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from pathlib import Path
from typing import Any

import ray.train
from transformers import TrainerCallback


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


class RayReport(TrainerCallback):
    """Report HF logs and checkpoints to Ray Train; optional fault injection for tests."""

    def __init__(self, fault: dict[str, Any] | None = None) -> None:
        self.fault = fault or {}
        self.last: dict[str, float] = {}
        self.t0 = time.perf_counter()
        self.tokens0: int | None = None

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        metrics: dict[str, Any] = {"event": "log", "step": state.global_step, "time": time.time()}
        metrics.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
        if "eval_loss" in metrics:
            metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        tokens = int(state.num_input_tokens_seen or 0)
        metrics["tokens"] = tokens
        if "loss" in metrics:
            now = time.perf_counter()
            if self.tokens0 is not None and now > self.t0:
                metrics["tokens_per_s"] = (tokens - self.tokens0) / (now - self.t0)
            self.t0, self.tokens0 = now, tokens
        for key in ("loss", "eval_loss"):
            if key in metrics:
                self.last[key] = metrics[key]
        metrics["node_id"] = ray.get_runtime_context().get_node_id()
        ray.train.report(metrics)

    def on_step_end(self, args, state, control, **kwargs):
        kill = self.fault.get("sigkill")
        if kill and _fires(kill, state.global_step):
            # Let the controller collect the reports already queued in this worker first: a
            # report dies with its worker until the controller has polled it.
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kwargs):
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        name = checkpoint_dir_name(step)
        metrics = {"event": "checkpoint", "step": step, "tokens": int(state.num_input_tokens_seen)}
        metrics.update(self.last)
        crash = self.fault.get("crash_in_upload")
        upload_fn = None
        if crash and _fires(crash, step):
            upload_fn = _half_upload_then_die(crash["dest"], name)
        ray.train.report(
            metrics,
            checkpoint=ray.train.Checkpoint.from_directory(str(local)),
            checkpoint_dir_name=name,
            checkpoint_upload_fn=upload_fn,
        )


def _fires(spec: dict[str, Any], step: int) -> bool:
    """A fault fires once: at its step, on its rank, if its marker file does not exist yet."""
    if step != spec["step"] or ray.train.get_context().get_world_rank() != spec["rank"]:
        return False
    marker = Path(spec["marker"])
    if marker.exists():
        return False
    marker.write_text(str(step))
    return True


def _half_upload_then_die(dest_root: str, name: str):
    """Copy this rank's files into storage, the last one torn in half, then die: a crash in the
    middle of writing a checkpoint."""

    def upload(checkpoint, _name):
        dest = Path(dest_root) / name
        dest.mkdir(parents=True, exist_ok=True)
        files = sorted(p for p in Path(checkpoint.path).rglob("*") if p.is_file())
        for p in files:
            target = dest / p.relative_to(checkpoint.path)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = p.read_bytes()
            target.write_bytes(data if p != files[-1] else data[: len(data) // 2])
        os._exit(1)

    return upload


class MetricsFile(ray.train.UserCallback):
    """Append rank 0's logged metrics to metrics.jsonl; record which nodes the workers ran on."""

    def __init__(self, run_dir: str, max_steps: int) -> None:
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.nodes_written = False

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        run_dir = Path(self.run_dir)
        if not self.nodes_written and all("node_id" in m for m in metrics):
            nodes = [{"rank": i, "node_id": m["node_id"]} for i, m in enumerate(metrics)]
            (run_dir / "workers.json").write_text(json.dumps(nodes, indent=2) + "\n")
            self.nodes_written = True
        first = metrics[0]
        if first.get("event") == "checkpoint":
            if checkpoint is not None:
                print(
                    f"[rayft train] step {first['step']}: checkpoint {checkpoint.path}", flush=True
                )
            return
        row = {k: v for k, v in first.items() if k not in ("event", "node_id")}
        with open(run_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = " ".join(
            f"{k} {row[k]:.4g}"
            for k in ("loss", "eval_loss", "learning_rate", "tokens_per_s")
            if k in row
        )
        if shown:
            print(f"[rayft train] step {row['step']}/{self.max_steps} {shown}", flush=True)
