"""rayft's vLLM engine against the real, pinned vLLM (0.33.0), on CPU.

The test environment installs the pinned vLLM wheel without its dependencies (Makefile, setup),
so vLLM's Python code is real here, but its kernels cannot load (they need its CUDA torch).

What this covers:
- pins: vLLM's declared requirements (its wheel's metadata) against pyproject.toml's ranges,
  constraints.txt and docker/Dockerfile's pins, so a drift between them fails CI;
- every call rayft makes is bound to the real signature (AsyncEngineArgs, SamplingParams,
  LoRARequest, AsyncLLM.generate/add_lora/remove_lora/check_health), and the real objects are
  built at every value rayft's config and API allow (each allowed max_lora_rank, temperature
  and top_p extremes, stop lists, seeds, max_tokens), then encoded as vLLM sends them to its
  engine process;
- every finish_reason vLLM has is mapped; one id per adapter name in a batch;
- VllmEngine itself, driven through `AsyncLLMStandIn`: a stand-in for the AsyncLLM object only,
  because its engine core needs a GPU. Only the model is replaced (each request's tokens come
  from a script); what rayft receives is made by vLLM's own code: RequestOutputs from vLLM's
  OutputProcessor and RequestOutputCollector (detokenized deltas, final-only outputs, stop
  strings), adapter checks by vLLM's PEFTHelper against a real LoRAConfig, an adapter cache of
  vLLM's capacity and LRU order, and each step's adapters grouped in a set of LoRARequests as
  vLLM's InputBatch does (which loses an id when two share a name: the engine dies there and
  in the stand-in).

What this does not cover: the GPU kernels, the engine actually running (scheduling, memory,
model loading, tensor parallelism, vLLM's loading of adapter weights), and the CUDA image
actually building and resolving (only its pins are checked).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import time
import tomllib
import typing
from collections import OrderedDict
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_serve_units import make_adapter

try:
    import vllm  # noqa: F401
except ImportError as e:
    raise ImportError(f"{e}: run `make setup`, which installs the pinned vLLM for this test") from e

from vllm import SamplingParams
from vllm.config.lora import LoRAConfig, MaxLoRARanks
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.lora.peft_helper import PEFTHelper
from vllm.lora.request import LoRARequest
from vllm.v1.engine import (
    FINISH_REASON_STRINGS,
    EngineCoreOutput,
    EngineCoreRequest,
    FinishReason,
)
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.engine.output_processor import OutputProcessor, RequestOutputCollector
from vllm.v1.serial_utils import MsgpackEncoder

from rayft.adapters import AdapterError, base_linears, fingerprint
from rayft.config.serving import VLLM_LORA_RANKS
from rayft.serving import openai_api as oa
from rayft.serving.engine_server import EngineServer
from rayft.serving.errors import AdapterRefused, BadRequest, EngineFailed
from rayft.serving.protocol import GenRequest, GenResult
from rayft.serving.vllm_engine import (
    ANSWERED,
    VllmEngine,
    engine_args,
    finish_reason,
    lora_args,
    sampling_args,
)

ROOT = Path(__file__).resolve().parents[1]


def vllm_requires() -> dict[str, Requirement]:
    """vLLM's requirements (its extras' left out), by canonical name."""
    reqs = map(Requirement, metadata.requires("vllm") or [])
    return {
        canonicalize_name(r.name): r
        for r in reqs
        if not r.marker or r.marker.evaluate({"extra": ""})
    }


def dockerfile() -> tuple[dict[str, str], dict[str, str]]:
    """The Dockerfile's ARG defaults and its literal "name==version" pins."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    pins = dict(re.findall(r'"([A-Za-z0-9_.-]+)(?:\[[\w,]+\])?==([0-9][^"$]*)"', text))
    return args, pins


