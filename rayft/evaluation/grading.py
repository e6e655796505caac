"""`eval.grader`: every arm's answers graded against the test rows' items.

A grpo run's test rows carry the item its reward read while training, so the eval reports, per
arm, the number the run was trained to raise, on rows it never saw. A sample the grader fails on
scores 0 (as it did as a reward) and is counted per arm: a candidate whose answers break the
grader more often than the base's shows it in the error counts, not only in a lower mean.
"""

from __future__ import annotations

import os
from typing import Any

from rayft.evaluation.stats import Kind
from rayft.graders import Grader, Scores, build

# Types whose score is 1 or 0: compared with McNemar's test; the others with Wilcoxon's.
_BINARY = {"string_check", "json_keys", "regex", "label_model"}


def build_grader(
    spec: dict[str, Any], where: str, base_url: str | None, api_key_env: str | None
) -> Grader:
    """Build before any model loads, so a bad spec fails in seconds. A job file is the user's
    own: its python grader runs here, as it did in training."""
    key = os.environ.get(api_key_env) if api_key_env else None
    return build(spec, where=where, allow_python=True, base_url=base_url, api_key=key)


def metric(grader: Grader) -> str:
    """The grader's row in the report's metric tables, beside `check:<name>`."""
    return f"grader:{grader.name}"


def kind(grader: Grader) -> Kind:
    return "binary" if grader.type in _BINARY else "continuous"


def summary(grader: Grader, where: str, graded: dict[str, Scores]) -> dict[str, Any]:
    """report.json's `grader`: which grader (and the config key it came from), and per arm."""
    return {
        "name": grader.name,
        "type": grader.type,
        "source": where,
        "metric": metric(grader),
        "arms": {arm: _arm(scores) for arm, scores in graded.items()},
    }


def _arm(scores: Scores) -> dict[str, Any]:
    """Mean, error count and the first distinct error reasons of one arm; a multi grader's
    parts by name (the same names training logs as `grader/<name>`)."""
    n = max(len(scores.scores), 1)
    reasons = list(dict.fromkeys(e for e in scores.errors if e is not None))
    out: dict[str, Any] = {
        "mean": sum(scores.scores) / n,
        "errors": scores.error_count,
        "n": len(scores.scores),
        "error_reasons": reasons[:5],
    }
    if len(scores.parts) > 1:
        out["parts"] = {name: sum(v) / n for name, v in scores.parts.items()}
    if scores.passed is not None:
        out["pass_rate"] = sum(scores.passed) / n
    return out
