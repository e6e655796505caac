"""Eval generation throughput through the Ray Data actor pool: batching and replicas.

Answers the same prompts with the embedded SmolLM2-135M-Instruct (greedy) as (batch 1, 1 replica),
(batch 8, 1 replica) and (batch 8, 2 replicas), and prints answers/s and the ratios to the first,
all measured in this one run. Nothing is asserted.
"""

from __future__ import annotations

import json
import time

import ray

from rayft import models
from rayft.evaluation.arms import Arm
from rayft.evaluation.generate import score_arm

PROMPTS = [
    "My parcel has not arrived after two weeks. What should I do?",
    "I was charged twice for the same order.",
    "How do I change the email address on my account?",
    "The app crashes when I open the settings page.",
    "I want to return a jacket that does not fit.",
    "Can I get an invoice for my last purchase?",
    "My password reset link has expired.",
    "The tracking number you sent does not work.",
] * 3


def main() -> None:
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    arm = Arm("base", str(models.pull("smollm2-135m-instruct")))
    rows = [
        {
            "idx": i,
            "kind": "test",
            "prompt": json.dumps([{"role": "user", "content": p}]),
            "reference": "We are sorry; a colleague will reply within a day.",
        }
        for i, p in enumerate(PROMPTS)
    ]
    results = {}
    for batch, replicas in ((1, 1), (8, 1), (8, 2)):
        start = time.perf_counter()
        score_arm(rows, arm, max_new_tokens=32, batch_size=batch, num_replicas=replicas)
        results[(batch, replicas)] = len(rows) / (time.perf_counter() - start)
    ray.shutdown()
    ref = results[(1, 1)]
    print(f"\n{len(rows)} prompts, 32 new tokens, SmolLM2-135M on CPU (model load included)")
    for (batch, replicas), rate in results.items():
        print(f"batch {batch}, {replicas} replica(s): {rate:6.2f} answers/s  x{rate / ref:.2f}")


if __name__ == "__main__":
    main()