def test_pins_agree_with_what_vllm_declares():
    args, pins = dockerfile()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ranges = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    text = (ROOT / "constraints.txt").read_text()
    constraints = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M))
    version = metadata.version("vllm")
    assert project["optional-dependencies"]["vllm"] == [f"vllm=={version}"]
    assert args["VLLM_VERSION"] == constraints["vllm"] == version
    need = vllm_requires()
    # The CUDA image installs what vLLM accepts, pyproject accepts both images' versions, and
    # the CPU image runs the suite's own versions.
    for name in ("torch", "transformers"):
        cuda, cpu = args[f"CUDA_{name.upper()}"], args[f"CPU_{name.upper()}"]
        assert need[name].specifier.contains(cuda), (name, cuda, str(need[name]))
        assert ranges[name].contains(cuda) and ranges[name].contains(cpu), (name, ranges[name])
        assert cpu == constraints[name]
    for name, pinned in pins.items():  # the other pins both images install
        if canonicalize_name(name) in need:
            assert need[canonicalize_name(name)].specifier.contains(pinned), (name, pinned)


def test_engine_args_bind_and_every_allowed_rank_builds_a_lora_config(tiny_model):
    assert set(VLLM_LORA_RANKS) == set(typing.get_args(MaxLoRARanks))
    for rank in VLLM_LORA_RANKS:
        kwargs = engine_args(tiny_model, 16, rank, 2)
        inspect.signature(AsyncEngineArgs).bind(**kwargs)
        AsyncEngineArgs(**kwargs)
        lora = LoRAConfig(**{k: kwargs[k] for k in ("max_loras", "max_cpu_loras", "max_lora_rank")})
        assert (lora.max_lora_rank, lora.max_cpu_loras) == (rank, 16)
    with pytest.raises(ValueError):
        LoRAConfig(max_lora_rank=4)  # the kind of rank serve.max_lora_rank refuses for vLLM
    assert isinstance(inspect.getattr_static(AsyncLLM, "errored"), property)
    inspect.signature(AsyncLLM.from_engine_args).bind(AsyncEngineArgs(**kwargs))


def api_requests(limit: int) -> list[GenRequest]:
    """GenRequests at the extremes of what rayft's API accepts (parsed by its own rules)."""
    bodies = [
        {"temperature": 0, "top_p": 1, "max_tokens": 1, "seed": -(2**63)},
        {"temperature": 2, "top_p": 1e-9, "max_tokens": limit, "seed": 2**63 - 1},
        {"stop": "\n", "seed": 0},
        {"stop": ["a", "stop here", "\u00e9\u00e8"], "temperature": 0.7, "top_p": 0.9},
        {"stop": [], "seed": None},
    ]
    out = []
    for body in bodies:
        body = {"model": "m", "prompt": "hi", **body}
        req = oa.parse(oa.CompletionRequest, body, max_n=1, max_tokens_limit=limit)
        tokens = req.asked_tokens() or 16
        out.append(
            GenRequest([1, 2], tokens, req.temperature, req.top_p, req.stops(), None, req.seed)
        )
    return out


def test_sampling_params_at_every_value_the_api_allows(tmp_path, tiny_model):
    for r in api_requests(limit=1024):
        for stream in (True, False):
            kwargs = sampling_args(r, stream)
            inspect.signature(SamplingParams).bind(**kwargs)
            params = SamplingParams(**kwargs)
            assert (params.max_tokens, params.seed, params.stop) == (r.max_tokens, r.seed, r.stop)
            MsgpackEncoder().encode(params)  # as it crosses to vLLM's engine process
    prompt = TokensPrompt(prompt_token_ids=[1, 2])
    ref = fingerprint("a", make_adapter(tiny_model, tmp_path / "a", seed=0))
    lora = LoRARequest(**lora_args(ref, 1))
    inspect.signature(AsyncLLM.generate).bind(None, prompt, params, "id", lora_request=lora)
    inspect.signature(AsyncLLM.add_lora).bind(None, lora)
    inspect.signature(AsyncLLM.remove_lora).bind(None, lora.lora_int_id)
    # A seed vLLM cannot take reaching the engine (not through the API, which refuses it): the
    # request's 400, not a failure.
    with pytest.raises(BadRequest, match="64 bits"):
        sampling_args(GenRequest([1], 4, seed=2**63), stream=False)


def test_every_finish_reason_is_mapped():
    # A reason added by a later vLLM fails here, so someone decides what it means for rayft.
    assert set(FINISH_REASON_STRINGS) == {"stop", "length", "abort", "error", "repetition"}
    for reason in FinishReason:
        if str(reason) in ANSWERED:
            assert finish_reason(str(reason)) == str(reason)
        else:
            with pytest.raises(EngineFailed, match=str(reason)):
                finish_reason(str(reason))


