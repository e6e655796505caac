"""GRPO and a reward model on the embedded SmolLM2-135M-Instruct, on CPU, through the CLI as a
user runs them (configs/grpo-demo.yaml, configs/reward-demo.yaml), in one run of this script:

- GRPO with a text_similarity grader against the reference triage JSON: the mean reward of the
  last quarter of the steps against the first quarter, the held-out reward at the first and last
  evaluation, then `rayft eval` grading base and adapter with the same grader on the test split:
  the paired difference and its 95% CI.
- A reward model on the preference pairs (right category preferred over a wrong one): pairwise
  accuracy on the held-out test pairs with its 95% Wilson interval (chance: 0.5).

    .venv/bin/python benchmarks/bench_rl.py [--skip-reward] [--skip-grpo]

Goal: GRPO last-quarter reward clearly above the first quarter, eval CI above zero; reward
model accuracy CI above 0.5. Roughly 20 + 10 minutes on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RAYFT = str(Path(sys.executable).parent / "rayft")


def run(*args: str) -> None:
    print("$ rayft", " ".join(args), flush=True)
    subprocess.run([RAYFT, *args], cwd=ROOT, check=True)


def fresh(config: str, run_dir: str) -> None:
    shutil.rmtree(ROOT / run_dir, ignore_errors=True)
    if not (ROOT / "examples/data/support_rft.jsonl").exists():
        subprocess.run([sys.executable, "examples/data/generate_rl.py"], cwd=ROOT, check=True)
    run("prepare", config)
    run("train", config)


def grpo() -> dict:
    fresh("configs/grpo-demo.yaml", "runs/grpo-demo")
    run("eval", "configs/grpo-demo.yaml")
    summary = json.loads((ROOT / "runs/grpo-demo/train_summary.json").read_text())
    report = json.loads((ROOT / "runs/grpo-demo/eval/report.json").read_text())
    out = {
        "rewards": summary["rewards"],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
        "grader": report.get("grader"),
    }
    out["eval"] = _grader_comparison(report)
    return out


def _grader_comparison(report: dict) -> dict | None:
    """The candidate-vs-base row of the grader metric, wherever the report keeps it."""
    found = []

    def walk(node, path):
        if isinstance(node, dict):
            if str(node.get("metric", "")).startswith("grader:") and "delta" in node:
                found.append(node)
            for k, v in node.items():
                if isinstance(k, str) and k.startswith("grader:") and isinstance(v, dict):
                    found.append({"metric": k, **v})
                walk(v, path + [k])
        elif isinstance(node, list):
            for v in node:
                walk(v, path)

    walk(report.get("comparisons", report), [])
    return found[0] if found else None


def reward() -> dict:
    fresh("configs/reward-demo.yaml", "runs/reward-demo")
    summary = json.loads((ROOT / "runs/reward-demo/train_summary.json").read_text())
    return {
        "reward_accuracy": summary["reward_accuracy"],
        "steps": summary["steps"],
        "train_time_s": summary["train_time_s"],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--skip-grpo", action="store_true")
    p.add_argument("--skip-reward", action="store_true")
    a = p.parse_args()
    results = {}
    if not a.skip_grpo:
        results["grpo"] = grpo()
    if not a.skip_reward:
        results["reward"] = reward()
    print("RESULT " + json.dumps(results))
    if "grpo" in results:
        r = results["grpo"]["rewards"]
        print(
            f"GRPO reward: first quarter {r['first_quarter_mean']}, last quarter "
            f"{r['last_quarter_mean']}; held-out {r['eval_first']} -> {r['eval_last']}"
        )
        print(f"eval, same grader, adapter - base: {results['grpo']['eval']}")
    if "reward" in results:
        acc = results["reward"]["reward_accuracy"]
        print(
            f"reward model: accuracy {acc['accuracy']:.3f} on {acc['n']} held-out pairs, "
            f"95% CI {acc['ci95']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
