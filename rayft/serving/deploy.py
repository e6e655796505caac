"""Engine deployments and their lifecycle in Ray Serve: one `engine-<name>` deployment per model
directory, merged deployments of adapters the engine cannot serve itself (their own Serve
applications, `rayft-merged-<name>`), and their removal with the weights they leave on disk."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import ray
from ray import serve
from ray.serve.exceptions import RayServeException
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayft.adapters import kind
from rayft.config import JobConfig, ServeConfig
from rayft.serving.errors import AdapterRefused, engine_errors
from rayft.serving.merged import merge_adapter

APP_NAME = "rayft"
MERGED_APP = APP_NAME + "-merged-"  # + adapter name: admin-loaded merged fallbacks
# Deployment states in which a deployment with no running replica still serves: requests wait
# for the replica being added (scale from zero), as they do behind a busy one.
_SCALING = ("HEALTHY", "UPSCALING")
# Merges of admin-loaded adapters run in a task, not in the ingress process (which would keep
# the peak memory of two models). No CPU reserved: a full cluster must not leave it pending.
_merge_task = ray.remote(num_cpus=0, max_retries=0)(merge_adapter)


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


def engine_state(status, app: str, deployment: str) -> str:
    """ "ok", or why Serve cannot route a request to the deployment now."""
    application = status.applications.get(app)
    d = application.deployments.get(deployment) if application else None
    if d is None:
        return f"deployment {deployment} of application {app} does not exist in Serve"
    running = d.replica_states.get("RUNNING", 0)
    if running > 0 or str(d.status.value) in _SCALING:
        return "ok"
    replicas = ", ".join(f"{n} {s}" for s, n in sorted(d.replica_states.items())) or "none"
    why = f"; {d.message}" if d.message else ""
    return f"{d.status.value}, no replica running (replicas: {replicas}){why}"[:300]


class MergedDeployFailed(Exception):
    """The merged application did not start (or its model does not load in the ingress); the
    application is deleted already, its weights are left for the caller, who knows what else
    uses them."""

    def __init__(self, model: str, app: str, cause: Exception):
        super().__init__(f"{type(cause).__name__}: {str(cause)[:600]}")
        self.model, self.app = model, app


async def deploy_merged(job: JobConfig, name: str, path: Path, add_model):
    """Merge the adapter into the base and run it as application `rayft-merged-<name>`, whose
    replicas run before this returns; `add_model(name, model_dir)` readies the ingress for it.
    Returns (handle, merged model dir)."""
    # On the ingress's node: the merged files land beside its adapter cache and registry.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    with engine_errors():
        model = await _merge_task.options(scheduling_strategy=here).remote(job, name, str(path))
    app = MERGED_APP + name
    try:  # blocks until its replicas run: answered requests never reach a missing model
        handle = await asyncio.to_thread(
            serve.run, engine_deployment(job.serve, name, model), name=app, route_prefix=None
        )
        await asyncio.to_thread(add_model, name, model)
    except RayServeException as e:
        raise AdapterRefused(
            f"{path} needs a merged deployment (the engine does not serve {kind(path)} "
            f"adapters), and Serve refused to deploy it: {e}. Where Serve is run from a config "
            "file (KubeRay RayService), merge it with `rayft merge` and list the result in "
            "serve.models",
            "path",
        ) from None
    except Exception as e:
        await asyncio.to_thread(serve.delete, app)
        raise MergedDeployFailed(model, app, e) from None
    return handle, model


async def remove_merged(app: str | None, model: str | None) -> None:
    """Delete a merged application and its weights (the scratch run dir `merge` wrote them in)."""
    if app is not None:
        await asyncio.to_thread(serve.delete, app)
    if model is not None:
        shutil.rmtree(Path(model).parent, ignore_errors=True)


def delete_merged_apps() -> None:
    for app in serve.status().applications:
        if app.startswith(MERGED_APP):
            serve.delete(app)
