"""`rayft serve`: the job file's `serve:` -> a Ray Serve application, deployed and removed."""

from __future__ import annotations

import os
import signal
import time
import uuid
from pathlib import Path

from rayft.adapters import (
    AdapterError,
    base_linears,
    check_compatible,
    fingerprint,
    kind,
    resolve_adapter,
)
from rayft.config import JobConfig
from rayft.errors import RayftError
from rayft.serving.ab import read_jsonl
from rayft.serving.deploy import APP_NAME, delete_merged_apps, engine_deployment
from rayft.serving.errors import ServeError
from rayft.serving.ft_api import NAME
from rayft.serving.merged import merge_adapter
from rayft.serving.registry import Registry
from rayft.serving.state import Settings


class ServeConfigError(RayftError):
    pass


def _settings(cfg: JobConfig) -> Settings:
    """The ingress's settings from `serve:`; every name and arm checked by the registry's rules,
    every adapter vetted, and adapters the engine cannot serve merged (into this app)."""
    from rayft import models
    from rayft.serving.engine_server import engine_class

    s = cfg.serve
    kinds = engine_class(s.engine).serves(s.dora)
    base_dir = models.resolve(cfg.model.base, cfg.model.revision)
    dirs = {"base": base_dir}
    serve_dir = cfg.run_path.resolve() / "serve"
    linears = base_linears(base_dir)
    registry = Registry(cfg.model.base, base_name=base_name(cfg), server=uuid.uuid4().hex)
    try:
        for name, path in s.models.items():
            where = f"serve.models.{name}"
            registry.add_model(name)
            dirs[name] = models.resolve(path, pull_missing=False)
        for name, spec in s.adapters.items():
            where = f"serve.adapters.{name}"
            # The config is the operator's own: no root check, but the same file rules.
            path = resolve_adapter(spec, None, serve_dir / "adapter_cache")
            check_compatible(path, linears, s.max_lora_rank)
            if kind(path) in kinds:
                registry.add_adapter(fingerprint(name, path))
            else:  # served as its own engine deployment, in this app
                dirs[name] = merge_adapter(cfg, name, path)
                registry.add_merged(name, str(path), dirs[name], None)
        for name, exp in s.experiments.items():
            where = f"serve.experiments.{name}"
            registry.add_experiment(name, exp.arms, exp.shadow)
    except (ServeError, AdapterError) as e:
        raise ServeConfigError(f"{where}: {e.message}") from None
    if s.fine_tuning.enabled:
        _check_fine_tuning(cfg, kinds)
    api_key = os.environ.get("RAYFT_API_KEY") or s.api_key
    tenants = tenant_keys(s.api_keys)
    _check_shorthand(api_key, tenants)
    return Settings(
        model_dirs=dirs,
        serve_dir=str(serve_dir),
        adapter_root=str(Path(s.adapter_root or cfg.run_dir).resolve()),
        registry=registry,
        linears=linears,
        adapter_kinds=kinds,
        job=cfg,
        api_key=api_key,
        tenant_keys=tenants,
        admin_key=os.environ.get("RAYFT_ADMIN_KEY") or s.admin_key,
    )


def _check_fine_tuning(cfg: JobConfig, kinds: frozenset[str]) -> None:
    """Jobs train the job file's training.method: refuse, before any job trains, one whose
    result this server could not serve."""
    method = cfg.training.method
    kind_made = "dora" if method == "dora" else "lora"
    if method == "full" or kind_made not in kinds:
        raise ServeConfigError(
            f"serve.fine_tuning: training.method {method} makes "
            + ("a whole model" if method == "full" else f"{kind_made} adapters")
            + f", which serve.engine {cfg.serve.engine} does not hot-load; fine-tuning jobs "
            "train adapters served next to the base: set training.method lora or qlora"
        )


def base_name(cfg: JobConfig) -> str:
    """The base's served name: `serve.base_name`, else model.base as written (a registry name
    or hub id), or the directory's name when model.base is a path."""
    if cfg.serve.base_name:
        return cfg.serve.base_name
    base = cfg.model.base
    if base.startswith(("/", ".", "~")) or Path(base).expanduser().is_dir():
        return Path(base).expanduser().resolve().name
    return base


def tenant_keys(keys: dict[str, str]) -> dict[str, str]:
    """`serve.api_keys` with `env:VAR` values read from the environment."""
    out = {}
    for tenant, key in keys.items():
        if tenant == "admin":  # what the admin key creates would be this tenant's
            raise ServeConfigError("serve.api_keys: `admin` is the admin key's name; rename it")
        if not NAME.match(tenant):  # it becomes part of `ft:` model names
            raise ServeConfigError(
                f"serve.api_keys.{tenant}: a tenant name is 1 to 64 letters, digits, '.', '_' "
                "or '-'"
            )
        if key.startswith("env:"):
            var = key.removeprefix("env:")
            key = os.environ.get(var, "")
            if not key:
                raise ServeConfigError(
                    f"serve.api_keys.{tenant}: environment variable {var} is not set; set it or "
                    "write the key in the job file"
                )
        out[tenant] = key
    if len(set(out.values())) < len(out):
        raise ServeConfigError("serve.api_keys: two tenants share a key; give each its own")
    return out


def _check_shorthand(api_key: str | None, tenants: dict[str, str]) -> None:
    """`serve.api_key` is tenant `default`: it may not be a tenant's key or name too."""
    if api_key is None:
        return
    if "default" in tenants:
        raise ServeConfigError(
            "serve.api_keys names a tenant `default`, which serve.api_key already is; rename it"
        )
    if api_key in tenants.values():
        raise ServeConfigError("serve.api_key is also a tenant's key in serve.api_keys")


def build_app(cfg: JobConfig):
    """The Serve application: one engine deployment per model directory behind the ingress."""
    s = cfg.serve
    if s.engine == "vllm":
        from rayft.serving.vllm_engine import _import_vllm

        _import_vllm()  # fail here, with the install hint, not inside a replica
    from rayft.serving.ingress import Ingress  # imports FastAPI and Serve's ingress machinery

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
    # Admin loads of an earlier `rayft serve` are not revived, unless the fine-tuning service
    # keeps them in its database (there they are the record of what is served).
    registry.unlink(missing_ok=True)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
    delete_merged_apps()  # nor are their merged deployments (left by a crash)
    serve.run(build_app(cfg), name=APP_NAME, route_prefix="/")
    return f"http://{cfg.serve.host}:{cfg.serve.port}/v1"


def stop(shutdown: bool = True) -> None:
    """Remove the rayft application; `shutdown` also stops Serve itself, which would take down
    every other application too, so it is only for a Ray that rayft started."""
    from ray import serve

    delete_merged_apps()
    serve.delete(APP_NAME)
    if shutdown:
        serve.shutdown()


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


def app_builder(args: dict):
    """Entry for Serve config files and KubeRay RayService (`import_path:
    rayft.serving.app:app_builder`, `args: {config: job.yaml, overrides: [key=value, ...]}`)."""
    from rayft.config import load_config

    return build_app(load_config(args["config"], list(args.get("overrides", []))))
