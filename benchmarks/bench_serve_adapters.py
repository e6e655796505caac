"""Serving throughput with 8 LoRA adapters in mixed traffic, as a ratio to base-only traffic.

The transformers engine on CPU behind the real Ray Serve app: 8 concurrent clients send
completions (greedy, fixed length) for (a) the base only and (b) a different adapter each, round
robin over 8 adapters (rank 16, all linear layers). Requests that arrive together share one
mixed-adapter `generate` call. Prints completion tokens/s of both phases and their ratio, measured
in this one run (goal: >= 0.85), and the mixed traffic again as streams (which join the same
batches, so their ratio to the plain mixed traffic should be ~1). Also prints the mixed / base
ratio for the engine alone (no HTTP/Serve). One torch thread per replica: on a shared, oversubscribed CPU, multi-threaded kernels spend most
of their time waiting for each other, which drowns the effect being measured.

    python benchmarks/bench_serve_adapters.py [--model smollm2-135m-instruct|tiny-llama]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import ray
import requests
import torch

from rayft import models
from rayft.config import JobConfig

ADAPTERS = 8


def make_adapters(base: str, out: Path) -> dict[str, str]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    paths = {}
    for i in range(ADAPTERS):
        torch.manual_seed(i)
        model = get_peft_model(
            AutoModelForCausalLM.from_pretrained(base),
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        with torch.no_grad():  # non-zero B: adapters that really change the forward pass
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.01)
        model.save_pretrained(out / f"ad{i}")
        paths[f"ad{i}"] = str(out / f"ad{i}")
    return paths


def phase(
    url: str, models_cycle: list[str], n: int, max_tokens: int, clients: int, stream=False
) -> tuple[int, float]:
    """(completion tokens, seconds) for n requests spread over `clients` threads."""

    def one(i: int) -> int:
        body = {
            "model": models_cycle[i % len(models_cycle)],
            "prompt": f"Tell me about {i}",
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": stream,
        }
        r = requests.post(url + "/completions", json=body, timeout=600)
        r.raise_for_status()
        if not stream:
            return r.json()["usage"]["completion_tokens"]
        # No usage in a stream: a full-length answer has max_tokens; else count the chunks.
        chunks = [json.loads(x[6:]) for x in r.text.split("\n\n") if x.startswith("data: {")]
        if chunks[-1]["choices"][0]["finish_reason"] == "length":
            return max_tokens
        return sum(bool(c["choices"][0]["text"]) for c in chunks)

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(one, range(n)))
    return tokens, time.perf_counter() - start


def engine_only(base: str, adapters: dict[str, str], max_tokens: int, rounds: int) -> float:
    from rayft.adapters import fingerprint
    from rayft.serving.hf_engine import TransformersEngine
    from rayft.serving.protocol import GenRequest

    torch.set_num_threads(1)  # as in the Serve replica (cpus_per_replica=1)
    engine = TransformersEngine(base, max_loaded_adapters=ADAPTERS)
    refs = [fingerprint(n, Path(p)) for n, p in adapters.items()]
    ids = engine.tokenizer("Tell me about the sea")["input_ids"]

    def batch(refs_cycle: list) -> list:
        return [
            GenRequest(ids, max_tokens, 0.0, adapter=refs_cycle[i % len(refs_cycle)])
            for i in range(ADAPTERS)
        ]

    sides = {"base": batch([None]), "mixed": batch(refs)}
    totals = {k: [0, 0.0] for k in sides}
    for b in sides.values():
        engine.generate(b)  # warm-up (and adapter loading)
    done = 0  # at least `rounds`, and enough rounds that each side ran for 5 s (tiny models)
    while done < rounds or min(t for _, t in totals.values()) < 5.0:
        done += 1
        for kind, b in sides.items():
            start = time.perf_counter()
            totals[kind][0] += sum(r.completion_tokens for r in engine.generate(b))
            totals[kind][1] += time.perf_counter() - start
    base_rate, mixed_rate = (totals[k][0] / totals[k][1] for k in ("base", "mixed"))
    print(
        f"engine only: base {base_rate:.1f} tok/s, {ADAPTERS} adapters mixed "
        f"{mixed_rate:.1f} tok/s, ratio {mixed_rate / base_rate:.3f}"
    )
    return mixed_rate / base_rate


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--requests", type=int, default=16, help="requests per round and side")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--clients", type=int, default=8)
    args = parser.parse_args()

    from rayft.serving import start, stop

    base = str(models.pull(args.model))
    work = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    adapters = make_adapters(base, work)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = JobConfig(
        run_dir=str(work / "run"),
        model={"base": base},
        serve={
            "port": port,
            "adapters": adapters,
            "max_batch_size": args.clients,
            "max_ongoing_requests": 2 * args.clients,
            "max_tokens_limit": 256,
            "cpus_per_replica": 1,
        },
    )
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        url = start(cfg)
        names = list(adapters)
        phase(url, ["base", *names], len(names) + 1, 2, 1)  # warm-up: load every adapter once
        # Alternate short base and mixed rounds: the machine's other load drifts during a run,
        # and interleaving spreads that drift over both sides of the ratio.
        totals = {"base": [0, 0.0], "mixed": [0, 0.0], "streams": [0, 0.0]}
        sides = (("base", ["base"], False), ("mixed", names, False), ("streams", names, True))
        for _ in range(args.rounds):
            for kind, cycle, stream in sides:
                tokens, secs = phase(
                    url, cycle, args.requests, args.max_tokens, args.clients, stream
                )
                totals[kind][0] += tokens
                totals[kind][1] += secs
        base_rate, mixed_rate, stream_rate = (
            totals[k][0] / totals[k][1] for k in ("base", "mixed", "streams")
        )
        stop()
    finally:
        ray.shutdown()
    print(
        f"model {args.model}, {args.clients} clients, {args.rounds} rounds x {args.requests} "
        f"requests x {args.max_tokens} tokens per side"
    )
    print(
        f"serve: base-only {base_rate:.1f} tok/s, {ADAPTERS} adapters mixed {mixed_rate:.1f} tok/s"
    )
    print(
        f"serve: mixed / base-only throughput ratio = {mixed_rate / base_rate:.3f} (goal >= 0.85)"
    )
    print(
        f"serve: the mixed traffic as streams {stream_rate:.1f} tok/s, streams / plain ratio "
        f"= {stream_rate / mixed_rate:.3f} (streams share batches: ~1)"
    )
    engine_only(base, adapters, args.max_tokens, rounds=args.rounds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
