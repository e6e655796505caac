"""Metrics and checkpoints from the workers to Ray Train, and from Ray Train to the run dir.

`RayReport` runs in every worker (an HF TrainerCallback). `ray.train.report` is a collective
in Train V2 (every rank reports at the same points; HF calls on_log/on_save/on_train_end on all
ranks) and costs a synchronisation with the controller, so HF logs are buffered in the worker and
sent in one report at each evaluation, each checkpoint (with the Ray Train checkpoint) and at the
end, instead of one report per step. Rank 0 prints each step as it happens, so progress still
reaches the driver.
`MetricsFile` runs in the Ray Train controller, which Ray pins to the driver's node: it appends
rank 0's buffered rows to `<run_dir>/metrics.jsonl` and prints evaluations and checkpoints.
A restored (or `--resume`d) run logs again the steps after its checkpoint: rows that the dead
run had already flushed for those steps (an evaluation flushes before the checkpoint of the same
step is saved) are replaced, so every step appears once in metrics.jsonl.
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

from rayft.cluster.watchdog import beat
from rayft.training.artifacts import read_metrics


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


class RayReport(TrainerCallback):
    """Report HF logs and checkpoints to Ray Train; optional fault injection for tests."""

    def __init__(
        self,
        fault: dict[str, Any] | None = None,
        max_steps: int = 0,
        objective: str = "sft",
        progress: str | None = None,
    ) -> None:
        self.fault = fault or {}
        self.max_steps = max_steps
        self.objective = objective
        self.last: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []  # logged since the last report
        self.resumed_from: int | None = None  # the checkpoint's step, until the first row
        self.engine: dict[str, Any] = {}  # what the worker trains with, for workers.json
        self.t0 = time.perf_counter()
        self.tokens0: int | None = None
        self.tokens_seen = 0
        self.rank = ray.train.get_context().get_world_rank()
        # The driver's watchdog key (cluster.stall_timeout): rank 0 beats on its progress
        # (model loaded, each step, each evaluation batch, each checkpoint).
        self.progress = progress if self.rank == 0 else None
        beat(self.progress)
        self.node_id = ray.get_runtime_context().get_node_id()
        self.device = _device_name()

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        beat(self.progress)
        self.engine = _engine(model)
        # HF has loaded the checkpoint's trainer state by now: a step above 0 is a resume.
        if state.global_step:
            self.resumed_from = state.global_step
            if self.rank == 0:
                print(f"[rayft train] resumed from the checkpoint of step {state.global_step}")

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = dict(logs or {})
        row: dict[str, Any] = {"step": state.global_step, "time": time.time()}
        if self.resumed_from is not None:  # the first row after a restore says where from
            row["resumed_from"] = self.resumed_from
            self.resumed_from = None
        row.update({k: float(v) for k, v in logs.items() if isinstance(v, (int, float))})
        if "eval_loss" in row and self.objective == "sft":
            # Perplexity is exp(mean token NLL): an SFT loss. A DPO loss is a pairwise
            # preference loss, whose exp means nothing.
            row["eval_perplexity"] = math.exp(min(row["eval_loss"], 50.0))
        # HF counts `input_ids` for SFT (all ranks); TRL's DPOTrainer counts the non-padding
        # tokens of its concatenated chosen+rejected batches itself and logs them as num_tokens
        # (evaluation rows carry the count of the training so far).
        tokens = int(state.num_input_tokens_seen or row.get("num_tokens") or self.tokens_seen)
        self.tokens_seen = tokens
        row["tokens"] = tokens
        if "loss" in row:
            now = time.perf_counter()
            if self.tokens0 is not None and now > self.t0:
                row["tokens_per_s"] = (tokens - self.tokens0) / (now - self.t0)
            self.t0, self.tokens0 = now, tokens
        for key in ("loss", "eval_loss", "eval_reward"):
            if key in row:
                self.last[key] = row[key]
        self.rows.append(row)
        if self.rank == 0 and "loss" in row:
            print(f"[rayft train] step {row['step']}/{self.max_steps} {_shown(row)}", flush=True)
        if "eval_loss" in row or "eval_reward" in row:
            self._report("log")

    def on_train_end(self, args, state, control, **kwargs):
        if self.rows:  # the same on every rank: all log at the same steps
            self._report("log")

    def _report(self, event: str, step: int | None = None, **checkpoint: Any) -> None:
        """One collective report of the buffered rows. A checkpoint report carries the latest
        losses at top level: Ray Train keeps the N best checkpoints by `eval_loss`."""
        rows, self.rows = self.rows, []
        metrics = {"event": event, "rows": rows, "node_id": self.node_id, "device": self.device}
        metrics["engine"] = self.engine
        metrics["peak_memory_gib"] = peak_memory_gib(self.device)
        if step is not None:
            metrics.update(self.last, step=step)
        ray.train.report(metrics, **checkpoint)

    def on_prediction_step(self, args, state, control, **kwargs):
        beat(self.progress)

    def on_step_end(self, args, state, control, **kwargs):
        beat(self.progress)
        kill = self.fault.get("sigkill")
        if kill and _fires(kill, state.global_step):
            # Let the controller collect the reports already queued in this worker first: a
            # report dies with its worker until the controller has polled it.
            time.sleep(5)
            os.kill(os.getpid(), signal.SIGKILL)

    def on_save(self, args, state, control, **kwargs):
        beat(self.progress)
        step = state.global_step
        local = Path(args.output_dir) / f"checkpoint-{step}"
        name = checkpoint_dir_name(step)
        crash = self.fault.get("crash_in_upload")
        upload_fn = None
        if crash and _fires(crash, step):
            upload_fn = _half_upload_then_die(crash["dest"], name)
        self._report(
            "checkpoint",
            step=step,
            checkpoint=ray.train.Checkpoint.from_directory(str(local)),
            checkpoint_dir_name=name,
            checkpoint_upload_fn=upload_fn,
        )


def peak_memory_gib(device: str) -> float:
    """This worker's peak memory so far: on a GPU what torch allocated (the part the plan
    models), on CPU the process's peak resident set (the whole Python process with its
    libraries, which the plan's CPU figure does not model part by part)."""
    import resource

    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**30, 3)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30, 3)


