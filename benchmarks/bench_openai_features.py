"""What structured outputs and log-probabilities cost on the transformers engine.

Batches of 8 requests on the same prompts, in interleaved rounds (the machine's other load
drifts; interleaving spreads it over every side): free decoding, `json_schema` decoding (the
grammar's token mask at every step), and `logprobs: 5` (a log-softmax and a top-5 per step).
Prints completion tokens/s of each and the ratios to free decoding, measured in this one run
(goals: json_schema / free >= 0.9, logprobs / free >= 0.95). Every side decodes exactly
max_tokens tokens per request. Also prints greedy decoding by the engine's own per-row decoder
against `generate`'s built-in greedy search on the same batch: what picking every token in
rayft's decoder (per-row sampling, seeds and rules) costs.

    python benchmarks/bench_openai_features.py [--model smollm2-135m-instruct|tiny-llama]
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from rayft import models

# A value longer than the answers: every side decodes exactly max_tokens tokens (the end
# token is banned on every side too), so the ratios compare the cost of a step, not of
# answers of different lengths (a short answer spends more of its time in the prompt).
SCHEMA = {
    "type": "object",
    "properties": {
        "id": {"type": "integer", "minimum": 0},
        "note": {"type": "string", "minLength": 1000},
    },
    "required": ["id", "note"],
    "additionalProperties": False,
}

PROMPTS = [
    "Describe a person as JSON.",
    "Give me a user record.",
    "Who is the customer?",
    "Write a profile.",
    "A new account:",
    "Tell me about Ann.",
    "List someone's details.",
    "Fill in the form.",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.prompts import chat_prompt_ids
    from rayft.serving.protocol import GenRequest

    torch.set_num_threads(1)  # as a Serve replica with one CPU runs it
    engine = TransformersEngine(str(models.pull(args.model)), device="cpu")
    ids = [chat_prompt_ids(engine.tokenizer, [{"role": "user", "content": p}]) for p in PROMPTS]

    no_end = {t: -100.0 for t in engine.eos_ids}

    def batch(**kw) -> list[GenRequest]:
        return [
            GenRequest(i, args.max_tokens, 1.0, seed=n, logit_bias=no_end, **kw)
            for n, i in enumerate(ids)
        ]

    sides = {
        "free": batch(),
        "json_schema": batch(grammar={"type": "json_schema", "schema": SCHEMA}),
        "logprobs 5": batch(logprobs=5),
    }
    plain_ids, plain_mask = engine._batch_tensors(sides["free"])

    def builtin() -> int:  # generate's own greedy search: no rayft decoder
        with torch.inference_mode():
            out = engine.model.generate(
                input_ids=plain_ids,
                attention_mask=plain_mask,
                do_sample=False,
                max_new_tokens=args.max_tokens,
                min_new_tokens=args.max_tokens,
                pad_token_id=engine.pad_id,
            )
        return (out.shape[1] - plain_ids.shape[1]) * len(ids)

    def greedy_decoder() -> int:
        reqs = [GenRequest(i, args.max_tokens, 0.0, logit_bias=no_end) for i in ids]
        return sum(r.completion_tokens for r in engine.generate(reqs))

    for b in sides.values():
        engine.generate(b)  # warm-up: the grammar compiles once
    totals = {k: [0, 0.0] for k in [*sides, "greedy (rayft decoder)", "greedy (generate)"]}
    runs = {
        **{
            k: (lambda b=b: sum(r.completion_tokens for r in engine.generate(b)))
            for k, b in sides.items()
        },
        "greedy (rayft decoder)": greedy_decoder,
        "greedy (generate)": builtin,
    }
    for _ in range(args.rounds):
        for kind, run in runs.items():
            start = time.perf_counter()
            totals[kind][0] += run()
            totals[kind][1] += time.perf_counter() - start
    rate = {k: t / s for k, (t, s) in totals.items()}
    print(
        f"model {args.model}, batches of {len(ids)}, {args.rounds} rounds, up to "
        f"{args.max_tokens} tokens, 1 thread"
    )
    for k, r in rate.items():
        print(f"  {k:24s} {r:7.1f} tok/s ({totals[k][0]} tokens)")
    print(f"json_schema / free = {rate['json_schema'] / rate['free']:.3f} (goal >= 0.9)")
    print(f"logprobs 5 / free  = {rate['logprobs 5'] / rate['free']:.3f} (goal >= 0.95)")
    ratio = rate["greedy (rayft decoder)"] / rate["greedy (generate)"]
    print(f"rayft decoder / generate's greedy = {ratio:.3f} (the per-row decoder's cost)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
