"""`rayft eval`: base vs fine-tuned candidates on the held-out test split."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayft.cluster.connect import local_cpus, ray_session
from rayft.cluster.watchdog import Watchdog
from rayft.config import JobConfig
from rayft.evaluation import grading, lm_eval, plots, report
from rayft.evaluation.arms import Arm, base_arm, candidate_arm
from rayft.evaluation.checks import run_check
from rayft.evaluation.generate import score_arm
from rayft.evaluation.judge import judge_pairs
from rayft.evaluation.metrics import corpus_bleu, text_metrics
from rayft.evaluation.stats import paired_compare
from rayft.evaluation.testset import EvalError, Example, load_general_text, load_test_split
from rayft.graders import Scores, grade
from rayft.manifest import record_stage

# Per-example metrics against the reference answer: name -> (kind, higher_is_better). Checks
# are added as check:<name>, the grader as grader:<name>. Prompt rows (grpo data) have no
# reference: these are then left out and the checks and the grader score the arms.
_METRICS = {
    "exact_match": ("binary", True),
    "token_f1": ("continuous", True),
    "rouge_l": ("continuous", True),
    "bleu": ("continuous", True),
    "nll": ("continuous", False),
}


@dataclass(frozen=True)
class EvalArtifacts:
    report_json: Path
    report_md: Path
    report_html: Path
    report: dict[str, Any]


def _rows(examples: list[Example], texts: list[str]) -> list[dict[str, Any]]:
    rows = [
        {"idx": i, "kind": "test", "prompt": json.dumps(e.prompt), "reference": e.reference or ""}
        for i, e in enumerate(examples)
    ]
    n = len(rows)
    rows += [
        {"idx": n + i, "kind": "text", "prompt": "", "reference": t} for i, t in enumerate(texts)
    ]
    return rows


def _per_token(results: list[dict[str, Any]]) -> np.ndarray:
    return np.array([r["nll_sum"] / max(1, int(r["n_tokens"])) for r in results])


def _score(
    results: list[dict[str, Any]], examples: list[Example], cfg: JobConfig
) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-example scores of one arm and its arm-level numbers."""
    answers = [r["answer"] for r in results]
    references = [e.reference for e in examples]
    scores: dict[str, np.ndarray] = {}
    if None not in references:
        per = [text_metrics(a, r) for a, r in zip(answers, references, strict=True)]
        for m in ("exact_match", "token_f1", "rouge_l", "bleu"):
            scores[m] = np.array([p[m] for p in per])
        scores["nll"] = _per_token(results)
    for check in cfg.eval.checks:
        scores[f"check:{check.name}"] = np.array([float(run_check(check, a)) for a in answers])
    summary = {m: float(v.mean()) for m, v in scores.items()}
    if None not in references:
        nll_sum = sum(r["nll_sum"] for r in results)
        n_tok = sum(int(r["n_tokens"]) for r in results)
        summary["perplexity"] = math.exp(nll_sum / max(1, n_tok))
        summary["bleu_corpus"] = corpus_bleu(answers, references)
    return scores, summary


