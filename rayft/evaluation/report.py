"""Write report.json, report.md and report.html, and print the console summary."""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def _fmt(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"


def _row(metric: str, c: dict[str, Any]) -> list[str]:
    better = "↑" if c["higher_is_better"] else "↓"
    return [
        f"{metric} {better}",
        _fmt(c["base"]),
        _fmt(c["candidate"]),
        f"{c['delta']:+.3g}",
        f"[{_fmt(c['ci_low'])}, {_fmt(c['ci_high'])}]",
        f"{c['p_value']:.3g}",
        f"{c['wins']}/{c['ties']}/{c['losses']}",
    ]


_HEADER = ["metric", "base", "candidate", "delta", "95% CI", "p", "win/tie/loss"]


def _significant(c: dict[str, Any]) -> bool:
    return c["p_value"] < 0.05 and (c["ci_low"] > 0 or c["ci_high"] < 0)


def _lm_eval_rows(report: dict[str, Any], cand: str) -> list[tuple[list[str], bool]]:
    """(`<task> <metric>` row, significant) of one candidate: paired where the task scores
    each document; the two scores and their difference otherwise (corpus metrics, groups)."""
    rows = []
    for task, t in ((report.get("lm_eval") or {}).get("tasks") or {}).items():
        paired = t["comparisons"].get(cand, {})
        for metric, base in t["metrics"]["base"].items():
            name = f"{task} {metric}"
            if metric in paired:
                rows.append((_row(name, paired[metric]), _significant(paired[metric])))
                continue
            theirs = t["metrics"][cand].get(metric)
            delta = theirs - base if theirs is not None and base is not None else None
            arrow = {True: " ↑", False: " ↓"}.get(t["higher_is_better"].get(metric), "")
            shown = "—" if delta is None else f"{delta:+.3g}"
            rows.append(([name + arrow, _fmt(base), _fmt(theirs), shown, "—", "—", "—"], False))
    return rows


def _lm_eval_note(report: dict[str, Any]) -> str:
    tasks = (report.get("lm_eval") or {}).get("tasks") or {}
    return "lm-eval documents per task: " + ", ".join(
        f"{task} {t['n'] if t['n'] is not None else '—'} ({t['num_fewshot']}-shot)"
        for task, t in tasks.items()
    )


def read_training(run_dir: Path) -> dict[str, Any] | None:
    """What train_summary.json says that changes how to read the eval: GRPO's rewards and
    whether early stopping made an earlier checkpoint the adapter. None before training."""
    path = run_dir / "train_summary.json"
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    return {"rewards": summary.get("rewards"), "early_stopping": summary.get("early_stopping")}


def _training_notes(report: dict[str, Any]) -> list[str]:
    """Sentences on the training run: early stop, GRPO rewards."""
    training = report.get("training") or {}
    notes = []
    stop = training.get("early_stopping") or {}
    if stop.get("stopped"):
        notes.append(
            f"Training stopped early at step {stop['stopped_at']}: {stop['reason']}. The run's "
            f"adapter is the checkpoint of step {stop['best_step']} (the best {stop['metric']}), "
            "not that of the last step."
        )
    if r := training.get("rewards"):
        notes.append(
            f"Training reward (grader mean per step): {_fmt(r.get('first_quarter_mean'))} over "
            f"the first quarter of the steps, {_fmt(r.get('last_quarter_mean'))} over the last; "
            f"held-out eval_reward {_fmt(r.get('eval_first'))} at the first evaluation, "
            f"{_fmt(r.get('eval_last'))} at the last; {_fmt(r.get('grader_errors'))} grader "
            "errors in training."
        )
    return notes


def _grader_note(report: dict[str, Any]) -> str | None:
    """The grader, each arm's mean and how many of its answers the grader failed on."""
    g = report.get("grader")
    if not g:
        return None
    arms = "; ".join(
        f"{arm} mean {_fmt(a['mean'])}, {a['errors']}/{a['n']} errors"
        + (f" (first: {a['error_reasons'][0]})" if a["error_reasons"] else "")
        for arm, a in g["arms"].items()
    )
    return (
        f"Grader {g['name']} ({g['type']}, from {g['source']}; row {g['metric']} in the tables; "
        f"a sample it fails on scores 0): {arms}."
    )


def _notes(report: dict[str, Any]) -> list[str]:
    return [*_training_notes(report), *filter(None, [_grader_note(report)])]


def write_json(report: dict[str, Any], out: Path) -> Path:
    path = out / "report.json"
    path.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return path


def write_markdown(report: dict[str, Any], out: Path) -> Path:
    lines = [f"# Evaluation: {report['run_dir']}", ""]
    lines.append(
        f"{report['n_examples']} test examples; tests: exact McNemar (binary metrics), Wilcoxon "
        "signed-rank (continuous); 95% CIs by paired bootstrap. ↑ higher is better, ↓ lower."
    )
    for note in _notes(report):
        lines += ["", note]
    for cand, metrics in report["comparisons"].items():
        lines += ["", f"## {cand} vs base", "", "| " + " | ".join(_HEADER) + " |"]
        lines.append("|" + "---|" * len(_HEADER))
        for metric, c in metrics.items():
            lines.append("| " + " | ".join(_row(metric, c)) + " |")
        if rows := _lm_eval_rows(report, cand):
            lines += ["", f"### {cand} vs base: lm-eval tasks", "", _lm_eval_note(report), ""]
            lines += ["| " + " | ".join(_HEADER) + " |", "|" + "---|" * len(_HEADER)]
            lines += ["| " + " | ".join(row) + " |" for row, _ in rows]
    lines += ["", "## Arms", ""]
    for name, arm in report["arms"].items():
        where = arm["adapter"] or arm["model"]
        ppl = arm["metrics"].get("perplexity")  # none without reference answers (prompt rows)
        lines.append(
            f"- **{name}**: `{where}`" + ("" if ppl is None else f" — perplexity {_fmt(ppl)}")
        )
    lines += ["", "Plots and examples where the arms differ: report.html.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>" for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;
vertical-align:top;text-align:left}td{white-space:pre-wrap;font-size:90%}th{background:#f3f3f3}"""


def write_html(
    report: dict[str, Any], out: Path, plots: dict[str, str | None], max_examples: int
) -> Path:
    e = html.escape
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>rayft eval: {e(report['run_dir'])}"
        f"</title><style>{_CSS}</style></head><body>",
        f"<h1>Evaluation of {e(report['run_dir'])}</h1>",
        f"<p>{report['n_examples']} test examples. Binary metrics: exact McNemar test; continuous: "
        "Wilcoxon signed-rank; 95% confidence intervals by paired bootstrap. ↑ higher is better, "
        "↓ lower is better.</p>",
        *(f"<p>{e(note)}</p>" for note in _notes(report)),
    ]
    for cand, metrics in report["comparisons"].items():
        parts.append(f"<h2>{e(cand)} vs base</h2>")
        parts.append(_table(_HEADER, [_row(m, c) for m, c in metrics.items()]))
        if rows := _lm_eval_rows(report, cand):
            parts.append(f"<h3>{e(cand)} vs base: lm-eval tasks</h3>")
            parts.append(f"<p>{e(_lm_eval_note(report))}</p>")
            parts.append(_table(_HEADER, [row for row, _ in rows]))
    titles = {
        "loss": "Training and validation loss",
        "rewards": "GRPO reward: training rollouts per step and held-out at evaluations",
        "deltas": "Differences with 95% CIs",
    }
    for key, title in titles.items():
        if key == "rewards" and not plots.get(key):
            continue  # only GRPO runs log rewards
        parts.append(f"<h2>{title}</h2>")
        if plots.get(key):
            parts.append(f"<img alt='{key}' src='data:image/png;base64,{plots[key]}'>")
        else:
            parts.append("<p>No data (metrics.jsonl missing or empty).</p>")
    arms = list(report["arms"])
    differ = [x for x in report["examples"] if len({x["answers"][a] for a in arms}) > 1]
    parts.append(
        f"<h2>Examples where the arms differ ({len(differ)} of {report['n_examples']}, "
        f"first {min(len(differ), max_examples)} shown)</h2>"
    )
    # Prompt rows (grpo data) have no reference answer: their item is what the grader read.
    given = "reference" if all(x["reference"] is not None for x in differ) else "item"
    rows = [
        [
            x["id"],
            x["prompt"],
            x["reference"]
            if given == "reference"
            else json.dumps(x.get("item"), ensure_ascii=False),
            *(x["answers"][a] for a in arms),
        ]
        for x in differ
    ]
    parts.append(_table(["id", "prompt", given, *arms], rows[:max_examples]))
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


def print_summary(report: dict[str, Any], html_path: Path, console: Console | None = None) -> None:
    console = console or Console()
    for cand, metrics in report["comparisons"].items():
        table = Table(title=f"{cand} vs base ({report['n_examples']} test examples)")
        for h in _HEADER:
            table.add_column(h, justify="left" if h == "metric" else "right")
        for metric, c in metrics.items():
            table.add_row(*_row(metric, c), style="bold" if _significant(c) else None)
        console.print(table)
        if rows := _lm_eval_rows(report, cand):
            table = Table(title=f"{cand} vs base: lm-eval tasks", caption=_lm_eval_note(report))
            for h in _HEADER:  # task/metric names have no spaces to wrap at: fold, not cut
                table.add_column(h, justify="left" if h == "metric" else "right", overflow="fold")
            for row, significant in rows:
                table.add_row(*row, style="bold" if significant else None)
            console.print(table)
    for note in _notes(report):
        console.print(note, markup=False)  # error reasons may hold [brackets]
    console.print(f"report: {html_path}")