def test_one_id_per_adapter_name_in_a_batch(tmp_path, tiny_model):
    """vLLM groups a step's LoRARequests in a set, equal by name: an adapter reloaded under the
    same name (what rayft named them by before) would lose an id there; rayft names them by key."""
    path = make_adapter(tiny_model, tmp_path / "a", seed=1)
    old = fingerprint("a", path)
    new = fingerprint("a", make_adapter(tiny_model, tmp_path / "a", seed=2))
    assert len({LoRARequest("a", 1, str(path)), LoRARequest("a", 2, str(path))}) == 1
    batch = [LoRARequest(**lora_args(old, 1)), LoRARequest(**lora_args(new, 2))]
    assert {r.lora_int_id for r in set(batch)} == {1, 2}


# --------------------------------------------------------------- VllmEngine through the stand-in


class AsyncLLMStandIn:
    """Stands in for vllm's AsyncLLM (see the module docstring: only the model is scripted)."""

    def __init__(self, tokenizer, lora_config: LoRAConfig, script):
        self.outputs = OutputProcessor(tokenizer, log_stats=False)
        self.lora_config = lora_config
        self.script = script  # (prompt ids, LoRARequest | None) -> (token ids, FinishReason)
        self.registered: OrderedDict[int, LoRARequest] = OrderedDict()  # least recent first
        self.running: dict[str, list] = {}  # request id -> [LoRARequest | None, tokens, reason]
        self.evicted_by_vllm = 0  # adapters vLLM's own LRU dropped
        self.loaded_in_step = 0  # adapters a model step had to load (not add_lora)
        self.dead: BaseException | None = None
        self._stepper: asyncio.Task | None = None

    def _bind(self, method: str, *args, **kwargs) -> dict:
        return inspect.signature(getattr(AsyncLLM, method)).bind(self, *args, **kwargs).arguments

    @property
    def errored(self) -> bool:
        return self.dead is not None

    def kill(self, e: BaseException) -> None:
        """The engine process died (a CUDA error, say): every request gets EngineDeadError."""
        self.dead = e
        self.outputs.propagate_error(EngineDeadError())

    async def check_health(self, *args, **kwargs) -> None:
        self._bind("check_health", *args, **kwargs)
        if self.errored:
            raise EngineDeadError()

    async def add_lora(self, *args, **kwargs) -> bool:
        lora = self._bind("add_lora", *args, **kwargs)["lora_request"]
        try:  # vLLM's engine answers a failed utility call with its message only
            self._register(lora)
        except Exception as e:
            raise Exception(f"Call to add_lora method failed: {e}") from None
        return True

    def _register(self, lora: LoRARequest) -> None:  # LRUCacheWorkerLoRAManager.add_adapter
        if lora.lora_int_id not in self.registered:
            PEFTHelper.from_local_dir(lora.lora_path, None).validate_legal(self.lora_config)
            if len(self.registered) >= self.lora_config.max_cpu_loras:
                self.registered.popitem(last=False)
                self.evicted_by_vllm += 1
            self.registered[lora.lora_int_id] = lora
        self.registered.move_to_end(lora.lora_int_id)

    async def remove_lora(self, *args, **kwargs) -> bool:
        lora_id = self._bind("remove_lora", *args, **kwargs)["lora_id"]
        return self.registered.pop(lora_id, None) is not None

    async def generate(self, *args, **kwargs):
        a = self._bind("generate", *args, **kwargs)
        if self.errored:
            raise EngineDeadError()
        params, rid, lora = a["sampling_params"], a["request_id"], a.get("lora_request")
        ids = a["prompt"]["prompt_token_ids"]
        request = EngineCoreRequest(
            request_id=rid,
            prompt_token_ids=ids,
            mm_features=None,
            sampling_params=params,
            pooling_params=None,
            arrival_time=time.time(),
            lora_request=lora,
            cache_salt=None,
            data_parallel_rank=None,
            external_req_id=rid,
        )
        queue = RequestOutputCollector(params.output_kind, rid)
        self.outputs.add_request(request, None, None, 0, queue)
        tokens, reason = self.script(ids, lora)
        if reason == FinishReason.STOP:  # the model ends its answer with EOS
            tokens = [*tokens, self.outputs.tokenizer.eos_token_id]
        if len(tokens) > params.max_tokens:
            tokens, reason = tokens[: params.max_tokens], FinishReason.LENGTH
        self.running[rid] = [lora, list(tokens), reason]
        if self._stepper is None or self._stepper.done():
            self._stepper = asyncio.create_task(self._steps())
        try:  # AsyncLLM.generate's own loop
            finished = False
            while not finished:
                out = queue.get_nowait() or await queue.get()
                finished = out.finished
                yield out
        finally:
            self.running.pop(rid, None)

    async def _steps(self) -> None:
        while self.running and not self.errored:
            await asyncio.sleep(0.002)
            loras = [lora for lora, _, _ in self.running.values() if lora is not None]
            try:  # what InputBatch.make_lora_inputs and the LoRA manager do with them
                by_id = {r.lora_int_id: r for r in set(loras)}
                for lora in [by_id[r.lora_int_id] for r in loras]:
                    if lora.lora_int_id not in self.registered:
                        self.loaded_in_step += 1
                        self._register(lora)
            except Exception as e:
                self.kill(e)
                return
            outs = []
            for rid, (_, tokens, reason) in self.running.items():
                if tokens:
                    token = tokens.pop(0)
                    last = reason if not tokens else None
                    outs.append(EngineCoreOutput(rid, [token], finish_reason=last))
            for rid in self.outputs.process_outputs(outs).reqs_to_abort:  # stopped by a stop string
                self.running[rid][1].clear()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def engine(tokenizer, tiny_model, script=None, max_loras=2, rank=8):
    def words(ids, lora):
        text = f" answer of {lora.lora_name[:4] if lora else 'base'} and more" * 2
        return tokenizer(text, add_special_tokens=False)["input_ids"], FinishReason.STOP

    args = engine_args(tiny_model, max_loras, rank, 1)  # the LoRA settings rayft gives vLLM
    lora_config = LoRAConfig(
        **{k: args[k] for k in ("max_loras", "max_cpu_loras", "max_lora_rank")}
    )
    llm = AsyncLLMStandIn(tokenizer, lora_config, script or words)
    return VllmEngine(llm, max_loras, rank, base_linears(tiny_model)), llm


