"""A running job, seen from the service: Ray's job status, and what the job writes into its run
directory (`metrics.jsonl`, checkpoints, `train_summary.json`, `<job dir>/error.json`) turned
into OpenAI's events, checkpoints, estimated finish, result file and error."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import yaml

from rayft.serving.ab import read_jsonl
from rayft.serving.ft_store import new_id

RESULT_COLUMNS = ("step", "train_loss", "valid_loss", "learning_rate", "tokens")


def model_name(row: dict[str, Any]) -> str:
    return f"ft:{row['model']}:{row['tenant']}:{row['suffix'] or ''}:{row['id']}"


def checkpoint_name(row: dict[str, Any], step: int) -> str:
    return f"{model_name(row)}:ckpt-step-{step}"


def stop(client, submission_id: str | None) -> None:
    if submission_id is None:
        return
    # It ended meanwhile, the cluster forgot it, or the dashboard does not answer (then the
    # job's own end is seen by a later round).
    with contextlib.suppress(Exception):
        client.stop_job(submission_id)


def ray_status(client, submission_id: str) -> tuple[str, str]:
    """(Ray's status name, its message); ("LOST", why) when the cluster does not know the job
    (a 404: it was restarted, or its job history cleared), ("UNKNOWN", why) when the
    dashboard did not answer (a passing error: ask again next round)."""
    try:
        info = client.get_job_info(submission_id)
    except Exception as e:
        if "status code 404" in str(e):
            return "LOST", (
                f"the Ray cluster does not know Ray job {submission_id} (it was restarted or "
                f"its job history was cleared): {str(e)[:300]}"
            )
        return "UNKNOWN", f"{type(e).__name__}: {str(e)[:300]}"
    return str(info.status.value), info.message or ""


def total_steps(job_dir: Path) -> int:
    steps = job_dir / "steps.json"
    if steps.exists():
        return json.loads(steps.read_text())["max_steps"]
    return yaml.safe_load((job_dir / "job.yaml").read_text())["training"]["max_steps"]


def read_rows(run_dir: Path) -> list[dict[str, Any]]:
    return read_jsonl(run_dir / "metrics.jsonl")  # a line cut short by a killed writer skipped


def progress(svc, row: dict[str, Any]) -> None:
    """New metrics rows as events (one per logged step), new checkpoints, estimated finish."""
    run_dir = Path(row["run_dir"])
    rows = read_rows(run_dir)
    seen = min(row["metrics_read"], len(rows))  # a restored run rewrites its replayed rows
    total = total_steps(run_dir.parent)
    for r in rows[seen:]:
        rewards = _rewards(r)  # reinforcement jobs: the grader's mean, as OpenAI names it
        if "loss" in r:
            svc.event(
                row["id"], f"Step {r['step']}/{total}: training loss={r['loss']:.4f}"
                + (f", reward={r['reward']:.4f}" if "reward" in r else ""),
                step=r["step"], total_steps=total, train_loss=r["loss"], **rewards,
            )  # fmt: skip
        elif "eval_loss" in r or "eval_reward" in r:
            shown = (
                f"validation reward={r['eval_reward']:.4f}" if "eval_reward" in r
                else f"validation loss={r['eval_loss']:.4f}"
            )  # fmt: skip
            valid = {"valid_loss": r["eval_loss"]} if "eval_loss" in r else {}
            svc.event(
                row["id"], f"Step {r['step']}/{total}: {shown}",
                step=r["step"], total_steps=total, **valid, **rewards,
            )  # fmt: skip
    values: dict[str, Any] = {"metrics_read": len(rows)}
    steps = [r["step"] for r in rows if "loss" in r]
    if steps and row["started_at"]:
        per_step = (time.time() - row["started_at"]) / max(steps[-1], 1)
        values["estimated_finish"] = int(time.time() + per_step * max(total - steps[-1], 0))
    svc.store.transition(row["id"], ["running"], **values)  # not onto a job cancelled meanwhile
    _checkpoints(svc, row, rows)


def _checkpoints(svc, row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    """The checkpoints on disk as the job's: new ones added, ones that training removed
    (training.keep_checkpoints) dropped, metrics filled in once their step is logged."""
    known = {c["path"]: c for c in svc.store.where("checkpoints", "job_id", [row["id"]])}
    found = Path(row["run_dir"]).glob("checkpoints/*/checkpoint-*/adapter_model.safetensors")
    on_disk = {str(w.parent) for w in found}
    for path, c in known.items():
        if path not in on_disk:
            svc.store.delete("checkpoints", c["id"])
        elif "train_loss" not in c["metrics"]:
            svc.store.update("checkpoints", c["id"], metrics=step_metrics(rows, c["step_number"]))
    for path in sorted(on_disk - set(known)):
        step = int(Path(path).name.removeprefix("checkpoint-"))
        svc.store.add(
            "checkpoints", id=new_id("checkpoints"), job_id=row["id"], step_number=step,
            metrics=step_metrics(rows, step), name=checkpoint_name(row, step), path=path,
        )  # fmt: skip


def step_metrics(rows: list[dict[str, Any]], step: int) -> dict[str, Any]:
    out: dict[str, Any] = {"step": step}
    for r in rows:
        if r.get("step") == step and "loss" in r:
            out["train_loss"] = r["loss"]
        if r.get("step") == step and "eval_loss" in r:
            out["valid_loss"] = out["full_valid_loss"] = r["eval_loss"]
        if r.get("step") == step:
            out.update(_rewards(r))
    return out


def _rewards(r: dict[str, Any]) -> dict[str, float]:
    out = {}
    if "reward" in r:
        out["train_reward_mean"] = r["reward"]
    if "eval_reward" in r:
        out["valid_reward_mean"] = r["eval_reward"]
    return out


def error_of(job_dir: Path, ray_message: str) -> dict[str, Any]:
    path = job_dir / "error.json"
    if path.exists():
        return json.loads(path.read_text())
    return {
        "code": "training_failed",
        "param": None,
        "message": f"the job's Ray job failed: {ray_message[:1000]} (`ray job logs` has its log)",
    }


def results_csv(rows: list[dict[str, Any]]) -> str:
    """The metrics per step, OpenAI's result file (columns: RESULT_COLUMNS)."""
    by_step: dict[int, dict[str, Any]] = {}
    for r in rows:
        if "step" not in r:
            continue
        out = by_step.setdefault(r["step"], {"step": r["step"]})
        if "loss" in r:
            out.update(train_loss=r["loss"], learning_rate=r.get("learning_rate"))
            out["tokens"] = r.get("tokens")
        if "eval_loss" in r:
            out["valid_loss"] = r["eval_loss"]
    buf = io.StringIO()
    w = csv.DictWriter(buf, RESULT_COLUMNS, extrasaction="ignore")
    w.writeheader()
    for step in sorted(by_step):
        w.writerow(by_step[step])
    return buf.getvalue()


def trained_tokens(run_dir: Path) -> int | None:
    summary = run_dir / "train_summary.json"
    if not summary.exists():
        return None
    return json.loads(summary.read_text()).get("tokens")
