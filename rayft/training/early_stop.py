"""`training.early_stopping`: stop when the held-out metric stops improving.

The rule is one pure function (`walk`), used by the callback in every worker while training and
by the driver afterwards to write what happened into train_summary.json from metrics.jsonl, so
the two can never tell different stories. Every rank sees the same evaluation (losses and grader
rewards are gathered across workers before they are logged), so every rank stops at the same
step: a rank that stopped alone would leave the others waiting in a collective.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from transformers import TrainerCallback
from transformers.trainer_callback import ExportableState


def metric_for(objective: str, metric: str) -> tuple[str, str]:
    """(the logged key, "min" or "max") that must improve."""
    if metric == "auto":
        metric = "eval_reward" if objective == "grpo" else "eval_loss"
    return metric, "max" if metric == "eval_reward" else "min"


@dataclass
class Verdict:
    metric: str
    mode: str
    best: float | None = None
    best_step: int | None = None
    since_best: int = 0  # evaluations in a row without an improvement
    stopped_at: int | None = None  # the step whose evaluation ended the run

    def reason(self, patience: int, min_delta: float) -> str | None:
        if self.stopped_at is None:
            return None
        word = "fall" if self.mode == "min" else "rise"
        return (
            f"{self.metric} did not {word} by more than {min_delta:g} in {patience} "
            f"evaluation(s) after its best, {self.best:.4g} at step {self.best_step}"
        )


def step(v: Verdict, value: float, at: int, patience: int, min_delta: float) -> Verdict:
    """One evaluation: an improvement resets the count, anything else adds to it."""
    improved = v.best is None or (
        value < v.best - min_delta if v.mode == "min" else value > v.best + min_delta
    )
    if improved:
        v.best, v.best_step, v.since_best = value, at, 0
    else:
        v.since_best += 1
        if v.since_best >= patience and v.stopped_at is None:
            v.stopped_at = at
    return v


def walk(rows: list[dict[str, Any]], metric: str, mode: str, patience: int, min_delta: float):
    """The verdict after the evaluation rows of a metrics.jsonl, in step order."""
    v = Verdict(metric, mode)
    for row in rows:
        if metric in row and v.stopped_at is None:
            step(v, float(row[metric]), int(row["step"]), patience, min_delta)
    return v


def summary(rows: list[dict[str, Any]], objective: str, es: dict[str, Any] | None) -> dict | None:
    """train_summary.json's `early_stopping`: whether the run stopped, where, and why."""
    if not es:
        return None
    metric, mode = metric_for(objective, es["metric"])
    v = walk(rows, metric, mode, es["patience"], es["min_delta"])
    return {
        **asdict(v),
        "stopped": v.stopped_at is not None,
        "patience": es["patience"],
        "min_delta": es["min_delta"],
        "reason": v.reason(es["patience"], es["min_delta"]),
    }


def adapter_checkpoint(result, es, objective: str):
    """The checkpoint that becomes the adapter: the latest, or with early stopping the best by
    the watched metric among those Ray Train kept (it keeps the best ones by that metric)."""
    if es is None or not result.best_checkpoints:
        return result.checkpoint
    metric, mode = metric_for(objective, es.metric)
    scored = [(c, m[metric]) for c, m in result.best_checkpoints if m.get(metric) is not None]
    if not scored:
        return result.checkpoint
    pick = min if mode == "min" else max
    return pick(scored, key=lambda cm: cm[1])[0]


class EarlyStop(TrainerCallback, ExportableState):
    """Sets `should_training_stop` after `patience` evaluations without an improvement. The
    evaluation's checkpoint is saved after its log (save_steps == eval_steps), so the run ends
    with the best checkpoint kept by Ray Train's ranking, which the driver turns into the
    adapter."""

    def __init__(self, metric: str, mode: str, patience: int, min_delta: float, **kept: Any):
        self.metric, self.mode = metric, mode
        self.patience, self.min_delta = patience, min_delta
        self.verdict = Verdict(metric, mode, **kept)

    def on_log(self, args, state, control, logs=None, **kwargs):
        # The log, not on_evaluate: GRPO adds its eval_reward to the logged row only.
        if not logs or self.metric not in logs or self.verdict.stopped_at is not None:
            return
        step(self.verdict, float(logs[self.metric]), state.global_step, self.patience,
             self.min_delta)  # fmt: skip
        if self.verdict.stopped_at is not None:
            control.should_training_stop = True
            if state.is_world_process_zero:
                print(
                    f"[rayft train] early stop at step {state.global_step}: "
                    f"{self.verdict.reason(self.patience, self.min_delta)}",
                    flush=True,
                )

    def state(self) -> dict:
        kept = asdict(self.verdict)
        kept.pop("metric"), kept.pop("mode")
        return {
            "args": {
                "metric": self.metric,
                "mode": self.mode,
                "patience": self.patience,
                "min_delta": self.min_delta,
                **kept,
            },
            "attributes": {},
        }
