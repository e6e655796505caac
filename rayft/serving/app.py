"""`rayft serve` and `rayft ab report`: config -> Ray Serve application, and back to a report."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from rayft.config import JobConfig, ServeConfig
from rayft.errors import RayftError
from rayft.serving.ab import read_jsonl, report
from rayft.serving.adapters import base_linears, check_compatible, fingerprint, resolve_adapter
from rayft.serving.errors import ServeError
from rayft.serving.merged import kind, merge_adapter

APP_NAME = "rayft"
MERGED_APP = APP_NAME + "-merged-"  # + adapter name: admin-loaded merged fallbacks


class ServeConfigError(RayftError):
    pass


def _settings(cfg: JobConfig):
    from rayft import models
    from rayft.serving.engine_server import engine_class
    from rayft.serving.ingress import Settings

    s = cfg.serve
    kinds = engine_class(s.engine).serves(s.dora)
    base_dir = models.resolve(cfg.model.base, cfg.model.revision)
    dirs = {"base": base_dir}
    for name, path in s.models.items():
        if name == "base" or name in s.adapters or name in s.experiments:
            raise ServeConfigError(f"serve.models.{name}: the name is used twice; rename it")
        dirs[name] = models.resolve(path, pull_missing=False)
    serve_dir = cfg.run_path.resolve() / "serve"
    linears = base_linears(base_dir)
    adapters, merged = {}, {}
    for name, spec in s.adapters.items():
        try:  # the config is the operator's own: no root check, but the same file rules
            path = resolve_adapter(spec, None, serve_dir / "adapter_cache")
            check_compatible(path, linears, s.max_lora_rank)
            if kind(path) not in kinds:  # served as its own engine deployment, in this app
                dirs[name] = merge_adapter(cfg, name, path)
                merged[name] = {"adapter": str(path), "model": dirs[name], "app": None}
                continue
        except ServeError as e:
            raise ServeConfigError(f"serve.adapters.{name}: {e.message}") from None
        adapters[name] = fingerprint(name, path)
    known = {"base", cfg.model.base, *dirs, *adapters}
    for exp, spec in s.experiments.items():
        for arm in [*spec.arms, *([spec.shadow] if spec.shadow else [])]:
            if arm not in known:
                raise ServeConfigError(
                    f"serve.experiments.{exp}: arm {arm!r} is neither `base`, a serve.models "
                    f"name nor a serve.adapters name (known: {sorted(known)})"
                )
    return Settings(
        base_alias=cfg.model.base,
        model_dirs=dirs,
        engine_kind=s.engine,
        serve_dir=str(serve_dir),
        adapter_root=str(Path(s.adapter_root or cfg.run_dir).resolve()),
        adapters=adapters,
        adapter_kinds=kinds,
        merged=merged,
        job=cfg,
        experiments={n: e.model_dump() for n, e in s.experiments.items()},
        api_key=os.environ.get("RAYFT_API_KEY") or s.api_key,
        admin_key=os.environ.get("RAYFT_ADMIN_KEY") or s.admin_key,
        max_tokens_limit=s.max_tokens_limit,
        max_n=s.max_n,
        max_lora_rank=s.max_lora_rank,
    )


def engine_deployment(s: ServeConfig, name: str, path: str):
    """The engine deployment `engine-<name>` of one model directory (bound, not yet running)."""
    from rayft.serving.engine_server import EngineServer

    scaling = (
        {"autoscaling_config": s.autoscaling.model_dump()}
        if s.autoscaling
        else {"num_replicas": s.num_replicas}
    )
    return EngineServer.options(
        name=f"engine-{name}",
        max_ongoing_requests=s.max_ongoing_requests,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": s.cpus_per_replica, "num_gpus": s.gpus_per_replica},
        health_check_period_s=5,
        **scaling,
    ).bind(
        s.engine,
        path,
        s.max_loaded_adapters,
        s.max_lora_rank,
        s.max_batch_size,
        s.batch_wait_ms / 1000,
        max(1, int(s.cpus_per_replica)),
        s.gpus_per_replica,
        s.dora,
    )


def build_app(cfg: JobConfig):
    """The Serve application: one engine deployment per model directory behind the ingress."""
    s = cfg.serve
    if s.engine == "vllm":
        from rayft.serving.vllm_engine import _import_vllm

        _import_vllm()  # fail here, with the install hint, not inside a replica
    from rayft.serving.ingress import Ingress

    settings = _settings(cfg)
    engines = {name: engine_deployment(s, name, path) for name, path in settings.model_dirs.items()}
    # The ingress queue bounds what waits in front of the engines; past it the proxy answers 503.
    # It is sized for the most engine replicas there can be, so that autoscaled engines are
    # not starved behind a single ingress replica.
    most_replicas = s.autoscaling.max_replicas if s.autoscaling else s.num_replicas
    return Ingress.options(
        max_ongoing_requests=4 * s.max_ongoing_requests * most_replicas,
        max_queued_requests=s.max_queued_requests,
        ray_actor_options={"num_cpus": 0},
    ).bind(engines, settings)


def start(cfg: JobConfig) -> str:
    """Deploy on the Ray that is already connected; return the API's base URL once it answers."""
    from ray import serve

    registry = cfg.run_path / "serve" / "adapters.json"
    registry.unlink(missing_ok=True)  # admin loads of an earlier `rayft serve` are not revived
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    _delete_merged_apps()  # nor are their merged deployments (left by a crash)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}/v1"


