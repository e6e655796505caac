"""The HTTP face: an OpenAI-compatible FastAPI app inside a Ray Serve deployment.

Each resource's routes live in their module under `routes/` (completions, models, files,
fine_tuning, feedback, health, admin) and receive the replica's shared IngressState as a dependency. The app is built
per replica, after the state (Serve's late-bound ingress), so no route needs a global.
"""

from __future__ import annotations

import asyncio
import contextlib

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

from rayft.adapters import AdapterError
from rayft.serving.errors import AdapterRefused, ServeError
from rayft.serving.routes import admin, completions, feedback, files, fine_tuning, health, models
from rayft.serving.state import IngressState, Settings


async def _serve_error(_: Request, e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def _adapter_error(_: Request, e: AdapterError) -> JSONResponse:
    # rayft.adapters' checks are shared with export and eval: their errors are answered here.
    refused = AdapterRefused.of(e)
    return JSONResponse(refused.body(), status_code=refused.status)


@serve.deployment
@serve.ingress()
class Ingress:
    def __init__(self, engines: dict[str, DeploymentHandle], settings: Settings):
        self.st = IngressState(engines, settings)

    def __serve_build_asgi_app__(self) -> FastAPI:
        st = self.st

        @contextlib.asynccontextmanager
        async def lifespan(_: FastAPI):
            loop = None
            if st.ft is not None:  # the fine-tuning service's job loop runs with the replica
                from rayft.serving import ft_loop

                loop = asyncio.get_running_loop().create_task(ft_loop.run(st))
            yield
            if loop is not None:
                loop.cancel()

        api = FastAPI(title="rayft", docs_url=None, redoc_url=None, lifespan=lifespan)
        api.state.ingress = self.st
        api.add_exception_handler(ServeError, _serve_error)
        api.add_exception_handler(AdapterError, _adapter_error)
        for routes in (completions, models, files, fine_tuning, feedback, health, admin):
            api.include_router(routes.router)
        return api