def server(eng: VllmEngine):
    """An EngineServer around `eng`. Its constructor would start a real engine; it sets just
    these two attributes."""
    srv = object.__new__(EngineServer.func_or_class)
    srv.per_request, srv.engine = True, eng
    return srv


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_streams_come_in_pieces_while_other_requests_run(tokenizer, tiny_model, capfd):
    async def main():
        srv = server(engine(tokenizer, tiny_model)[0])
        long = asyncio.create_task(srv.generate(GenRequest([5, 6], 40)))
        await asyncio.sleep(0.02)  # the long request is mid-way when the stream arrives
        pieces = [p async for p in srv.stream(GenRequest([5, 6], 8))]
        assert not long.done()  # neither waited for the other: one running batch
        plain = await srv.generate(GenRequest([5, 6], 8))
        return pieces, plain, await long

    pieces, plain, long = run(main())
    *texts, done = pieces
    assert len(texts) > 2 and all(isinstance(t, str) for t in texts)
    assert isinstance(done, GenResult) and done.text == "".join(texts) == plain.text
    assert (done.completion_tokens, done.finish_reason, long.finish_reason) == (8, "length", "stop")
    assert capfd.readouterr() == ("", "")  # nothing printed per request


def test_finish_reasons_and_cut_short_answers(tokenizer, tiny_model):
    reasons = {7: FinishReason.ABORT, 8: FinishReason.ERROR, 9: FinishReason.STOP}

    def script(ids, lora):
        return tokenizer(" one two three four", add_special_tokens=False)["input_ids"], reasons[
            ids[0]
        ]

    async def main():
        eng, _ = engine(tokenizer, tiny_model, script)
        stopped = await eng.generate(GenRequest([9], 50, stop=["three"]))
        eos = await eng.generate(GenRequest([9], 50))
        for first in (7, 8):
            with pytest.raises(EngineFailed, match=str(reasons[first])):
                async for _ in eng.stream(GenRequest([first], 50)):
                    pass
        with pytest.raises(BadRequest, match="empty string"):  # the API lets "" through
            await eng.generate(GenRequest([9], 50, stop=[""]))
        return stopped, eos

    stopped, eos = run(main())
    assert (stopped.text, stopped.finish_reason) == (" one two ", "stop")
    assert (eos.text, eos.finish_reason) == (" one two three four", "stop")


