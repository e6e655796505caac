"""The HTTP face: an OpenAI-compatible FastAPI app inside a Ray Serve deployment.

It checks keys, validates and tokenizes requests (so bad ones never reach a model replica),
routes by `model` (base, merged model, adapter or experiment), sends shadow copies, and writes
the request log and the Prometheus metrics. Model replicas are reached through handles.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
import asyncio
import hmac
import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import ray
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from ray.exceptions import RayTaskError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from rayft.config import JobConfig
from rayft.serving import openai_api as oa
from rayft.serving.ab import JsonlLog, read_jsonl
from rayft.serving.adapters import base_linears, check_compatible, fingerprint, resolve_adapter
from rayft.serving.app import MERGED_APP, engine_deployment
from rayft.serving.errors import (
    AdapterRefused,
    BadRequest,
    EngineFailed,
    NotFound,
    Overloaded,
    ServeError,
    Unauthorized,
)
from rayft.serving.merged import kind, merge_adapter
from rayft.serving.metrics import Metrics
from rayft.serving.protocol import AdapterRef, GenRequest, GenResult
from rayft.serving.routing import Target, resolve

HEALTH_TIMEOUT_S = 5.0  # /health answers 503 when Serve's controller is slower than this
# Merges of admin-loaded adapters run in a task, not in the ingress process (which would keep
# the peak memory of two models). No CPU reserved: a full cluster must not leave it pending.
_merge_task = ray.remote(num_cpus=0, max_retries=0)(merge_adapter)


@dataclass
class Settings:
    """What the ingress needs, taken from the job config by `app.build_app`."""

    base_alias: str  # model.base as written in the config; `base` always works too
    model_dirs: dict[str, str]  # engine name ("base" or merged name) -> model directory
    engine_kind: str
    serve_dir: str  # <run_dir>/serve
    adapter_root: str
    adapters: dict[str, AdapterRef] = field(default_factory=dict)
    adapter_kinds: frozenset[str] = frozenset({"lora"})  # what the engine serves itself
    # adapter name -> {"adapter": dir, "model": merged dir, "app": None (in this app) or the
    # Serve application of an admin-loaded one}: adapters served as merged models
    merged: dict[str, dict] = field(default_factory=dict)
    job: JobConfig | None = None  # for merges and engine deployments made at run time
    experiments: dict[str, dict] = field(default_factory=dict)
    api_key: str | None = None
    admin_key: str | None = None
    max_tokens_limit: int = 1024
    max_n: int = 8
    max_lora_rank: int = 64


api = FastAPI(title="rayft", docs_url=None, redoc_url=None)


@api.exception_handler(ServeError)
async def _serve_error(_: Request, e: ServeError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


def _server_error(e: BaseException) -> JSONResponse:
    body = {
        "error": {
            "message": f"{type(e).__name__}: {e}"[:500],
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    return JSONResponse(body, status_code=500)


# Before the class: Serve pickles the ingress class by value, with the globals defined so far.
async def _prepend(first, rest):
    if first is not None:
        yield first
        async for piece in rest:
            yield piece


# Deployment states in which a deployment with no running replica still serves: requests wait
# for the replica being added (scale from zero), as they do behind a busy one.
_SCALING = ("HEALTHY", "UPSCALING")


def _engine_state(status, app: str, deployment: str) -> str:
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


@serve.deployment
@serve.ingress(api)
class Ingress:
    def __init__(self, engines: dict[str, DeploymentHandle], settings: Settings):
        self.engines = dict(engines)
        self.s = settings
        self.tokenizers, self.context, self.vocab = {}, {}, {}
        for name, path in settings.model_dirs.items():
            self._add_model(name, path)
        self.linears = base_linears(settings.model_dirs["base"])
        serve_dir = Path(settings.serve_dir)
        self.requests = JsonlLog(serve_dir / "requests.jsonl")
        self.feedback = JsonlLog(serve_dir / "feedback.jsonl")
        self.registry_file = serve_dir / "adapters.json"
        self.adapters = dict(settings.adapters)
        self.experiments = dict(settings.experiments)
        self.merged = dict(settings.merged)
        self._restore_registry()
        self.arm_of: dict[str, dict] = {}  # response id -> log record, for feedback
        self.metrics = Metrics()
        self._background: set[asyncio.Task] = set()
        # Admin loads and unloads await merges and deployments: without this, a DELETE could
        # land between a load's checks and its registry update, or two loads of one name
        # could each deploy and then delete the other's weights.
        self._admin_lock = asyncio.Lock()

    # ------------------------------------------------------------------ plumbing

    def _auth(self, request: Request, key: str | None) -> None:
        if key is None:
            return
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise Unauthorized(
                "Missing or wrong API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )

    def _admin(self, request: Request) -> None:
        # No admin key means no admin API: loading code-adjacent files must never be open.
        if self.s.admin_key is None:
            raise Unauthorized(
                "The admin API is off: set serve.admin_key (or RAYFT_ADMIN_KEY) to use it",
                code="admin_disabled",
            )
        self._auth(request, self.s.admin_key)

    async def _body(self, request: Request) -> object:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("The body is not valid JSON", code="invalid_json") from None

    def _add_model(self, name: str, path: str) -> None:
        from transformers import AutoConfig, AutoTokenizer

        self.tokenizers[name] = AutoTokenizer.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        self.context[name] = config.max_position_embeddings
        self.vocab[name] = config.vocab_size

    def _drop_model(self, name: str) -> None:
        for table in (self.engines, self.tokenizers, self.context, self.vocab):
            table.pop(name, None)

    def _restore_registry(self) -> None:
        # Admin-loaded adapters outlive an ingress restart within the same `rayft serve`.
        if not self.registry_file.exists():
            return
        # The file holds the whole state, unloads of configured adapters included.
        saved = json.loads(self.registry_file.read_text())
        self.adapters = {n: AdapterRef(**a) for n, a in saved["adapters"].items()}
        self.experiments = saved["experiments"]
        self.merged = saved.get("merged", {})
        for name in set(self.s.merged) - set(self.merged):  # configured, then unloaded
            self._drop_model(name)
        for name, m in self.merged.items():
            if m["app"] is not None:  # admin-loaded: its own application, still running
                self.engines[name] = serve.get_deployment_handle(
                    f"engine-{name}", app_name=m["app"]
                )
                self._add_model(name, m["model"])

    def _save_registry(self) -> None:
        data = {
            "adapters": {n: vars(a) for n, a in self.adapters.items()},
            "experiments": self.experiments,
            "merged": self.merged,
        }
        tmp = self.registry_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=2))
        tmp.replace(self.registry_file)

    def _route(self, model: str, user: str | None) -> tuple[Target, Target | None]:
        return resolve(
            model,
            self.s.base_alias,
            set(self.engines) - {"base"},
            self.adapters,
            self.experiments,
            user,
        )

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ requests

    def _prompt_ids(self, engine: str, req: oa.ChatRequest | oa.CompletionRequest) -> list[int]:
        tok = self.tokenizers[engine]
        if isinstance(req, oa.ChatRequest):
            text = tok.apply_chat_template(
                [m.model_dump() for m in req.messages], add_generation_prompt=True, tokenize=False
            )
            return tok(text, add_special_tokens=False)["input_ids"]
        if isinstance(req.prompt, str):
            return tok(req.prompt)["input_ids"]
        bad = [t for t in req.prompt if not 0 <= t < self.vocab[engine]]
        if bad:
            raise BadRequest(
                f"prompt: token id {bad[0]} is outside the vocabulary [0, {self.vocab[engine]})",
                "prompt",
                "invalid_value",
            )
        return list(req.prompt)

    def _gen_request(self, target: Target, req, ids: list[int]) -> GenRequest:
        ctx = self.context[target.engine]
        if req.n > self.s.max_n:
            raise BadRequest(f"n={req.n} is above this server's limit of {self.s.max_n}", "n")
        asked = getattr(req, "max_completion_tokens", None) or req.max_tokens
        if asked is not None and asked > self.s.max_tokens_limit:
            raise BadRequest(
                f"max_tokens={asked} is above this server's limit of {self.s.max_tokens_limit}",
                "max_tokens",
                "invalid_value",
            )
        default = 16 if isinstance(req, oa.CompletionRequest) else self.s.max_tokens_limit
        max_tokens = asked or min(default, max(ctx - len(ids), 1))
        if len(ids) + max_tokens > ctx:
            raise BadRequest(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{len(ids) + max_tokens} tokens ({len(ids)} in the prompt, {max_tokens} for the "
                "completion). Please reduce the prompt or max_tokens.",
                "messages" if isinstance(req, oa.ChatRequest) else "prompt",
                "context_length_exceeded",
            )
        return GenRequest(
            ids, max_tokens, req.temperature, req.top_p, req.stops(), target.adapter, req.seed
        )

    def _log(
        self,
        rid: str,
        req,
        target: Target,
        status: int,
        started: float,
        prompt: int = 0,
        completion: int = 0,
        shadow: bool = False,
        stream: bool = False,
    ):
        latency = time.perf_counter() - started
        record = {
            "id": rid,
            "model": req.model,
            "experiment": target.experiment,
            "arm": target.arm,
            "user": req.user,
            "status": status,
            "latency_s": round(latency, 4),
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "shadow": shadow,
            "stream": stream,
        }
        self.requests.write(record)
        if not shadow:
            self.arm_of[rid] = record
            if len(self.arm_of) > 100_000:  # bounded; older ids are found in the log file
                self.arm_of.pop(next(iter(self.arm_of)))
        self.metrics.observe(target.arm, status, latency, prompt, completion, shadow)

    async def _generate(self, target: Target, gen: GenRequest, n: int) -> list:
        handle = self.engines[target.engine]
        try:
            return list(await asyncio.gather(*[handle.generate.remote(gen) for _ in range(n)]))
        except BackPressureError:
            raise Overloaded("The server is at capacity; retry later", code="overloaded") from None
        except RayTaskError as e:  # e.g. an adapter whose files changed since it was registered
            if isinstance(e.cause, ServeError):
                raise e.cause from None
            raise

    async def _shadow(self, target: Target, gen: GenRequest, rid: str, req) -> None:
        gen = replace(gen, adapter=target.adapter)
        started, status, results = time.perf_counter(), 200, []
        try:
            results = await self._generate(target, gen, 1)
        except Exception:  # a failing shadow must never touch the answered request
            status = 500
        tokens = sum(r.completion_tokens for r in results)
        self._log(
            f"{rid}-shadow", req, target, status, started, len(gen.prompt_ids), tokens, shadow=True
        )

    async def _complete(self, request: Request, chat: bool) -> Response:
        self._auth(request, self.s.api_key)
        req = oa.parse(oa.ChatRequest if chat else oa.CompletionRequest, await self._body(request))
        target, shadow = self._route(req.model, req.user)
        ids = self._prompt_ids(target.engine, req)
        gen = self._gen_request(target, req, ids)
        rid = oa.new_id("chatcmpl" if chat else "cmpl")
        headers = {"X-Rayft-Arm": target.arm, "X-Request-Id": rid}
        if shadow is not None:
            self._spawn(self._shadow(shadow, gen, rid, req))
        if req.stream:
            if req.n != 1:
                raise BadRequest("stream=true supports n=1 only", "n")
            started = time.perf_counter()
            pieces = self.engines[target.engine].options(stream=True).stream.remote(gen)
            try:  # wait for the first piece: errors before it get a real status, not an event
                first = await self._first(pieces)
            except ServeError as e:
                self._log(rid, req, target, e.status, started, len(ids), stream=True)
                raise
            except Exception as e:
                self._log(rid, req, target, 500, started, len(ids), stream=True)
                return _server_error(e)
            return StreamingResponse(
                self._sse(rid, req, target, gen, chat, pieces, first, started),
                headers=headers,
                media_type="text/event-stream",
            )
        started, status = time.perf_counter(), 500
        results = []
        try:
            results = await self._generate(target, gen, req.n)
            status = 200
        except ServeError as e:
            status = e.status
            raise
        except Exception as e:  # a replica died or failed: answer 500, keep serving
            return _server_error(e)
        finally:
            self._log(
                rid,
                req,
                target,
                status,
                started,
                len(ids),
                sum(r.completion_tokens for r in results),
            )
        body = (oa.chat_body if chat else oa.completion_body)(rid, req.model, results, len(ids))
        return JSONResponse(body, headers=headers)

    async def _first(self, pieces):
        try:
            return await pieces.__anext__()
        except StopAsyncIteration:
            return None
        except BackPressureError:
            raise Overloaded("The server is at capacity; retry later", code="overloaded") from None
        except RayTaskError as e:  # e.g. an adapter that could not be loaded
            if isinstance(e.cause, ServeError):
                raise e.cause from None
            raise

    async def _sse(
        self, rid: str, req, target: Target, gen: GenRequest, chat: bool, pieces, first, started
    ):
        status, done = 500, None

        def event(obj: dict) -> str:
            return f"data: {json.dumps(obj)}\n\n"

        try:
            if chat:
                yield event(
                    oa.chat_chunk(rid, req.model, {"role": "assistant", "content": ""}, None)
                )
            async for piece in _prepend(first, pieces):
                if isinstance(piece, GenResult):  # the engine's closing summary
                    done = piece
                    continue
                yield event(
                    oa.chat_chunk(rid, req.model, {"content": piece}, None)
                    if chat
                    else oa.completion_chunk(rid, req.model, piece, None)
                )
            finish = done.finish_reason if done else "stop"
            yield event(
                oa.chat_chunk(rid, req.model, {}, finish)
                if chat
                else oa.completion_chunk(rid, req.model, "", finish)
            )
            yield "data: [DONE]\n\n"
            status = 200
        except Exception as e:  # headers are sent already: report in-band, as OpenAI does
            cause = e.cause if isinstance(e, RayTaskError) else e
            body = cause.body() if isinstance(cause, ServeError) else None
            status = cause.status if isinstance(cause, ServeError) else 500
            yield event(body or {"error": {"message": str(e)[:500], "type": "server_error"}})
        finally:
            tokens = done.completion_tokens if done else 0
            self._log(rid, req, target, status, started, len(gen.prompt_ids), tokens, stream=True)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    @api.get("/v1/models")
    async def list_models(self, request: Request) -> dict:
        self._auth(request, self.s.api_key)
        names = [
            "base",
            *sorted(set(self.engines) - {"base"}),
            *sorted(self.adapters),
            *sorted(self.experiments),
        ]
        return {
            "object": "list",
            "data": [
                {"id": n, "object": "model", "created": 0, "owned_by": "rayft"} for n in names
            ],
        }

    @api.post("/v1/feedback")
    async def post_feedback(self, request: Request) -> dict:
        self._auth(request, self.s.api_key)
        fb = oa.parse(oa.FeedbackRequest, await self._body(request))
        if fb.rating is None and fb.preferred_over is None:
            raise BadRequest("Give a rating, a preferred_over response id, or both", "rating")
        known = self._record(fb.response_id)
        if known is None:
            raise NotFound(f"No response with id {fb.response_id!r}", "response_id")
        if fb.preferred_over is not None and self._record(fb.preferred_over) is None:
            raise NotFound(f"No response with id {fb.preferred_over!r}", "preferred_over")
        self.feedback.write(
            {**fb.model_dump(), "experiment": known["experiment"], "arm": known["arm"]}
        )
        return {"status": "recorded", "response_id": fb.response_id, "arm": known["arm"]}

    def _record(self, rid: str) -> dict | None:
        if rid in self.arm_of:
            return self.arm_of[rid]
        return next(
            (r for r in read_jsonl(self.requests.path) if r["id"] == rid and not r.get("shadow")),
            None,
        )

    @api.get("/health")
    async def health(self) -> Response:
        """200 when every engine deployment has a replica that Serve counts as running; 503
        naming the ones that have none.

        Serve's own view (`serve.status()`, kept by the controller's health checks), not a
        probe through the request queue: a probe waits behind real requests, so a saturated
        engine read as down. The price: a replica that dies is seen when Serve sees it, within
        its health check period (5 s)."""
        engines = sorted(self.engines)  # a copy: admin calls may change them meanwhile
        here = serve.get_replica_context().app_name
        where = {
            n: (self.merged[n]["app"] if self.merged.get(n, {}).get("app") else here)
            for n in engines
        }
        try:
            status = await asyncio.wait_for(asyncio.to_thread(serve.status), HEALTH_TIMEOUT_S)
        except Exception as e:  # the controller is down or stuck: nothing can be vouched for
            reason = f"Serve's controller did not report status: {type(e).__name__}: {e}"[:300]
            states = dict.fromkeys(engines, reason)
        else:
            states = {n: _engine_state(status, where[n], f"engine-{n}") for n in engines}
        down = {n: s for n, s in states.items() if s != "ok"}
        if down:
            reason = "; ".join(f"engine {n}: {s}" for n, s in down.items())
            body = {"status": "unavailable", "engines": states, "reason": reason}
            return JSONResponse(body, status_code=503)
        return JSONResponse({"status": "ok", "engines": states})

    @api.get("/metrics")
    async def metrics_endpoint(self) -> Response:
        body, content_type = self.metrics.render()
        return Response(body, media_type=content_type)

    # ------------------------------------------------------------------ admin

    @api.get("/admin/adapters")
    async def admin_list(self, request: Request) -> dict:
        self._admin(request)
        resident = {}
        for name, handle in list(self.engines.items()):  # a load may add one meanwhile
            resident[name] = await handle.loaded_adapters.remote()
        return {
            "adapters": {n: a.path for n, a in self.adapters.items()},
            "merged": self.merged,  # adapters served as merged models of their own
            "resident_on_replica": resident,
            "experiments": self.experiments,
        }

    @api.post("/admin/adapters")
    async def admin_load(self, request: Request) -> dict:
        self._admin(request)
        spec = oa.parse(oa.AdapterLoad, await self._body(request))
        async with self._admin_lock:
            return await self._load(spec)

    async def _load(self, spec: oa.AdapterLoad) -> dict:
        if (
            spec.name in ("base", self.s.base_alias)
            or (spec.name in self.engines and spec.name not in self.merged)
            or spec.name in self.experiments
        ):
            raise BadRequest(f"name {spec.name!r} is taken by a model or experiment", "name")
        path = await asyncio.to_thread(
            resolve_adapter,
            spec.path,
            self.s.adapter_root,
            Path(self.s.serve_dir) / "adapter_cache",
        )
        info = check_compatible(path, self.linears, self.s.max_lora_rank)
        if kind(path) not in self.s.adapter_kinds:
            model = await self._deploy_merged(spec.name, path)
            return {"status": "loaded", "name": spec.name, "path": str(path), **info, **model}
        if spec.name in self.merged:  # the name served a merged model until now
            await self._delete_merged(spec.name)
        self.adapters[spec.name] = fingerprint(spec.name, path)
        self._save_registry()
        return {"status": "loaded", "name": spec.name, "path": str(path), **info}

    async def _deploy_merged(self, name: str, path: Path) -> dict:
        """Merge the adapter into the base and serve it as application `rayft-merged-<name>`."""
        # On the ingress's node: the merged files land beside its adapter cache and registry.
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        try:
            model = await _merge_task.options(scheduling_strategy=here).remote(
                self.s.job, name, str(path)
            )
        except RayTaskError as e:
            if isinstance(e.cause, ServeError):
                raise e.cause from None
            raise
        app = MERGED_APP + name
        try:  # blocks until its replicas run: answered requests never reach a missing model
            handle = await asyncio.to_thread(
                serve.run,
                engine_deployment(self.s.job.serve, name, model),
                name=app,
                route_prefix=None,
            )
            await asyncio.to_thread(self._add_model, name, model)  # its tokenizer, here
        except RayServeException as e:
            raise AdapterRefused(
                f"{path} needs a merged deployment (the engine does not serve "
                f"{kind(path)} adapters), and Serve refused to deploy it: {e}. Where Serve is "
                "run from a config file (KubeRay RayService), merge it with `rayft merge` and "
                "list the result in serve.models",
                "path",
            ) from None
        except Exception as e:  # its replicas failed to start, or its model does not load here
            replaced = await self._undo_merged_deploy(name, app, model)
            raise EngineFailed(
                f"adapter {name!r} ({path}) needs a merged deployment (the engine does not serve "
                f"{kind(path)} adapters), and the merged model in {model} failed to start or "
                f"load: {type(e).__name__}: {str(e)[:600]}. Its application {app} and merged "
                f"weights were removed and nothing was loaded{replaced}; see the replica logs "
                "(`ray logs`, the Serve dashboard) for the cause, then load it again",
                "path",
                "merged_deploy_failed",
            ) from None
        old = self.merged.get(name)
        self.engines[name] = handle
        self.merged[name] = {"adapter": str(path), "model": model, "app": app}
        self.adapters.pop(name, None)
        self._save_registry()
        if old and old["app"] and old["model"] != model:  # the same name with other weights
            shutil.rmtree(Path(old["model"]).parent, ignore_errors=True)
        return {"served_as": "merged", "model_dir": model}

    async def _undo_merged_deploy(self, name: str, app: str, model: str) -> str:
        """Remove what a failed merged deploy left: its application, and its merged weights
        (a cached merge that does not start would otherwise be reused by every retry).
        Returns a note for the error message when an earlier model of that name went too."""
        await asyncio.to_thread(serve.delete, app)
        note = ""
        old = self.merged.get(name)
        if old and old["app"] == app:  # the failed deploy replaced it in place: gone as well
            self.merged.pop(name)
            self._drop_model(name)
            self._save_registry()
            note = f" (the merged model served as {name!r} until now was replaced: unloaded too)"
        if not any(m["model"] == model for m in self.merged.values()):
            shutil.rmtree(Path(model).parent, ignore_errors=True)
        return note

    async def _delete_merged(self, name: str) -> None:
        m = self.merged.pop(name)
        self._drop_model(name)  # no request reaches it from now on
        self._save_registry()
        if m["app"] is not None:  # configured ones live in this app until the next start
            await asyncio.to_thread(serve.delete, m["app"])
            shutil.rmtree(Path(m["model"]).parent, ignore_errors=True)

    @api.delete("/admin/adapters/{name}")
    async def admin_unload(self, name: str, request: Request) -> dict:
        self._admin(request)
        async with self._admin_lock:
            return await self._unload(name)

    async def _unload(self, name: str) -> dict:
        if name not in self.adapters and name not in self.merged:
            raise NotFound(f"No adapter named {name!r}", "name")
        users = [
            e for e, x in self.experiments.items() if name in x["arms"] or x.get("shadow") == name
        ]
        if users:
            raise BadRequest(
                f"adapter {name!r} is an arm of experiment(s) {users}; delete those first", "name"
            )
        if name in self.merged:
            await self._delete_merged(name)
            return {"status": "unloaded", "name": name}
        # Replicas drop its weights by LRU; no request can reach it from now on.
        del self.adapters[name]
        self._save_registry()
        return {"status": "unloaded", "name": name}

    @api.get("/admin/experiments")
    async def admin_experiments(self, request: Request) -> dict:
        self._admin(request)
        return {"experiments": self.experiments}

    @api.post("/admin/experiments")
    async def admin_experiment(self, request: Request) -> dict:
        self._admin(request)
        spec = oa.parse(oa.ExperimentSpec, await self._body(request))
        async with self._admin_lock:  # a load in progress may be about to take the name
            return self._create_experiment(spec)

    def _create_experiment(self, spec: oa.ExperimentSpec) -> dict:
        if spec.name in ("base", self.s.base_alias) or spec.name in (
            set(self.engines) | set(self.adapters)
        ):
            raise BadRequest(f"name {spec.name!r} is taken by a model or adapter", "name")
        if not spec.arms or any(w < 0 for w in spec.arms.values()) or sum(spec.arms.values()) <= 0:
            raise BadRequest("arms need weights >= 0 that sum to more than 0", "arms")
        for arm in [*spec.arms, *([spec.shadow] if spec.shadow else [])]:
            if arm in self.experiments or arm == spec.name:
                raise BadRequest(f"arm {arm!r} is an experiment; arms are models", "arms")
            self._route(arm, None)  # unknown arm -> 404 naming it
        self.experiments[spec.name] = {"arms": spec.arms, "shadow": spec.shadow}
        self._save_registry()
        return {"status": "created", "name": spec.name}

    @api.delete("/admin/experiments/{name}")
    async def admin_experiment_delete(self, name: str, request: Request) -> dict:
        self._admin(request)
        if self.experiments.pop(name, None) is None:
            raise NotFound(f"No experiment named {name!r}", "name")
        self._save_registry()
        return {"status": "deleted", "name": name}
