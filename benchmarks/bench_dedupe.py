"""Near-duplicate precision and recall on a labelled set of support rows, and the cost of signing.

    .venv/bin/python benchmarks/bench_dedupe.py [--per-category 60] [--seed 0]

1. The labelled set (tests/dedupe_pairs.py): a row and a copy with whitespace, punctuation,
   casing, greeting/politeness edits or a retyped phone number are duplicates; rows that differ
   in a number, a name, a product, a negation, an intent or the answer, and paraphrases, are
   not. Each pair goes through prepare's own batch function (normalise, scrub PII, sign) and
   `find_duplicates` (exact and near) on its own. Printed: precision and recall of the rows
   removed, by rule (similarity alone, as before issue 20, and similarity plus the content
   fingerprint, now; both with today's PII scrubber) and threshold, and per category at the
   default threshold. Goal:
   precision >= 0.98 at recall >= 0.9 with the default settings. Two kinds of near-copies
   outside the goal's set (a typo, an added signature line) are printed beside it.
2. Signing: microseconds a row for `dedupe.signatures` on the demo generator's rows, one core.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def signing_us_per_row(rows: int) -> float:
    from rayft.data import dedupe

    generated = _load("generate", ROOT / "examples/data/generate.py").generate(rows, seed=1)
    keys = [dedupe.near_key([(m["role"], m["content"]) for m in r["messages"]]) for r in generated]
    dedupe.signatures(keys[:256], 128, 5)  # warm: permutations, filler hashes
    start = time.process_time()
    dedupe.signatures(keys, 128, 5)
    return (time.process_time() - start) / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--per-category", type=int, default=60, help="pairs in each category")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sign-rows", type=int, default=8192, help="rows for the signing time")
    args = parser.parse_args()

    pairs = _load("dedupe_pairs", ROOT / "tests/dedupe_pairs.py")
    labelled = pairs.pairs(args.seed, args.per_category)
    harder = pairs.harder_copies(args.seed + 1, args.per_category)
    positives = sum(label for _, _, label, _ in labelled)
    print(
        f"\n=== bench_dedupe: {len(labelled)} labelled pairs ({positives} duplicates), "
        "128 permutations, 5-word shingles"
    )
    print(f"{'rule':34s} {'threshold':>9s} {'precision':>9s} {'recall':>7s}")
    default = {}
    for content_check, rule in (
        (False, "similarity alone (before)"),
        (True, "similarity + content (now)"),
    ):
        for threshold in (0.7, 0.8, 0.85, 0.9, 0.95):
            decided = pairs.removed(labelled, threshold, content_check=content_check)
            got = pairs.scores(labelled, decided)
            mark = "  <- default" if threshold == 0.85 else ""
            print(f"{rule:34s} {threshold:9.2f} {got['precision']:9.3f} {got['recall']:7.3f}{mark}")
            if threshold == 0.85:
                default[rule] = got
    print(f"\nremoved per category at 0.85 (of {args.per_category} pairs each)")
    rules = list(default)
    print(f"{'category':40s} " + " ".join(f"{r.split(' (')[1][:-1]:>8s}" for r in rules))
    for category in default[rules[0]]["removed"]:
        counts = " ".join(f"{default[r]['removed'][category]:>8s}" for r in rules)
        print(f"{category:40s} {counts}")
    for content_check, rule in ((False, "before"), (True, "now")):
        got = pairs.scores(harder, pairs.removed(harder, content_check=content_check))
        print(
            f"{'outside the goal, ' + rule:40s} "
            + ", ".join(f"{c.removeprefix('copy: ')} {n}" for c, n in got["removed"].items())
        )
    print(
        f"\nsigning (MinHash + content fingerprint): {signing_us_per_row(args.sign_rows):.1f} us a row"
    )


if __name__ == "__main__":
    main()
