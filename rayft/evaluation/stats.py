"""Paired comparison of two arms scored on the same examples.

Every test example is scored for both arms, so the per-example differences carry the
signal; comparing the two means as if they were independent samples would throw away the
pairing and need far more examples to see the same effect.

- Confidence interval: percentile bootstrap of the mean difference (seeded, reproducible).
- Significance: exact McNemar test for binary metrics (a two-sided binomial test on the
  discordant pairs, i.e. a sign test), Wilcoxon signed-rank for continuous metrics (zero
  differences dropped, exact distribution for small samples).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy import stats

Kind = Literal["binary", "continuous"]


def bootstrap_ci(
    diffs: np.ndarray, samples: int = 2000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap CI of the mean of `diffs`."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(samples, len(diffs)))
    means = diffs[idx].mean(axis=1)
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def mcnemar_exact(base: np.ndarray, cand: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired 0/1 outcomes."""
    b = int(np.sum((base == 1) & (cand == 0)))
    c = int(np.sum((base == 0) & (cand == 1)))
    if b + c == 0:
        return 1.0  # no discordant pair: no evidence of any difference
    return float(stats.binomtest(c, b + c, 0.5).pvalue)


def wilcoxon_p(diffs: np.ndarray) -> float:
    """Two-sided Wilcoxon signed-rank p-value; 1.0 when every difference is zero."""
    if not np.any(diffs != 0):
        return 1.0
    return float(stats.wilcoxon(diffs, zero_method="wilcox").pvalue)


def paired_compare(
    base: np.ndarray,
    cand: np.ndarray,
    kind: Kind = "continuous",
    higher_is_better: bool = True,
    samples: int = 2000,
    seed: int = 0,
) -> dict[str, float | int | str | bool]:
    """Compare per-example scores of a candidate with the base on the same examples.

    `delta` is mean(cand - base); wins/ties/losses count examples where the candidate is
    better/equal/worse in the metric's own direction.
    """
    base, cand = np.asarray(base, dtype=float), np.asarray(cand, dtype=float)
    if base.shape != cand.shape or base.ndim != 1 or len(base) == 0:
        raise ValueError(
            f"paired scores need two equal, non-empty 1-D arrays: {base.shape} {cand.shape}"
        )
    diffs = cand - base
    low, high = bootstrap_ci(diffs, samples, seed)
    better = diffs if higher_is_better else -diffs
    if kind == "binary":
        p, test = mcnemar_exact(base, cand), "mcnemar_exact"
    else:
        p, test = wilcoxon_p(diffs), "wilcoxon_signed_rank"
    return {
        "n": len(diffs),
        "base": float(base.mean()),
        "candidate": float(cand.mean()),
        "delta": float(diffs.mean()),
        "ci_low": low,
        "ci_high": high,
        "p_value": p,
        "test": test,
        "higher_is_better": higher_is_better,
        "wins": int(np.sum(better > 0)),
        "ties": int(np.sum(better == 0)),
        "losses": int(np.sum(better < 0)),
    }
