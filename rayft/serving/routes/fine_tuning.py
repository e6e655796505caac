"""/v1/fine_tuning/jobs: create, list, get, cancel, events, checkpoints (OpenAI's shapes). A
tenant sees only its own jobs; another tenant's id is answered as an unknown one (404). The
jobs themselves run in the service's loop (rayft/serving/ft_loop.py)."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio

from fastapi import APIRouter, Request

from rayft.serving import openai_api as oa
from rayft.serving.errors import BadRequest
from rayft.serving.ft_api import (
    JobCreate,
    checkpoint_object,
    event_object,
    job_object,
    only_query,
    page,
)
from rayft.serving.state import State

router = APIRouter(prefix="/v1/fine_tuning/jobs")


def _limit(limit: int) -> int:
    if not 1 <= limit <= 100:
        raise BadRequest("limit: 1 to 100", "limit", "invalid_value")
    return limit


@router.post("")
async def create(request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    tenant = st.owner(request)
    req = oa.parse(JobCreate, await st.body(request))
    return job_object(await asyncio.to_thread(svc.create, tenant, req))


@router.get("")
async def list_jobs(request: Request, st: State, after: str | None = None, limit: int = 20) -> dict:
    svc = st.fine_tuning()
    only_query(request, "after", "limit")
    rows, more = await asyncio.to_thread(
        svc.store.page, "jobs", tenant=st.tenant(request), after=after, limit=_limit(limit)
    )
    return page(rows, more, job_object)


@router.get("/{job_id}")
async def get_job(job_id: str, request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    return job_object(await asyncio.to_thread(svc.get, st.tenant(request), job_id))


@router.post("/{job_id}/cancel")
async def cancel(job_id: str, request: Request, st: State) -> dict:
    svc = st.fine_tuning()
    return job_object(await asyncio.to_thread(svc.cancel, st.tenant(request), job_id))


@router.get("/{job_id}/events")
async def events(
    job_id: str, request: Request, st: State, after: str | None = None, limit: int = 20
) -> dict:
    svc = st.fine_tuning()
    only_query(request, "after", "limit")
    await asyncio.to_thread(svc.get, st.tenant(request), job_id)  # 404 for another tenant's
    rows, more = await asyncio.to_thread(
        svc.store.page, "events", after=after, limit=_limit(limit), job_id=job_id
    )
    return page(rows, more, event_object)


@router.get("/{job_id}/checkpoints")
async def checkpoints(
    job_id: str, request: Request, st: State, after: str | None = None, limit: int = 10
) -> dict:
    svc = st.fine_tuning()
    only_query(request, "after", "limit")
    await asyncio.to_thread(svc.get, st.tenant(request), job_id)
    rows, more = await asyncio.to_thread(
        svc.store.page, "checkpoints", after=after, limit=_limit(limit), job_id=job_id
    )
    return page(rows, more, checkpoint_object)
