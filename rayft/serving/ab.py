"""A/B experiments: sticky arm assignment, the request/feedback logs, and `rayft ab report`.

Assignment hashes (experiment, user) so a user keeps their arm across requests, replicas and
restarts; without a `user` the arm is drawn at random. The logs are JSONL in
`<run_dir>/serve/`, one line per event, so the report is a pure function of two files.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

from scipy import stats


def assign(experiment: str, arms: dict[str, float], user: str | None) -> str:
    """Pick an arm with probability proportional to its weight; stable for a given user."""
    names = sorted(a for a, w in arms.items() if w > 0)
    total = sum(arms[a] for a in names)
    if user is None:
        u = random.random()
    else:
        digest = hashlib.sha256(f"{experiment}\x00{user}".encode()).digest()
        u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name in names:
        edge += arms[name] / total
        if u < edge:
            return name
    return names[-1]


class JsonlLog:
    """Append-only JSONL file shared by the ingress's request handlers."""

    def __init__(self, path: Path):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps({"time": round(time.time(), 3), **record}) + "\n"
        with self._lock, open(self.path, "a") as f:
            f.write(line)


def read_jsonl(path: Path) -> list[dict]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a crash: the rest of the log still counts
    return rows


# --------------------------------------------------------------------------- report


def mean_ci(values: list[float], level: float = 0.95) -> dict:
    """Mean with a Student-t confidence interval."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "ci": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf((1 + level) / 2, n - 1)) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "ci": [mean - half, mean + half]}


def wilson(wins: int, n: int, level: float = 0.95) -> list[float] | None:
    if n == 0:
        return None
    z = float(stats.norm.ppf((1 + level) / 2))
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [centre - half, centre + half]


def report(requests: list[dict], feedback: list[dict], experiment: str | None = None) -> dict:
    """Per experiment and arm: traffic, errors, latency, ratings with CIs, pairwise win rates.

    Ratings of each arm are compared with the reference arm (`base` when present) by Welch's
    t-test; pairwise preferences between two arms by an exact binomial test against 50%.
    """
    answered = {r["id"]: r for r in requests if not r.get("shadow") and r.get("experiment")}
    by_exp: dict[str, list[dict]] = defaultdict(list)
    for r in answered.values():
        by_exp[r["experiment"]].append(r)
    out = {}
    for exp in sorted(by_exp):
        if experiment is not None and exp != experiment:
            continue
        rows = by_exp[exp]
        ratings: dict[str, list[float]] = defaultdict(list)
        pairs: dict[tuple[str, str], int] = defaultdict(int)  # (winner, loser) -> count
        for f in feedback:
            mine = answered.get(f.get("response_id"))
            if mine is None or mine["experiment"] != exp:
                continue
            if f.get("rating") is not None:
                ratings[mine["arm"]].append(float(f["rating"]))
            other = answered.get(f.get("preferred_over"))
            if other is not None and other["experiment"] == exp and other["arm"] != mine["arm"]:
                pairs[(mine["arm"], other["arm"])] += 1
        arms = sorted({r["arm"] for r in rows})
        ref = "base" if "base" in arms else arms[0]
        arm_stats = {}
        for arm in arms:
            mine = [r for r in rows if r["arm"] == arm]
            ok = [r for r in mine if r.get("status") == 200]
            lat = sorted(r["latency_s"] for r in ok if r.get("latency_s") is not None)
            entry = {
                "requests": len(mine),
                "errors": len(mine) - len(ok),
                "latency_p50_s": lat[len(lat) // 2] if lat else None,
                "completion_tokens": sum(r.get("completion_tokens", 0) for r in ok),
                "rating": mean_ci(ratings[arm]),
            }
            if arm != ref and len(ratings[arm]) > 1 and len(ratings[ref]) > 1:
                with warnings.catch_warnings():  # constant ratings in both arms: p is 0 or nan
                    warnings.simplefilter("ignore", RuntimeWarning)
                    p = float(stats.ttest_ind(ratings[arm], ratings[ref], equal_var=False).pvalue)
                entry["rating_vs_" + ref] = {
                    "difference": entry["rating"]["mean"] - sum(ratings[ref]) / len(ratings[ref]),
                    "p_value": None if math.isnan(p) else p,
                }
            arm_stats[arm] = entry
        comparisons = []
        for i, first in enumerate(arms):
            for second in arms[i + 1 :]:
                # State every comparison from the challenger's side, against the reference.
                a, b = (second, first) if first == ref else (first, second)
                wins, losses = pairs[(a, b)], pairs[(b, a)]
                n = wins + losses
                if n == 0:
                    continue
                comparisons.append(
                    {
                        "arm": a,
                        "versus": b,
                        "wins": wins,
                        "losses": losses,
                        "win_rate": wins / n,
                        "ci": wilson(wins, n),
                        "p_value": float(stats.binomtest(wins, n, 0.5).pvalue),
                    }
                )
        out[exp] = {"reference": ref, "arms": arm_stats, "pairwise": comparisons}
    return out