def test_resident_adapters_are_an_lru_of_max_loras_and_reported_truthfully(
    tokenizer, tiny_model, tmp_path
):
    refs = {n: fingerprint(n, make_adapter(tiny_model, tmp_path / n, seed=i)) for i, n in
            enumerate("abc")}  # fmt: skip

    async def main():
        eng, llm = engine(tokenizer, tiny_model, max_loras=2)
        for name in "abac":  # c evicts b, the least recently used
            await eng.generate(GenRequest([5], 4, adapter=refs[name]))
        assert sorted(eng.loaded_adapters()) == ["a", "c"]
        assert {r.lora_name for r in llm.registered.values()} == {refs["a"].key, refs["c"].key}
        # One slot, held by a running stream: the next adapter waits for it, never evicts it.
        eng, llm = engine(tokenizer, tiny_model, max_loras=1)
        stream = eng.stream(GenRequest([5], 30, adapter=refs["a"]))
        await anext(stream)
        other = asyncio.create_task(eng.generate(GenRequest([5], 4, adapter=refs["b"])))
        async for _ in stream:
            assert eng.loaded_adapters() == ["a"]
        assert not other.done()
        await other
        assert eng.loaded_adapters() == ["b"]
        assert [r.lora_name for r in llm.registered.values()] == [refs["b"].key]
        assert (llm.evicted_by_vllm, llm.loaded_in_step) == (0, 0)

    run(main())


def test_reloaded_adapter_shares_a_batch_with_its_old_version(tokenizer, tiny_model, tmp_path):
    async def main():
        eng, llm = engine(tokenizer, tiny_model, max_loras=2)
        path = make_adapter(tiny_model, tmp_path / "a", seed=1)
        old = asyncio.create_task(eng.generate(GenRequest([5], 30, adapter=fingerprint("a", path))))
        await asyncio.sleep(0.02)
        new_ref = fingerprint("a", make_adapter(tiny_model, tmp_path / "a", seed=2))
        new = await eng.generate(GenRequest([5], 5, adapter=new_ref))
        assert not old.done()  # both versions ran in the same steps
        await old
        assert not llm.errored and llm.loaded_in_step == 0 and len(llm.registered) == 2
        return new

    assert run(main()).finish_reason == "length"


def test_an_adapter_vllm_refuses_fails_its_own_requests_only(tokenizer, tiny_model, tmp_path):
    pissa = make_adapter(tiny_model, tmp_path / "pissa", seed=1)  # init that rewrites the base
    config = json.loads((pissa / "adapter_config.json").read_text())
    (pissa / "adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": "pissa"}))
    wide = make_adapter(tiny_model, tmp_path / "wide", seed=1, r=16)

    async def main():
        eng, llm = engine(tokenizer, tiny_model, rank=8)
        base = asyncio.create_task(eng.generate(GenRequest([5], 40)))
        with pytest.raises(AdapterRefused, match="init_lora_weights"):
            await eng.generate(GenRequest([5], 4, adapter=fingerprint("p", pissa)))
        with pytest.raises(AdapterError, match="rank 16"):  # refused before vLLM sees it
            await eng.generate(GenRequest([5], 4, adapter=fingerprint("w", wide)))
        assert (await base).finish_reason == "stop"
        await server(eng).check_health()
        assert eng.loaded_adapters() == [] and not llm.registered
        llm.kill(RuntimeError("CUDA error"))
        with pytest.raises(EngineDeadError):  # Serve replaces the replica
            await server(eng).check_health()

    run(main())


def test_a_stream_left_mid_way_is_aborted_and_frees_its_adapter(tokenizer, tiny_model, tmp_path):
    a, b = (fingerprint(n, make_adapter(tiny_model, tmp_path / n, seed=1)) for n in "ab")

    async def main():
        eng, llm = engine(tokenizer, tiny_model, max_loras=1)
        stream = eng.stream(GenRequest([5], 30, adapter=a))
        await anext(stream)
        await stream.aclose()  # the client went away
        assert not llm.running  # vLLM was told at once
        await eng.generate(GenRequest([5], 4, adapter=b))  # a's slot is free
        assert eng.loaded_adapters() == ["b"]

    run(main())
