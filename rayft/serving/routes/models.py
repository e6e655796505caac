"""GET /v1/models: every name a request's `model` may take."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from fastapi import APIRouter, Request

from rayft.serving.state import State

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, st: State) -> dict:
    tenant = st.auth(request)
    names = st.registry.visible(tenant or "default")
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": o} for n, o in names],
    }