def stop(shutdown: bool = True) -> None:
    """Remove the rayft application; `shutdown` also stops Serve itself, which would take down
    every other application too, so it is only for a Ray that rayft started."""
    from ray import serve

    _delete_merged_apps()
    serve.delete(APP_NAME)
    if shutdown:
        serve.shutdown()


def _delete_merged_apps() -> None:
    from ray import serve

    for app in serve.status().applications:
        if app.startswith(MERGED_APP):
            serve.delete(app)


def serve(cfg: JobConfig) -> None:
    """Serve until Ctrl-C or SIGTERM, then remove the deployments (and the embedded Ray)."""
    from rayft.cluster.connect import local_cpus, ray_session

    def on_term(signum, frame):
        raise KeyboardInterrupt

    with ray_session(
        cfg.cluster.address,
        num_cpus=local_cpus(cfg.cluster.num_workers, cfg.cluster.cpus_per_worker),
    ) as embedded:
        # After ray.init: Ray installs its own SIGTERM handler, which would abort the process.
        previous = signal.signal(signal.SIGTERM, on_term)
        started = time.time()
        try:  # a signal during start-up must also remove what was deployed so far
            url = start(cfg)
            s = cfg.serve
            print(
                f"rayft serve: {url} — models: base, {', '.join([*s.models, *s.adapters]) or '-'}"
                f"; experiments: {', '.join(s.experiments) or '-'}. Ctrl-C stops.",
                flush=True,
            )
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass
        finally:
            signal.signal(signal.SIGTERM, previous)
            stop(shutdown=embedded)
            log = read_jsonl(cfg.run_path / "serve" / "requests.jsonl")
            print(
                f"rayft serve: stopped after {time.time() - started:.0f} s; "
                f"{len(log)} requests in {cfg.run_path / 'serve' / 'requests.jsonl'}"
            )


def ab_report(cfg: JobConfig, experiment: str | None = None) -> dict:
    """Per-arm statistics of the request log and feedback; writes serve/ab_report.json."""
    serve_dir = cfg.run_path / "serve"
    requests = read_jsonl(serve_dir / "requests.jsonl")
    if not requests:
        raise ServeConfigError(
            f"{serve_dir / 'requests.jsonl'}: no requests logged yet; "
            "run `rayft serve` and send traffic to an experiment first"
        )
    result = report(requests, read_jsonl(serve_dir / "feedback.jsonl"), experiment)
    if experiment is not None and experiment not in result:
        raise ServeConfigError(
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


def app_builder(args: dict):
    """Entry for Serve config files and KubeRay RayService (`import_path:
    rayft.serving.app:app_builder`, `args: {config: job.yaml, overrides: [key=value, ...]}`)."""
    from rayft.config import load_config

    return build_app(load_config(args["config"], list(args.get("overrides", []))))
