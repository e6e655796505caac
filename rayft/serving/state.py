"""What the ingress's routes share: settings, engine handles, tokenizers, the registry, the
request log and metrics. One object per ingress replica, built in its constructor."""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Depends, Request
from ray import serve
from ray.serve.handle import DeploymentHandle

from rayft.config import JobConfig
from rayft.serving.ab import JsonlLog
from rayft.serving.errors import BadRequest, NotFound, Unauthorized
from rayft.serving.metrics import Metrics
from rayft.serving.registry import Registry


@dataclass
class Settings:
    """What the ingress needs, taken from the job config by `app.build_app`."""

    model_dirs: dict[str, str]  # engine name ("base", a model or merged adapter) -> directory
    serve_dir: str  # <run_dir>/serve
    adapter_root: str
    registry: Registry  # as configured; a persisted one replaces it (see IngressState)
    linears: dict[str, tuple[int, int]]  # the base's linear layers, which adapters must fit
    adapter_kinds: frozenset[str]  # what the engine serves itself; the rest is merged
    job: JobConfig  # merges and engine deployments made at run time need the base and serve
    api_key: str | None = None
    admin_key: str | None = None
    tenant_keys: dict[str, str] | None = None  # tenant -> key


log = logging.getLogger("ray.serve")


class IngressState:
    def __init__(self, engines: dict[str, DeploymentHandle], settings: Settings):
        self.s = settings
        self.limits = {
            "max_n": settings.job.serve.max_n,
            "max_tokens_limit": settings.job.serve.max_tokens_limit,
        }
        self.engines = dict(engines)
        self.tokenizers, self.context, self.vocab, self.token_text = {}, {}, {}, {}
        for name, path in settings.model_dirs.items():
            self.add_model(name, path)
        self.linears = settings.linears
        serve_dir = Path(settings.serve_dir)
        self.requests = JsonlLog(serve_dir / "requests.jsonl")
        self.feedback = JsonlLog(serve_dir / "feedback.jsonl")
        # A copy: Serve scans the constructor's arguments after it ran (they must stay picklable,
        # and the database handle is not).
        self.registry = copy.deepcopy(settings.registry)
        self.registry.path = serve_dir / "adapters.json"
        self.ft = None  # the fine-tuning service (serve.fine_tuning.enabled)
        if settings.job.serve.fine_tuning.enabled:
            from rayft.serving.ft_jobs import Service

            self.ft = Service(settings.job, settings.registry.base_name or "base")
            self.registry.store = self.ft.store  # what the admin API loads outlives restarts
        configured = dict(self.registry.merged)
        if self.registry.restore(self._fits):  # admin changes outlive an ingress restart
            for name in set(configured) - set(self.registry.merged):  # configured, unloaded
                self.drop_model(name)
            running = set(serve.status().applications) if self.ft else None
            for name, m in list(self.registry.merged.items()):
                if running is not None and m["app"] is not None and m["app"] not in running:
                    self.registry.merged.pop(name)  # a restarted server: load it again
                    continue
                if m["app"] is not None:  # admin-loaded: its own application, still running
                    self.engines[name] = serve.get_deployment_handle(
                        f"engine-{name}", app_name=m["app"]
                    )
                    self.add_model(name, m["model"])
            if self.ft is not None:
                self.registry.save()  # now this server's state
        self.arm_of: dict[str, dict] = {}  # response id -> log record, for feedback
        self.metrics = Metrics()
        self._background: set[asyncio.Task] = set()
        # Admin loads and unloads await merges and deployments: without this, a DELETE could
        # land between a load's checks and its registry update, or two loads of one name
        # could each deploy and then delete the other's weights.
        self.admin_lock = asyncio.Lock()

    def auth(self, request: Request, key: str | None = None) -> str | None:
        """Check the request's key; answer the tenant it belongs to (None when the API is
        open). `key` given: only that key is accepted (the admin API)."""
        keys = {"admin": key} if key is not None else dict(self.s.tenant_keys or {})
        if key is None and self.s.api_key is not None:
            keys["default"] = self.s.api_key
        if not keys:
            return None
        given = request.headers.get("authorization", "").encode()
        tenant = None
        for name, k in keys.items():  # every key compared: the time taken says nothing
            if hmac.compare_digest(given, f"Bearer {k}".encode()):
                tenant = name
        if tenant is None:
            raise Unauthorized(
                "Missing or wrong API key: send `Authorization: Bearer <key>`",
                code="invalid_api_key",
            )
        return tenant

    def _fits(self, path: str) -> bool:
        """Whether an adapter an earlier server served still fits this server's base."""
        from rayft.adapters import AdapterError, check_compatible

        try:
            check_compatible(Path(path), self.s.linears, self.s.job.serve.max_lora_rank)
        except (AdapterError, OSError) as e:
            log.warning("not serving %s again: %s", path, e)
            return False
        return True

    def tenant(self, request: Request) -> str | None:
        """Whose files and jobs a fine-tuning request sees: its tenant (`default` on an open
        API), or None, every tenant's, for the admin key."""
        if self.s.admin_key is not None:
            given = request.headers.get("authorization", "").encode()
            if hmac.compare_digest(given, f"Bearer {self.s.admin_key}".encode()):
                return None
        return self.auth(request) or "default"

    def owner(self, request: Request) -> str:
        """The tenant a new file or job belongs to: a tenant's key, never the admin's."""
        tenant = self.tenant(request)
        if tenant is None:
            raise BadRequest(
                "The admin key sees and cancels every tenant's files and jobs but owns none: "
                "upload and create jobs with the tenant's own key",
                code="admin_key_not_a_tenant",
            )
        return tenant

    def fine_tuning(self):
        if self.ft is None:
            raise NotFound(
                "Fine-tuning is off on this server: set serve.fine_tuning.enabled: true",
                code="fine_tuning_disabled",
            )
        return self.ft

    def admin(self, request: Request) -> None:
        # No admin key means no admin API: loading code-adjacent files must never be open.
        if self.s.admin_key is None:
            raise Unauthorized(
                "The admin API is off: set serve.admin_key (or RAYFT_ADMIN_KEY) to use it",
                code="admin_disabled",
            )
        self.auth(request, self.s.admin_key)

    async def body(self, request: Request) -> object:
        try:
            return await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise BadRequest("The body is not valid JSON", code="invalid_json") from None

    def add_model(self, name: str, path: str) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from rayft.serving.bodies import Tokens

        self.tokenizers[name] = AutoTokenizer.from_pretrained(path)
        self.token_text[name] = Tokens(self.tokenizers[name])
        config = AutoConfig.from_pretrained(path)
        self.context[name] = config.max_position_embeddings
        self.vocab[name] = config.vocab_size

    def drop_model(self, name: str) -> None:
        for table in (self.engines, self.tokenizers, self.context, self.vocab, self.token_text):
            table.pop(name, None)

    def spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)  # keep a reference: the loop only holds weak ones
        task.add_done_callback(self._background.discard)


def _of(request: Request) -> IngressState:
    return request.app.state.ingress  # set by the Ingress when it builds its app


# A route's parameter `st: State` receives its replica's IngressState.
State = Annotated[IngressState, Depends(_of)]
