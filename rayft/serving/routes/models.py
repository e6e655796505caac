"""GET /v1/models: every name a request's `model` may take."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from fastapi import APIRouter, Request

from rayft.serving.state import State

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, st: State) -> dict:
    st.auth(request)
    r = st.registry
    names = ["base", *sorted(r.engines() - {"base"}), *sorted(r.adapters), *sorted(r.experiments)]
    return {
        "object": "list",
        "data": [{"id": n, "object": "model", "created": 0, "owned_by": "rayft"} for n in names],
    }
