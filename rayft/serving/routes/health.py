"""GET /health and /metrics."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio

from fastapi import APIRouter
from fastapi.responses import JSONResponse, Response
from ray import serve

from rayft.serving.deploy import engine_state
from rayft.serving.state import State

HEALTH_TIMEOUT_S = 5.0  # /health answers 503 when Serve's controller is slower than this
router = APIRouter()


@router.get("/health")
async def health(st: State) -> Response:
    """200 when every engine deployment has a replica that Serve counts as running; 503 naming
    the ones that have none.

    Serve's own view (`serve.status()`, kept by the controller's health checks), not a probe
    through the request queue: a probe waits behind real requests, so a saturated engine read
    as down. The price: a replica that dies is seen when Serve sees it, within its health check
    period (5 s)."""
    engines = sorted(st.engines)  # a copy: admin calls may change them meanwhile
    here = serve.get_replica_context().app_name
    merged = st.registry.merged
    where = {n: (merged[n]["app"] if merged.get(n, {}).get("app") else here) for n in engines}
    try:
        status = await asyncio.wait_for(asyncio.to_thread(serve.status), HEALTH_TIMEOUT_S)
    except Exception as e:  # the controller is down or stuck: nothing can be vouched for
        reason = f"Serve's controller did not report status: {type(e).__name__}: {e}"[:300]
        states = dict.fromkeys(engines, reason)
    else:
        states = {n: engine_state(status, where[n], f"engine-{n}") for n in engines}
    down = {n: s for n, s in states.items() if s != "ok"}
    if down:
        reason = "; ".join(f"engine {n}: {s}" for n, s in down.items())
        body = {"status": "unavailable", "engines": states, "reason": reason}
        return JSONResponse(body, status_code=503)
    return JSONResponse({"status": "ok", "engines": states})


@router.get("/metrics")
async def metrics(st: State) -> Response:
    body, content_type = st.metrics.render()
    return Response(body, media_type=content_type)
