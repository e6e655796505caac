"""Report plots as base64 PNG, so report.html is one self-contained file."""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on cluster nodes and CI
import matplotlib.pyplot as plt  # noqa: E402


def _png(fig: plt.Figure) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def read_curves(metrics_file: Path, keys: tuple[str, ...]) -> dict[str, list[tuple[int, float]]]:
    """Each of `keys` by step from metrics.jsonl; empty when there is none.

    A resumed run logs the steps after its checkpoint again: the last value of a step wins.
    """
    by_step: dict[str, dict[int, float]] = {key: {} for key in keys}
    if metrics_file.exists():
        for line in metrics_file.read_text().splitlines():
            row = json.loads(line) if line.strip() else {}
            for key, points in by_step.items():
                if row.get(key) is not None and row.get("step") is not None:
                    points[int(row["step"])] = float(row[key])
    return {key: sorted(points.items()) for key, points in by_step.items()}


def read_loss_curves(metrics_file: Path) -> dict[str, list[tuple[int, float]]]:
    return read_curves(metrics_file, ("loss", "eval_loss"))


def _curves_plot(curves: dict[str, list[tuple[int, float]]], labels: dict, ylabel: str):
    """The training curve as a line, the held-out one (logged at evaluations) with markers."""
    if not any(curves.values()):
        return None
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for key, points in curves.items():
        if points:
            steps, values = zip(*sorted(points), strict=True)
            ax.plot(
                steps, values, marker="o" if key.startswith("eval_") else None, label=labels[key]
            )
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    return _png(fig)


def loss_plot(curves: dict[str, list[tuple[int, float]]]) -> str | None:
    return _curves_plot(curves, {"loss": "training loss", "eval_loss": "validation loss"}, "loss")


def reward_plot(curves: dict[str, list[tuple[int, float]]]) -> str | None:
    """GRPO: the mean reward of each step's rollouts and the held-out `eval_reward`."""
    labels = {"reward": "training reward (rollout mean)", "eval_reward": "held-out reward"}
    return _curves_plot(curves, labels, "grader reward")


def delta_plot(comparisons: dict[str, dict[str, dict]]) -> str | None:
    """One panel per metric: each candidate's mean difference to base with its 95% CI."""
    metrics = sorted({m for per in comparisons.values() for m in per})
    if not metrics:
        return None
    cands = list(comparisons)
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(7, 0.5 + 0.8 * len(metrics) * max(1, len(cands) / 2))
    )
    axes = [axes] if len(metrics) == 1 else list(axes)
    for ax, metric in zip(axes, metrics, strict=True):
        for y, cand in enumerate(cands):
            c = comparisons[cand].get(metric)
            if c is None:
                continue
            err = [[c["delta"] - c["ci_low"]], [c["ci_high"] - c["delta"]]]
            ax.errorbar([c["delta"]], [y], xerr=err, fmt="o", capsize=4)
        ax.axvline(0, color="grey", lw=1)
        ax.set_yticks(range(len(cands)), cands)
        ax.set_ylim(-0.7, len(cands) - 0.3)
        ax.set_title(f"{metric}: candidate − base (95% CI)", fontsize=9, loc="left")
    fig.tight_layout()
    return _png(fig)