def _prompt_text(messages: list[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _reference_text(e: Example) -> str:
    """What the judge sees as the reference: a prompt row's item holds the grader's."""
    if e.reference is not None:
        return e.reference
    return json.dumps(e.item, ensure_ascii=False) if e.item else "(none)"


def _examples(
    examples: list[Example],
    answers: dict[str, list[str]],
    scores: dict[str, dict[str, np.ndarray]],
    graded: dict[str, Scores],
) -> list[dict[str, Any]]:
    """report.json's per-example rows: prompt, reference (or a prompt row's item), answers,
    scores, and why the grader failed on an arm's answer where it did."""
    out = []
    for i, e in enumerate(examples):
        row = {"id": e.id, "prompt": e.prompt[-1]["content"], "reference": e.reference}
        if e.reference is None:
            row["item"] = e.item
        row["answers"] = {a: answers[a][i] for a in answers}
        row["scores"] = {
            a: {m: float(v[i]) for m, v in scores[a].items() if m != "general_nll"} for a in answers
        }
        if errors := {a: s.errors[i] for a, s in graded.items() if s.errors[i]}:
            row["grader_errors"] = errors
        out.append(row)
    return out


def evaluate(cfg: JobConfig) -> EvalArtifacts:
    """Score the base and every candidate on the test split; write `<run_dir>/eval/report.*`."""
    started = time.time()
    ev = cfg.eval
    run_dir = cfg.run_path
    examples = load_test_split(run_dir, ev.max_examples)
    texts = load_general_text() if ev.forgetting else []
    base = base_arm(cfg.model.base, cfg.model.revision)
    if len(set(ev.candidates)) != len(ev.candidates) or "base" in ev.candidates:
        raise EvalError(f"eval.candidates: names must be unique and not 'base': {ev.candidates}")
    rank = cfg.serve.max_lora_rank
    arms: list[Arm] = [base] + [candidate_arm(c, run_dir, base.model, rank) for c in ev.candidates]
    if ev.lm_eval:
        lm_eval.check_names(ev.lm_eval.tasks)
    spec, where = (
        (ev.grader, "eval.grader") if ev.grader else (cfg.training.grader, "training.grader")
    )
    g = cfg.training.grpo
    grader = grading.build_grader(spec, where, g.base_url, g.api_key_env) if spec else None
    rows = _rows(examples, texts)
    n = len(examples)

    results: dict[str, list[dict[str, Any]]] = {}
    c = cfg.cluster
    with (
        ray_session(c.address, num_cpus=local_cpus(c.num_workers, c.cpus_per_worker)),
        # progress: every batch an arm's Ray Data execution answers
        Watchdog(c.stall_timeout, "eval batch", stage="eval", autoscaling=c.autoscaling) as dog,
    ):
        for arm in arms:
            results[arm.name] = score_arm(
                rows,
                arm,
                max_new_tokens=ev.max_new_tokens,
                do_sample=ev.do_sample,
                temperature=ev.temperature,
                seed=ev.seed,
                max_lora_rank=rank,
                batch_size=ev.batch_size,
                num_replicas=ev.num_replicas,
                use_gpu=cfg.cluster.use_gpu,
            )
        harness = None
        if ev.lm_eval:
            with dog.paused():  # one long Ray task per arm: no progress to see until it ends
                harness = lm_eval.score_arms(
                    arms,
                    ev.lm_eval.tasks,
                    limit=ev.lm_eval.limit,
                    num_fewshot=ev.lm_eval.num_fewshot,
                    batch_size=ev.batch_size,
                    max_lora_rank=rank,
                    seed=ev.seed,
                    bootstrap_iters=ev.bootstrap_samples,
                    use_gpu=cfg.cluster.use_gpu,
                )

    scores: dict[str, dict[str, np.ndarray]] = {}
    arm_report: dict[str, Any] = {}
    for arm in arms:
        scores[arm.name], summary = _score(results[arm.name][:n], examples, cfg)
        if texts:
            general = results[arm.name][n:]
            scores[arm.name]["general_nll"] = _per_token(general)
            total = sum(r["nll_sum"] for r in general) / max(
                1, sum(int(r["n_tokens"]) for r in general)
            )
            summary["general_perplexity"] = math.exp(total)
        arm_report[arm.name] = {"model": arm.model, "adapter": arm.adapter, "metrics": summary}

    answers = {a.name: [r["answer"] for r in results[a.name][:n]] for a in arms}
    graded: dict[str, Scores] = {}
    if grader:
        items = [e.item for e in examples]
        for arm in arms:
            graded[arm.name] = got = grade(
                grader, [{"output_text": a} for a in answers[arm.name]], items
            )
            scores[arm.name][grading.metric(grader)] = np.array(got.scores)
            arm_report[arm.name]["metrics"][grading.metric(grader)] = float(np.mean(got.scores))

    with_reference = all(e.reference is not None for e in examples)
    kinds = {
        **(_METRICS if with_reference else {}),
        **{f"check:{c.name}": ("binary", True) for c in ev.checks},
    }
    if grader:
        kinds[grading.metric(grader)] = (grading.kind(grader), True)
    if texts:
        kinds["general_nll"] = ("continuous", False)
    comparisons: dict[str, dict[str, Any]] = {}
    for arm in arms[1:]:
        comparisons[arm.name] = {
            metric: paired_compare(
                scores["base"][metric],
                scores[arm.name][metric],
                kind=kind,
                higher_is_better=higher,
                samples=ev.bootstrap_samples,
                seed=ev.seed,
            )
            for metric, (kind, higher) in kinds.items()
        }
        if ev.judge:
            judged = judge_pairs(
                [_prompt_text(e.prompt) for e in examples],
                [_reference_text(e) for e in examples],
                answers["base"],
                answers[arm.name],
                base_url=ev.judge.base_url,
                model=ev.judge.model,
                api_key_env=ev.judge.api_key_env,
            )
            # The judge scores the candidate against the base directly: compare with 0.5 (a tie).
            comparisons[arm.name]["judge"] = paired_compare(
                np.full(n, 0.5), np.array(judged), samples=ev.bootstrap_samples, seed=ev.seed
            )

    doc = {
        "run_dir": str(run_dir),
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config_hash": cfg.digest(),
        "settings": ev.model_dump(mode="json"),
        "n_examples": n,
        "n_general_texts": len(texts),
        "arms": arm_report,
        "comparisons": comparisons,
        "lm_eval": (
            {"tasks": lm_eval.compare(harness, ev.bootstrap_samples, ev.seed)} if harness else None
        ),
        "grader": grading.summary(grader, where, graded) if grader else None,
        "training": report.read_training(run_dir),
        "examples": _examples(examples, answers, scores, graded),
    }
    out = run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.jsonl"
    figures = {
        "loss": plots.loss_plot(plots.read_loss_curves(metrics_file)),
        "rewards": plots.reward_plot(plots.read_curves(metrics_file, ("reward", "eval_reward"))),
        "deltas": plots.delta_plot(comparisons),
    }
    paths = EvalArtifacts(
        report.write_json(doc, out),
        report.write_markdown(doc, out),
        report.write_html(doc, out, figures, ev.max_report_examples),
        doc,
    )
    # lm-eval's paired metrics join run.json's deltas as `lm_eval:<task>/<metric>`.
    harness_deltas = lm_eval.flat_comparisons(doc["lm_eval"]["tasks"]) if harness else {}
    every = {c: {**per, **harness_deltas.get(c, {})} for c, per in comparisons.items()}
    record_stage(
        run_dir,
        "eval",
        cfg,
        report=str(paths.report_html),
        examples=n,
        seconds=round(time.time() - started, 1),
        deltas={
            cand: {
                m: {k: c[k] for k in ("delta", "ci_low", "ci_high", "p_value")}
                for m, c in per.items()
            }
            for cand, per in every.items()
        },
    )
    report.print_summary(doc, paths.report_html)
    return paths
