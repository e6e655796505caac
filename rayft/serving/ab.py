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
from typing import TYPE_CHECKING, Any

from scipy import stats

from rayft.errors import RayftError

if TYPE_CHECKING:
    from rayft.config import JobConfig


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
    """Mean with a Student-t confidence interval (scipy's)."""
    n = len(values)
    if n == 0:
        return {"n": 0, "mean": None, "ci": None}
    mean = sum(values) / n
    if n == 1:
        return {"n": 1, "mean": mean, "ci": None}
    sem = float(stats.sem(values))
    if sem == 0:  # every rating equal: scipy's interval is undefined (nan), the data is not
        return {"n": n, "mean": mean, "ci": [mean, mean]}
    low, high = stats.t.interval(level, n - 1, loc=mean, scale=sem)
    return {"n": n, "mean": mean, "ci": [float(low), float(high)]}


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
                test = stats.binomtest(wins, n, 0.5)
                comparisons.append(
                    {
                        "arm": a,
                        "versus": b,
                        "wins": wins,
                        "losses": losses,
                        "win_rate": wins / n,
                        "ci": [float(x) for x in test.proportion_ci(0.95, method="wilson")],
                        "p_value": float(test.pvalue),
                    }
                )
        out[exp] = {"reference": ref, "arms": arm_stats, "pairwise": comparisons}
    return out


def ab_report(cfg: JobConfig, experiment: str | None = None) -> dict:
    """Per-arm statistics of the request log and feedback; writes serve/ab_report.json."""
    serve_dir = cfg.run_path / "serve"
    requests = read_jsonl(serve_dir / "requests.jsonl")
    if not requests:
        raise RayftError(
            f"{serve_dir / 'requests.jsonl'}: no requests logged yet; "
            "run `rayft serve` and send traffic to an experiment first"
        )
    result = report(requests, read_jsonl(serve_dir / "feedback.jsonl"), experiment)
    if experiment is not None and experiment not in result:
        raise RayftError(
            f"experiment {experiment!r} has no logged requests "
            f"(logged: {sorted({r.get('experiment') for r in requests} - {None})})"
        )
    (serve_dir / "ab_report.json").write_text(json.dumps(result, indent=2))
    _print(result)
    return result


def _print(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for exp, data in result.items():
        table = Table(title=f"experiment {exp} (reference arm: {data['reference']})")
        for col in ("arm", "requests", "errors", "p50 latency", "rating (95% CI)", "p vs ref"):
            table.add_column(col)
        for arm, a in data["arms"].items():
            r = a["rating"]
            rating = (
                "-"
                if r["mean"] is None
                else f"{r['mean']:.2f}"
                + (f" [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}]" if r["ci"] else "")
            )
            p = a.get(f"rating_vs_{data['reference']}", {}).get("p_value")
            lat = a["latency_p50_s"]
            table.add_row(
                arm,
                str(a["requests"]),
                str(a["errors"]),
                "-" if lat is None else f"{lat * 1000:.0f} ms",
                rating,
                "-" if p is None else f"{p:.3g}",
            )
        console.print(table)
        for c in data["pairwise"]:
            console.print(
                f"  {c['arm']} vs {c['versus']}: win rate {c['win_rate']:.2f} "
                f"[{c['ci'][0]:.2f}, {c['ci'][1]:.2f}] over {c['wins'] + c['losses']} "
                f"comparisons, p={c['p_value']:.3g}"
            )
