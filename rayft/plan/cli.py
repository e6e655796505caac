"""`rayft plan CONFIG [--set ...] [--gpu NAME] [--json]`: the subcommand's parser and handler, for
rayft.cli to plug in (`add_cli(sub, _config_args)`, the handler set as its `func`)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable

from rayft.plan.gpus import DEFAULT, GPUS


def add_cli(
    subparsers, config_args: Callable[[argparse.ArgumentParser], None]
) -> argparse.ArgumentParser:
    """The `plan` subcommand; `config_args` adds the job file and --set as every stage has them."""
    p = subparsers.add_parser(
        "plan", help="will the job fit, on how many GPUs, how long, what cost (offline)"
    )
    config_args(p)
    p.add_argument(
        "--gpu",
        help=f"GPU type: {', '.join(GPUS)} (default {DEFAULT} when cluster.use_gpu, else this "
        "machine's RAM)",
    )
    p.add_argument("--price-per-gpu-hour", type=float, dest="price", help="USD, for the cost")
    p.add_argument("--mfu", type=float, help="model FLOPs utilisation to assume (0-1)")
    p.add_argument(
        "--concurrency",
        type=int,
        help="sequences served at once (default: serve.max_ongoing_requests)",
    )
    p.add_argument(
        "--max-model-len",
        type=int,
        help="serving context (default: max_seq_len + serve.max_tokens_limit)",
    )
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.set_defaults(func=run_cli)
    return p


def run_cli(args: argparse.Namespace) -> int:
    from rayft.config import load_config
    from rayft.plan.job import plan
    from rayft.plan.render import render

    cfg = load_config(args.config, list(args.overrides))
    result = plan(
        cfg,
        args.gpu,
        args.price,
        mfu=args.mfu,
        concurrency=args.concurrency,
        max_model_len=args.max_model_len,
    )
    print(json.dumps(result, indent=2) if args.json else render(result))
    return 0
