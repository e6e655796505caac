"""/admin/adapters and /admin/experiments: load and unload adapters (hot, or as merged
deployments where the engine cannot serve their kind) and manage A/B experiments. Admin key
only; every change is made under the ingress's admin lock and persisted by the registry."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
from pathlib import Path

from fastapi import APIRouter, Request

from rayft.adapters import check_compatible, fingerprint, kind, resolve_adapter
from rayft.serving import openai_api as oa
from rayft.serving.deploy import MERGED_APP, MergedDeployFailed, deploy_merged, remove_merged
from rayft.serving.errors import EngineFailed
from rayft.serving.ft_loop import check_template
from rayft.serving.state import IngressState, State

router = APIRouter(prefix="/admin")


@router.get("/adapters")
async def list_adapters(request: Request, st: State) -> dict:
    st.admin(request)
    resident = {}
    for name, handle in list(st.engines.items()):  # a load may add one meanwhile
        resident[name] = await handle.loaded_adapters.remote()
    r = st.registry
    return {
        "adapters": {n: a.path for n, a in r.adapters.items()},
        "merged": r.merged,  # adapters served as merged models of their own
        "resident_on_replica": resident,
        "experiments": r.experiments,
    }


@router.post("/adapters")
async def load_adapter(request: Request, st: State) -> dict:
    st.admin(request)
    spec = oa.parse(oa.AdapterLoad, await st.body(request))
    async with st.admin_lock:
        st.registry.check_free(spec.name, "adapter", replaces="an adapter")
        path = await asyncio.to_thread(
            resolve_adapter, spec.path, st.s.adapter_root, Path(st.s.serve_dir) / "adapter_cache"
        )
        info = check_compatible(path, st.linears, st.s.job.serve.max_lora_rank)
        if (path.parent / "run.json").exists():  # a rayft run: it recorded its chat template
            await asyncio.to_thread(check_template, path.parent, st.tokenizers["base"])
        loaded = {"status": "loaded", "name": spec.name, "path": str(path), **info}
        if kind(path) not in st.s.adapter_kinds:
            return {**loaded, **await _load_merged(st, spec.name, path)}
        old = st.registry.merged.get(spec.name)  # the name served a merged model until now
        st.registry.add_adapter(fingerprint(spec.name, path))
        await asyncio.to_thread(st.registry.save)  # a database write: off the loop
        if old is not None:
            st.drop_model(spec.name)
            await remove_merged(old["app"], old["model"] if old["app"] else None)
        return loaded


async def _load_merged(st: IngressState, name: str, path: Path) -> dict:
    try:
        handle, model = await deploy_merged(st.s.job, name, path, st.add_model)
    except MergedDeployFailed as e:
        note = ""
        old = st.registry.merged.get(name)
        if old and old["app"] == e.app:  # the failed deploy replaced it in place: gone as well
            st.registry.merged.pop(name)
            st.drop_model(name)
            await asyncio.to_thread(st.registry.save)  # a database write: off the loop
            note = f" (the merged model served as {name!r} until now was replaced: unloaded too)"
        if not any(m["model"] == e.model for m in st.registry.merged.values()):
            await remove_merged(None, e.model)  # a cached merge that fails would be reused
        raise EngineFailed(
            f"adapter {name!r} ({path}) needs a merged deployment (the engine does not serve "
            f"{kind(path)} adapters), and the merged model in {e.model} failed to start or "
            f"load: {e}. Its application {e.app} and merged weights were removed and nothing "
            f"was loaded{note}; see the replica logs (`ray logs`, the Serve dashboard) for the "
            "cause, then load it again",
            "path",
            "merged_deploy_failed",
        ) from None
    st.engines[name] = handle
    old = st.registry.add_merged(name, str(path), model, MERGED_APP + name)
    await asyncio.to_thread(st.registry.save)  # a database write: off the loop
    if old and old["app"] and old["model"] != model:  # the same name with other weights
        await remove_merged(None, old["model"])
    return {"served_as": "merged", "model_dir": model}


@router.delete("/adapters/{name}")
async def unload_adapter(name: str, request: Request, st: State) -> dict:
    st.admin(request)
    async with st.admin_lock:
        merged = st.registry.remove_adapter(name)  # from now on no request reaches it
        await asyncio.to_thread(st.registry.save)  # a database write: off the loop
        if merged is not None:
            st.drop_model(name)
            if merged["app"] is not None:  # configured ones live in the main app until restart
                await remove_merged(merged["app"], merged["model"])
        # A hot-loaded adapter's weights leave the replicas by LRU.
        return {"status": "unloaded", "name": name}


@router.get("/experiments")
async def list_experiments(request: Request, st: State) -> dict:
    st.admin(request)
    return {"experiments": st.registry.experiments}


@router.post("/experiments")
async def create_experiment(request: Request, st: State) -> dict:
    st.admin(request)
    spec = oa.parse(oa.ExperimentSpec, await st.body(request))
    async with st.admin_lock:  # a load in progress may be about to take the name
        st.registry.add_experiment(spec.name, spec.arms, spec.shadow)
        await asyncio.to_thread(st.registry.save)  # a database write: off the loop
    return {"status": "created", "name": spec.name}


@router.delete("/experiments/{name}")
async def delete_experiment(name: str, request: Request, st: State) -> dict:
    st.admin(request)
    async with st.admin_lock:
        st.registry.remove_experiment(name)
        await asyncio.to_thread(st.registry.save)  # a database write: off the loop
    return {"status": "deleted", "name": name}