def _engine(model: Any) -> dict[str, Any]:
    """What this worker's training really runs with, as the libraries report it (not as the
    config asked): the DeepSpeed stage and offload accelerate set up, 4-bit layers in the
    model, gradient checkpointing switched on."""
    from accelerate.state import AcceleratorState, DistributedType

    state = AcceleratorState()
    zero: dict[str, Any] = {}
    if state.distributed_type == DistributedType.DEEPSPEED:
        zero = state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    modules = list(model.modules()) if model is not None else []
    return {
        "deepspeed_stage": zero.get("stage") if zero else None,
        "deepspeed_offload": sorted(
            k
            for k in ("offload_optimizer", "offload_param")
            if (zero.get(k) or {}).get("device") not in (None, "none")
        ),
        "quantized_4bit": any(type(m).__name__ == "Linear4bit" for m in modules),
        "gradient_checkpointing": _checkpointing(model),
    }


def _checkpointing(model: Any) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        flag = getattr(model, name, None)
        if flag is not None:
            return bool(flag)
    return False


def _device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(torch.cuda.current_device())
    return "cpu"


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


END_ROW = "train_end.json"  # under the run dir: HF's statistics of the whole training


class MetricsFile(ray.train.UserCallback):
    """Append rank 0's logged metrics to metrics.jsonl; record which nodes the workers ran on."""

    def __init__(self, run_dir: str, max_steps: int) -> None:
        self.run_dir = run_dir
        self.max_steps = max_steps
        self.nodes_written = False
        self.nodes: list[dict[str, Any]] = []
        self.last_step: int | None = None  # the highest step in metrics.jsonl

    def _append(self, rows: list[dict[str, Any]]) -> None:
        # HF's end-of-training row (runtime, mean loss) is no step's: train_summary.json reads
        # it from END_ROW, and every row of metrics.jsonl has a `loss` or an `eval_loss`.
        for row in rows:
            if not _step_row(row):
                (Path(self.run_dir) / END_ROW).write_text(json.dumps(row) + "\n")
        rows = [r for r in rows if _step_row(r)]
        if not rows:
            return
        path = Path(self.run_dir) / "metrics.jsonl"
        if self.last_step is None:
            self.last_step = max((r["step"] for r in read_metrics(path)), default=0)
        # Training rows come once per step in step order, so a training row at or below the
        # last step written means the steps from it on are being replayed after a restore.
        first = next((r["step"] for r in rows if "loss" in r), None)
        if first is not None and first <= self.last_step:
            kept = [r for r in read_metrics(path) if r["step"] < first]
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            tmp.replace(path)
        with open(path, "a") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        self.last_step = max(r["step"] for r in rows)

    def after_report(self, run_context, metrics, checkpoint):
        if not metrics:
            return
        run_dir = Path(self.run_dir)
        if self.nodes_written and all("peak_memory_gib" in m for m in metrics):
            for node, m in zip(self.nodes, metrics, strict=False):  # peaks only grow
                node["peak_memory_gib"] = max(node["peak_memory_gib"], m["peak_memory_gib"])
            (run_dir / "workers.json").write_text(json.dumps(self.nodes, indent=2) + "\n")
        if not self.nodes_written and all("node_id" in m for m in metrics):
            nodes = [
                {
                    "rank": i,
                    "node_id": m["node_id"],
                    "device": m.get("device", "cpu"),
                    **m.get("engine", {}),
                    "peak_memory_gib": m.get("peak_memory_gib", 0.0),
                }
                for i, m in enumerate(metrics)
            ]
            (run_dir / "workers.json").write_text(json.dumps(nodes, indent=2) + "\n")
            self.nodes, self.nodes_written = nodes, True
        rows = metrics[0].get("rows", [])
        if rows:
            self._append(rows)
        for row in rows:
            if "eval_loss" in row or "eval_reward" in row:
                print(
                    f"[rayft train] step {row['step']}/{self.max_steps} {_shown(row)}", flush=True
                )
        if checkpoint is not None:
            step = metrics[0].get("step", "?")
            print(f"[rayft train] step {step}: checkpoint {checkpoint.path}", flush=True)


def _step_row(row: dict[str, Any]) -> bool:
    """A training step's or an evaluation's row (GRPO evaluations may log only eval_reward)."""
    return "loss" in row or "eval_loss" in row or "eval_reward" in row


def _shown(row: dict[str, Any]) -> str:
    return " ".join(
        f"{k} {row[k]:.4g}"
        for k in (
            "loss",
            "reward",
            "eval_loss",
            "eval_reward",
            "eval_perplexity",
            "learning_rate",
            "tokens_per_s",
        )  # fmt: skip
        if k in row
    )
