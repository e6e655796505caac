"""The `rayft` command: one thin subcommand per stage (parse -> config -> call the stage).

Stage modules are imported inside the handlers: `rayft config show` should not pay for
importing torch and Ray.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from rayft.config import JobConfig, dump_config, field_help, load_config
from rayft.errors import RayftError
from rayft.plan.cli import add_cli as add_plan_cli  # light: no torch


def _set_arg(p: argparse.ArgumentParser, example: str = "training.max_steps=20") -> None:
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"override a config key, e.g. --set {example} (repeatable)",
    )


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("config", nargs=None if required else "?", help="job file (YAML)")
    _set_arg(p)
    p.add_argument(
        "--address", help="Ray address of an existing cluster (default: RAY_ADDRESS or embedded)"
    )


def _load(args: argparse.Namespace) -> JobConfig:
    overrides = list(args.overrides)
    if getattr(args, "address", None):
        overrides.append(f"cluster.address={args.address}")
    return load_config(args.config, overrides)


# --------------------------------------------------------------------------- handlers


def cmd_config_show(args: argparse.Namespace) -> int:
    if args.help_fields:
        for key, default, desc in field_help():
            print(f"{key:45s} {default:25s} {desc}")
        return 0
    print(dump_config(_load(args)), end="")
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    from rayft import models

    for m in models.list_models():
        print(f"{m['name']:24s} cached={m['cached']:3s} {m['license']:11s} {m['description']}")
        if m["cached"] == "yes":
            print(f"{'':24s} {m['path']}")
    return 0


def cmd_models_pull(args: argparse.Namespace) -> int:
    from rayft import models

    for name in args.names:
        was = models.is_cached(name)
        path = models.pull(name, force=args.force)
        print(f"{name}: {'already cached' if was and not args.force else 'cached'} at {path}")
    return 0


def _on_cluster(cfg: JobConfig, stage: str, run) -> None:
    """Run `run()`; on an existing cluster, after the pre-flight, in one Ray connection with it.
    Not inside a Ray Job: `rayft submit` checked before submitting it (or KubeRay runs it)."""
    from rayft.cluster.connect import in_ray_job, ray_session, resolve_address

    if not stage or not resolve_address(cfg.cluster.address) or in_ray_job():
        run()
        return
    from rayft.cluster.preflight import check_connected, stages_of

    with ray_session(cfg.cluster.address):
        check_connected(cfg, stages_of(stage), f"{stage} on {resolve_address(cfg.cluster.address)}")
        run()


def _plan_check(args: argparse.Namespace, cfg: JobConfig, what: str) -> None:
    """The pre-launch check (`rayft plan`): a job that does not fit its GPUs (or, on CPU, this
    machine's RAM) is refused before anything starts, unless --no-plan-check."""
    if getattr(args, "no_plan_check", False):
        return
    from rayft.plan.job import check

    check(cfg, what=what)


def _stage(module: str, function: str, stage: str, planned: str = "", **options: str):
    """The command of a stage: `function` of `module` (imported only when it runs: torch and
    Ray are slow to import) on the loaded job file, with `options` (parameter -> CLI flag);
    `planned` names what the plan check refuses, for a stage that checks it first."""

    def command(args: argparse.Namespace) -> int:
        cfg = _load(args)
        if planned:
            _plan_check(args, cfg, planned)
        kwargs = {name: getattr(args, flag) for name, flag in options.items()}

        def run() -> None:  # imported after the pre-flight: a refusal need not wait for torch
            getattr(importlib.import_module(module), function)(cfg, **kwargs)

        _on_cluster(cfg, stage, run)
        return 0

    return command


cmd_prepare = _stage("rayft.data", "prepare", "prepare")
cmd_train = _stage("rayft.training", "train", "train", "the training job", resume="resume")
cmd_eval = _stage("rayft.evaluation", "evaluate", "eval")
cmd_serve = _stage("rayft.serving", "serve", "serve")
cmd_merge = _stage("rayft.export", "merge", "")  # merge and export do not use the cluster
cmd_export = _stage("rayft.export", "export", "", fmt="format")


def cmd_quickstart(args: argparse.Namespace) -> int:
    from rayft.quickstart import default_config, quickstart

    overrides = list(args.overrides)
    if args.address:
        overrides.append(f"cluster.address={args.address}")
    cfg = load_config(args.config or default_config(), overrides)
    _on_cluster(cfg, "quickstart", lambda: quickstart(args.config, overrides, args.resume))
    return 0


def cmd_ab_report(args: argparse.Namespace) -> int:
    from rayft.serving import ab_report

    report = ab_report(_load(args), experiment=args.experiment)
    if args.json:
        print(json.dumps(report, indent=2))
    return 0


def cmd_data_from_feedback(args: argparse.Namespace) -> int:
    from rayft.data.feedback import from_feedback, summary

    out, rule = Path(args.out), (args.min_good_rating, args.max_bad_rating)
    report = from_feedback(Path(args.serve_dir), out, *rule, args.exclude_arm, args.experiment)
    print(summary(report, out))
    return 0


def cmd_cluster_status(args: argparse.Namespace) -> int:
    from rayft.cluster import status

    status(args.address)
    return 0


def cmd_cluster_check(args: argparse.Namespace) -> int:
    from rayft.cluster.connect import ray_session, resolve_address
    from rayft.cluster.jobs import _refusals, check_submitted, client, dashboard_address
    from rayft.cluster.preflight import PIPELINE, check_connected

    cfg = _load(args)
    target = resolve_address(cfg.cluster.address)
    if not target:
        raise RayftError("rayft cluster check: no cluster given; pass --address or set RAY_ADDRESS")
    stages = tuple(args.stage or PIPELINE)
    what = f"{', '.join(stages)} on {target}"
    if target.startswith(("http://", "https://")):  # as `rayft submit` will run it
        with _refusals(dashboard_address(target)):
            check_submitted(client(target), cfg, stages, what)
    else:
        with ray_session(target):
            check_connected(cfg, stages, what)
    print(f"[rayft preflight] {what}: ok")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from rayft.cluster import submit

    # REMAINDER takes everything after CONFIG, so `CONFIG --address X -- STAGE` arrives as
    # stage_args ['--address', 'X', '--', 'STAGE']: options before `--` are rayft submit's own.
    rest = list(args.stage_args)
    if "--" in rest:
        cut = rest.index("--")
        options, rest = rest[:cut], rest[cut + 1 :]
        if options:
            args.submit_parser.parse_args([*options, args.config], namespace=args)
    args.stage_args = rest
    cfg = load_config(args.config, args.overrides)  # a bad job file fails here, not on the cluster
    if rest and rest[0] in ("train", "quickstart"):
        _plan_check(args, cfg, f"the submitted {rest[0]}")
    return submit(
        args.config,
        args.stage_args,
        address=args.address,
        overrides=args.overrides,
        follow=not args.no_follow,
        project=args.project,
    )


def cmd_jobs(args: argparse.Namespace) -> int:
    from rayft.cluster import jobs

    if args.action == "fetch":
        from rayft.cluster.fetch import fetch

        if not args.job_id:
            raise RayftError("rayft jobs fetch: give the job id (see `rayft jobs list`)")
        return fetch(args.job_id, address=args.address, out=args.out)
    return jobs(args.action, job_id=args.job_id, address=args.address, follow=args.follow)


def cmd_k8s_render(args: argparse.Namespace) -> int:
    from rayft.cluster.k8s import object_name, render

    cfg = load_config(args.config, args.overrides)
    _plan_check(args, cfg, "the rendered RayJob's training")
    out = Path(args.out)
    paths = render(cfg, out, config_path=args.config, overrides=args.overrides)
    for path in paths:
        print(f"wrote {path}")
    name = object_name(cfg)
    ns = cfg.cluster.k8s.namespace
    steps = [
        (f"kubectl apply -k {out}", "ConfigMap, PVC, RayJob: prepare + train"),
        (f"kubectl -n {ns} logs -f job/{name}-train", "follow the run"),
        (f"kubectl apply -f {out / 'rayservice.yaml'}", "serve, once the RayJob succeeded"),
    ]
    width = max(len(cmd) for cmd, _ in steps)
    print("next:")
    for cmd, why in steps:
        print(f"  {cmd:<{width}}  # {why}")
    return 0


# --------------------------------------------------------------------------- parser


def _no_plan_check(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--no-plan-check",
        action="store_true",
        help="launch even when `rayft plan` says the job does not fit",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rayft", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def stage(name: str, help: str, func, required: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        _config_args(p, required=required)
        p.set_defaults(func=func)
        return p

    stage("prepare", "validate, clean, split, tokenize and pack the data", cmd_prepare)
    p = stage("train", "fine-tune on Ray Train", cmd_train)
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    _no_plan_check(p)
    stage("eval", "compare base and fine-tuned models on the test split", cmd_eval)
    stage(
        "quickstart", "the whole loop on the embedded default model", cmd_quickstart, False
    ).add_argument("--resume", action="store_true", help="continue an interrupted quickstart")
    stage("serve", "OpenAI-compatible API on Ray Serve", cmd_serve)

    p = sub.add_parser("ab", help="A/B experiments").add_subparsers(dest="ab", required=True)
    r = p.add_parser("report", help="per-arm win rates and ratings with CIs")
    _config_args(r)
    r.add_argument("--experiment", help="experiment name (default: all)")
    r.add_argument("--json", action="store_true", help="print the report as JSON")
    r.set_defaults(func=cmd_ab_report)

    p = sub.add_parser("data", help="training data").add_subparsers(dest="data", required=True)
    r = p.add_parser("from-feedback", help="KTO and DPO rows from served answers' feedback")
    r.add_argument("serve_dir", metavar="SERVE_DIR", help="<run_dir>/serve of a serving run")
    r.add_argument("--out", required=True, help="where kto.jsonl, dpo.jsonl and the report go")
    r.add_argument("--min-good-rating", type=float, help="good from (1-5: 4; thumbs: 0.5)")
    r.add_argument("--max-bad-rating", type=float, help="bad up to (1-5: 2; thumbs: below 0.5)")
    r.add_argument(
        "--exclude-arm",
        action="append",
        default=[],
        metavar="NAME",
        help="leave this arm's answers out, e.g. the one being trained (repeatable)",
    )
    r.add_argument("--experiment", help="only feedback on this experiment's answers")
    r.set_defaults(func=cmd_data_from_feedback)

    add_plan_cli(sub, _config_args)  # offline: will the job fit, where, how long, what cost

    stage("merge", "merge the adapter into the base; verify", cmd_merge)
    stage("export", "export the merged model (GGUF); verify", cmd_export).add_argument(
        "--format", default="gguf", choices=["gguf"], help="export format"
    )

    p = sub.add_parser("config", help="job files").add_subparsers(dest="cfg", required=True)
    s = p.add_parser("show", help="print the resolved config")
    _config_args(s, required=False)
    s.add_argument("--help-fields", action="store_true", help="list every key with its meaning")
    s.set_defaults(func=cmd_config_show)

    p = sub.add_parser("models", help="base models").add_subparsers(dest="models", required=True)
    s = p.add_parser("list", help="registry models and whether they are cached")
    s.set_defaults(func=cmd_models_list)
    s = p.add_parser("pull", help="cache registry models")
    s.add_argument("names", nargs="+")
    s.add_argument("--force", action="store_true", help="rebuild even when cached")
    s.set_defaults(func=cmd_models_pull)

    p = sub.add_parser("cluster", help="Ray clusters").add_subparsers(dest="cluster", required=True)
    s = p.add_parser("status", help="nodes, CPUs/GPUs and running rayft jobs")
    s.add_argument(
        "--address",
        help="GCS (HEAD:6379) or dashboard (http://HEAD:8265) address (default: RAY_ADDRESS; "
        "neither: an embedded local Ray)",
    )
    s.set_defaults(func=cmd_cluster_status)
    s = p.add_parser(
        "check",
        help="pre-flight: can the job's stages run on the cluster (resources, packages, storage)",
    )
    _config_args(s)
    s.add_argument(
        "--stage",
        action="append",
        choices=["prepare", "train", "eval", "serve", "merge", "export"],
        help="stage to check (repeatable; default: prepare, train, eval)",
    )
    s.set_defaults(func=cmd_cluster_check)

    p = sub.add_parser(
        "submit",
        help="run a stage as a Ray Job: rayft submit CONFIG -- STAGE [ARGS]",
        description="Token-authenticated clusters: set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH).",
    )
    p.add_argument("config", help="job file (YAML), inside the project directory")
    _set_arg(p)
    p.add_argument("--address", help="Ray dashboard, e.g. http://HEAD:8265 (default: RAY_ADDRESS)")
    p.add_argument(
        "--project",
        help="directory uploaded as the job's working_dir (default: the current directory)",
    )
    p.add_argument("--no-follow", action="store_true", help="return after submitting")
    _no_plan_check(p)
    p.add_argument("stage_args", nargs=argparse.REMAINDER, help="-- STAGE [ARGS]")
    p.set_defaults(func=cmd_submit, submit_parser=p)

    p = sub.add_parser("jobs", help="Ray Jobs submitted by rayft")
    p.add_argument("action", choices=["list", "logs", "stop", "fetch"])
    p.add_argument("job_id", nargs="?")
    p.add_argument("--address", help="Ray dashboard address (default: RAY_ADDRESS)")
    p.add_argument("--follow", "-f", action="store_true", help="logs: stream until the job ends")
    p.add_argument(
        "--out",
        help="fetch: where the run's adapter, reports and summaries go (default: ./RUN_DIR_NAME)",
    )
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("k8s", help="KubeRay").add_subparsers(dest="k8s", required=True)
    s = p.add_parser("render", help="render RayJob / RayService manifests")
    s.add_argument("config", help="job file (YAML)")
    _set_arg(s, "cluster.k8s.namespace=ml")
    s.add_argument("--out", required=True, help="output directory (one file per object)")
    _no_plan_check(s)
    s.set_defaults(func=cmd_k8s_render)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args) or 0
    except RayftError as e:
        print(f"rayft: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("rayft: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
