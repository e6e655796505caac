"""rayft's vLLM engine against the real, pinned vLLM (0.33.0), on CPU.

The test environment installs the pinned vLLM wheel without its dependencies (Makefile, setup),
so vLLM's Python code is real here, but its kernels cannot load (they need its CUDA torch).

What this covers:
- pins: vLLM's declared requirements (its wheel's metadata) against pyproject.toml's ranges,
  constraints.txt and docker/Dockerfile's pins, so a drift between them fails CI;
- every call rayft makes is bound to the real signature (AsyncEngineArgs, SamplingParams,
  LoRARequest, AsyncLLM.generate/add_lora/remove_lora/check_health), and the real objects are
  built at every value rayft's config and API allow (each allowed max_lora_rank, temperature
  and top_p extremes, stop lists, seeds, max_tokens, top_k, min_p, penalties, logit_bias,
  logprobs, response_format), checked as vLLM's input processor checks them against the model
  and the engine's settings, and encoded as vLLM sends them to its engine process;
- grammars compiled by vLLM's structured-output backend as rayft configures it, and matched;
- every finish_reason vLLM has is mapped; one id per adapter name in a batch;
- VllmEngine itself, driven through `AsyncLLMStandIn`: a stand-in for the AsyncLLM object only,
  because its engine core needs a GPU. Only the model is replaced (each request's tokens come
  from a script, their log-probabilities from a fixed random table); what rayft receives is
  made by vLLM's own code: requests checked by SamplingParams.verify as vLLM's InputProcessor
  does, log-probabilities gathered by vLLM's sampler function, RequestOutputs from vLLM's
  OutputProcessor and RequestOutputCollector (detokenized deltas, final-only outputs, stop
  strings, sample and prompt logprobs), adapter checks by vLLM's PEFTHelper against a real LoRAConfig, an adapter cache of
  vLLM's capacity and LRU order, and each step's adapters grouped in a set of LoRARequests as
  vLLM's InputBatch does (which loses an id when two share a name: the engine dies there and
  in the stand-in).

What this does not cover: the GPU kernels, the engine actually running (scheduling, memory,
model loading, tensor parallelism, vLLM's loading of adapter weights, the sampler applying
top_k, penalties, bias and grammar masks to real logits), and the CUDA image
actually building and resolving (only its pins are checked).
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import re
import time
import tomllib
import typing
from collections import OrderedDict
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_serve_units import make_adapter

try:
    import vllm  # noqa: F401
except ImportError as e:
    raise ImportError(f"{e}: run `make setup`, which installs the pinned vLLM for this test") from e

import torch
from vllm import SamplingParams
from vllm.config.lora import LoRAConfig, MaxLoRARanks
from vllm.config.model import PROCESSED_LOGPROBS_MODES, LogprobsMode
from vllm.config.structured_outputs import StructuredOutputsBackend
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.inputs import TokensPrompt
from vllm.logprobs import append_logprobs_for_next_position
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
from vllm.v1.sample.sampler import Sampler
from vllm.v1.serial_utils import MsgpackEncoder
from vllm.v1.structured_output.backend_guidance import GuidanceBackend
from vllm.v1.structured_output.request import get_structured_output_key

from rayft.adapters import AdapterError, base_linears, fingerprint
from rayft.config.serving import VLLM_LORA_RANKS
from rayft.serving import openai_api as oa
from rayft.serving.engine_server import EngineServer
from rayft.serving.errors import AdapterRefused, BadRequest, EngineFailed
from rayft.serving.protocol import Delta, GenRequest, GenResult, TokenLogprob
from rayft.serving.vllm_engine import (
    ANSWERED,
    GRAMMAR_BACKEND,
    VllmEngine,
    engine_args,
    finish_reason,
    lora_args,
    sampling_args,
    token_logprob,
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
    # The model's own log-probabilities (GenRequest.logprobs), named, and read by vLLM's model
    # config, which its sampler and model runner take the mode from.
    model_config = AsyncEngineArgs(**kwargs).create_model_config()
    assert model_config.logprobs_mode == kwargs["logprobs_mode"] == "raw_logprobs"
    assert "raw_logprobs" in typing.get_args(LogprobsMode)
    assert "raw_logprobs" not in PROCESSED_LOGPROBS_MODES
    with pytest.raises(ValueError):
        LoRAConfig(max_lora_rank=4)  # the kind of rank serve.max_lora_rank refuses for vLLM
    assert isinstance(inspect.getattr_static(AsyncLLM, "errored"), property)
    inspect.signature(AsyncLLM.from_engine_args).bind(AsyncEngineArgs(**kwargs))


CHAT = {"messages": [{"role": "user", "content": "hi"}]}
SCHEMA = {
    "type": "object",
    "properties": {"a": {"type": "integer"}, "b": {"type": "array", "items": {"type": "string"}}},
    "required": ["a"],
    "additionalProperties": False,
}


def api_requests(limit: int) -> list[GenRequest]:
    """GenRequests at the extremes of what rayft's API accepts (parsed by its own rules, and
    mapped by its own mapping, openai_api.gen_request)."""
    bodies = [
        {"temperature": 0, "top_p": 1, "max_tokens": 1, "seed": -(2**63)},
        {"temperature": 2, "top_p": 1e-9, "max_tokens": limit, "seed": 2**63 - 1},
        {"stop": "\n", "seed": 0},
        {"stop": ["a", "stop here", "\u00e9\u00e8"], "temperature": 0.7, "top_p": 0.9},
        {"stop": [], "seed": None},
        {"top_k": -1, "min_p": 1, "presence_penalty": -2, "frequency_penalty": 2},
        {"top_k": 1, "repetition_penalty": 2, "presence_penalty": 2, "frequency_penalty": -2},
        {"top_k": 2**31 - 1, "repetition_penalty": 1e-9, "logit_bias": {"0": -100, "511": 100}},
        {"logprobs": 5, "echo": True},
        {"logprobs": 0, "echo": True},
        {**CHAT, "logprobs": True, "top_logprobs": 20, "response_format": {"type": "json_object"}},
        {**CHAT, "logprobs": True, "response_format": {"type": "text"}},
        {**CHAT, "tools": [{"type": "function", "function": {"name": "f"}}], "seed": 1},
        {
            **CHAT,
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "s", "schema": SCHEMA},
            },
        },
    ]
    out = []
    for body in bodies:
        chat = "messages" in body
        body = {"model": "m", **({} if chat else {"prompt": "hi"}), **body}
        cls = oa.ChatRequest if chat else oa.CompletionRequest
        req = oa.parse(cls, body, max_n=1, max_tokens_limit=limit)
        tokens = req.asked_tokens() or 16
        rf = req.response_format if chat else None
        bias = {int(k): v for k, v in (req.logit_bias or {}).items()}
        out.append(oa.gen_request(req, [1, 2], tokens, None, rf.grammar() if rf else None, bias))
    return out


def test_api_limits_are_the_extremes_tried_here():
    """api_requests' bodies are at the API's limits: one step past each is refused."""
    for cls, body in [
        (oa.CompletionRequest, {"prompt": "hi", "logprobs": 6}),
        (oa.ChatRequest, {**CHAT, "logprobs": True, "top_logprobs": 21}),
        (oa.CompletionRequest, {"prompt": "hi", "top_k": -2}),
        (oa.CompletionRequest, {"prompt": "hi", "repetition_penalty": 2.01}),
        (oa.CompletionRequest, {"prompt": "hi", "presence_penalty": -2.01}),
        (oa.CompletionRequest, {"prompt": "hi", "logit_bias": {"1": 100.5}}),
    ]:
        with pytest.raises(BadRequest):
            oa.parse(cls, {"model": "m", **body})


def test_sampling_params_at_every_value_the_api_allows(tmp_path, tiny_model, tokenizer):
    args = engine_args(tiny_model, 16, 8, 1)
    model_config = AsyncEngineArgs(**args).create_model_config()
    for r in api_requests(limit=1024):
        for stream in (True, False):
            kwargs = sampling_args(r, stream)
            inspect.signature(SamplingParams).bind(**kwargs)
            params = SamplingParams(**kwargs)
            assert (params.max_tokens, params.seed, params.stop) == (r.max_tokens, r.seed, r.stop)
            if r.temperature > 0:  # greedy turns vLLM's top_k, top_p, min_p off
                assert (params.top_k, params.top_p, params.min_p) == (r.top_k, r.top_p, r.min_p)
            assert (params.presence_penalty, params.frequency_penalty) == (
                r.presence_penalty,
                r.frequency_penalty,
            )
            assert params.repetition_penalty == r.repetition_penalty
            assert (params.logit_bias or {}) == r.logit_bias
            assert (params.logprobs, params.prompt_logprobs) == (r.logprobs, r.prompt_logprobs)
            assert params.skip_special_tokens == r.skip_special_tokens
            grammar = params.structured_outputs
            if r.grammar is None:
                assert grammar is None
            elif r.grammar["type"] == "json_object":
                assert (grammar.json_object, grammar.json) == (True, None)
            else:
                assert (grammar.json, grammar.json_object) == (r.grammar["schema"], None)
            # What vLLM's input processor checks against the model and the engine's settings
            # (max_logprobs, the vocabulary, the grammar backend): nothing the API allows fails.
            params.verify(model_config, None, args["structured_outputs_config"], tokenizer)
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


def test_off_means_off_in_vllm():
    """rayft's "off" values are vLLM's: top_k 0 keeps the whole vocabulary (vLLM's InputBatch
    takes 0 < top_k < vocab as a limit), min_p 0, penalties 0 and 1, no bias, no grammar."""
    params = SamplingParams(**sampling_args(GenRequest([1], 4), stream=False))
    default = SamplingParams()
    for name in ("top_k", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
        assert getattr(params, name) == getattr(default, name), name
    assert not params.logit_bias and params.structured_outputs is None
    assert params.logprobs is None and params.prompt_logprobs is None
    assert params.top_k == 0


def test_grammars_compile_in_vllms_backend_as_rayft_configures_it(tiny_model, tokenizer):
    """Each grammar the API sends goes through vLLM's own checks and its guidance backend,
    built with the engine settings rayft gives vLLM; the grammar it compiles takes a compact
    match (as the transformers engine's grammar does: no whitespace) and nothing else."""
    args = engine_args(tiny_model, 16, 8, 1)
    config = args["structured_outputs_config"]
    # This test builds guidance's backend: a change of GRAMMAR_BACKEND comes here first.
    assert config.backend == GRAMMAR_BACKEND == "guidance"
    assert GRAMMAR_BACKEND in typing.get_args(StructuredOutputsBackend)
    model_config = AsyncEngineArgs(**args).create_model_config()
    # The backend reads only the structured outputs config of vLLM's VllmConfig, which cannot be
    # built without a GPU.
    backend = GuidanceBackend(
        SimpleNamespace(structured_outputs_config=config), tokenizer, model_config.get_vocab_size()
    )
    cases = {
        "json_object": ('{"a":1}', ['{ "a": 1}', '{"a":1', "[1]"]),
        "json_schema": ('{"a":1,"b":["x"]}', ['{"a": 1}', '{"b":["x"]}', '{"a":1,"c":2}']),
    }
    grammars = [r.grammar for r in api_requests(limit=64) if r.grammar is not None]
    assert sorted(g["type"] for g in grammars) == sorted(cases)
    for grammar in grammars:
        params = SamplingParams(**sampling_args(GenRequest([1], 8, grammar=grammar), False))
        params.verify(model_config, None, config, tokenizer)
        assert params.structured_outputs._backend == GRAMMAR_BACKEND
        key = get_structured_output_key(params.structured_outputs)
        good, bad = cases[grammar["type"]]

        assert matches(backend, key, tokenizer, good), (grammar, good)
        for text in bad:
            assert not matches(backend, key, tokenizer, text), (grammar, text)


def matches(backend, key, tokenizer, text: str) -> bool:
    """Whether the grammar vLLM's backend compiles for `key` takes all of `text`, then the end."""
    ids = [*tokenizer(text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return backend.compile_grammar(*key).validate_tokens(ids) == ids


def test_each_token_gets_its_own_logprob_and_the_k_most_likely():
    """vLLM's position dicts, built by its own append_logprobs_for_next_position from what its
    sampler gathers (the chosen token, then the top k, rank by rank)."""

    def position(chosen: int, rank: int, top: list[int], k: int) -> dict:
        lps = {t: -0.5 * (i + 1) for i, t in enumerate(top)}
        lps.setdefault(chosen, -9.0)
        out = []
        append_logprobs_for_next_position(
            out, [chosen, *top], [lps[chosen], *(lps[t] for t in top)], [None] * 9, rank, k
        )
        return out[0]

    # The chosen token outside the top 3: listed apart, its logprob its own.
    lp = token_logprob(position(7, 40, [3, 1, 2], 3), 3)
    assert lp == TokenLogprob(7, -9.0, [(3, -0.5), (1, -1.0), (2, -1.5)])
    # The chosen token second most likely: once, in its place (vLLM's dict has it first).
    p = position(1, 2, [3, 1, 2], 3)
    assert next(iter(p)) == 1 and len(p) == 3
    assert token_logprob(p, 3) == TokenLogprob(1, -1.0, [(3, -0.5), (1, -1.0), (2, -1.5)])
    # k = 0: the chosen token's only, even when it is the most likely.
    assert token_logprob(position(3, 1, [3], 0), 0) == TokenLogprob(3, -0.5, [])
    assert token_logprob(position(5, 9, [3], 0), 0) == TokenLogprob(5, -9.0, [])
    # More gathered than asked (the sampler gathers the batch's largest k): the request's k.
    assert token_logprob(position(2, 3, [3, 1, 2], 1), 1) == TokenLogprob(2, -1.5, [(3, -0.5)])


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


@dataclass(eq=False)
class Running:
    """A request in the stand-in's running batch."""

    lora: LoRARequest | None
    tokens: list[int]  # those still to come
    reason: FinishReason
    params: SamplingParams
    context: list[int]  # the prompt, then the tokens so far
    prefilled: bool = False


class AsyncLLMStandIn:
    """Stands in for vllm's AsyncLLM (see the module docstring: only the model is scripted).

    The scripted model's raw log-probabilities are those of a fixed random bigram table
    (`model_logprobs`); vLLM's sampler function gathers them as it does on the GPU."""

    def __init__(self, tokenizer, args: dict, script):
        engine = AsyncEngineArgs(**args)  # the settings rayft gives vLLM
        self.model_config = engine.create_model_config()
        self.structured_outputs_config = engine.structured_outputs_config
        self.lora_config = LoRAConfig(
            **{k: args[k] for k in ("max_loras", "max_cpu_loras", "max_lora_rank")}
        )
        self.outputs = OutputProcessor(tokenizer, log_stats=False)
        self.script = script  # (prompt ids, LoRARequest | None) -> (token ids, FinishReason)
        vocab = self.model_config.get_vocab_size()
        self.logits = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0))
        self.registered: OrderedDict[int, LoRARequest] = OrderedDict()  # least recent first
        self.running: dict[str, Running] = {}
        self.evicted_by_vllm = 0  # adapters vLLM's own LRU dropped
        self.loaded_in_step = 0  # adapters a model step had to load (not add_lora)
        self.dead: BaseException | None = None
        self._stepper: asyncio.Task | None = None

    def model_logprobs(self, previous: list[int]) -> torch.Tensor:
        """The model's raw log-probabilities of the token after each of `previous`."""
        return self.logits[previous].log_softmax(-1)

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
        # What vLLM's InputProcessor checks before the request reaches the engine.
        params.verify(
            self.model_config, None, self.structured_outputs_config, self.outputs.tokenizer
        )
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
        self.running[rid] = Running(lora, list(tokens), reason, params, list(ids))
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
            loras = [run.lora for run in self.running.values() if run.lora is not None]
            try:  # what InputBatch.make_lora_inputs and the LoRA manager do with them
                by_id = {r.lora_int_id: r for r in set(loras)}
                for lora in [by_id[r.lora_int_id] for r in loras]:
                    if lora.lora_int_id not in self.registered:
                        self.loaded_in_step += 1
                        self._register(lora)
            except Exception as e:
                self.kill(e)
                return
            batch = [(rid, run) for rid, run in self.running.items() if run.tokens]
            # One gather for the step, at the batch's largest k, as vLLM's sampler does;
            # vLLM's LogprobsProcessor keeps each request's own k of it.
            asked = [run for _, run in batch if run.params.logprobs is not None]
            if asked:
                gathered = Sampler.gather_logprobs(
                    self.model_logprobs([run.context[-1] for run in asked]),
                    max(run.params.logprobs for run in asked),
                    torch.tensor([run.tokens[0] for run in asked]),
                ).tolists()
            outs = []
            for rid, run in batch:
                token = run.tokens.pop(0)
                out = EngineCoreOutput(
                    rid, [token], finish_reason=None if run.tokens else run.reason
                )
                if run.params.logprobs is not None:
                    out.new_logprobs = gathered.slice_request(asked.index(run), 1)
                k = run.params.prompt_logprobs
                if not run.prefilled and k is not None and len(run.context) > 1:
                    out.new_prompt_logprobs_tensors = Sampler.gather_logprobs(
                        self.model_logprobs(run.context[:-1]), k, torch.tensor(run.context[1:])
                    )
                run.prefilled = True
                run.context.append(token)
                outs.append(out)
            for rid in self.outputs.process_outputs(outs).reqs_to_abort:  # stopped by a stop string
                self.running[rid].tokens.clear()


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


def engine(tokenizer, tiny_model, script=None, max_loras=2, rank=8):
    def words(ids, lora):
        text = f" answer of {lora.lora_name[:4] if lora else 'base'} and more" * 2
        return tokenizer(text, add_special_tokens=False)["input_ids"], FinishReason.STOP

    args = engine_args(tiny_model, max_loras, rank, 1)
    llm = AsyncLLMStandIn(tokenizer, args, script or words)
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
    *deltas, done = pieces
    assert len(deltas) > 2 and all(isinstance(d, Delta) and not d.logprobs for d in deltas)
    assert (
        isinstance(done, GenResult) and done.text == "".join(d.text for d in deltas) == plain.text
    )
    assert done.logprobs is done.prompt_logprobs is plain.logprobs is None  # none asked
    assert (done.completion_tokens, done.finish_reason, long.finish_reason) == (8, "length", "stop")
    assert capfd.readouterr() == ("", "")  # nothing printed per request


def expected_logprobs(llm, context: list[int], tokens: list[int], k: int) -> list:
    """What the scripted model gives `tokens` after `context`: each one's raw log-probability
    and the k most likely in its place, best first."""
    out = []
    previous = [*context, *tokens][len(context) - 1 : -1]
    for token, lps in zip(tokens, llm.model_logprobs(previous), strict=True):
        top = lps.topk(k)
        best = zip(top.indices.tolist(), top.values.tolist(), strict=True)
        out.append((token, lps[token].item(), list(best)))
    return out


def as_tuples(lps: list[TokenLogprob]) -> list:
    return [(lp.token, lp.logprob, lp.top) for lp in lps]


def flat(positions: list) -> list:
    """(token, logprob, top) positions as one list of numbers, for pytest.approx."""
    return [x for t, lp, top in positions for x in (t, lp, len(top), *(y for p in top for y in p))]


def test_logprobs_are_the_models_own_and_stream_with_their_tokens(tokenizer, tiny_model):
    prompt, words = [5, 6, 7, 8], [9, 6, 7, 8]
    script = tokenizer(" answer of base and more" * 2, add_special_tokens=False)["input_ids"]

    async def main():
        eng, llm = engine(tokenizer, tiny_model)

        def ranked(ids, lora):
            """Prompt [5, ...]: the sampler picks the model's 1st, 2nd, ... 6th most likely
            token in turn, so chosen tokens fall inside and just outside the top k asked."""
            tokens, special = [], set(tokenizer.all_special_ids)
            for i in range(12):
                ranking = llm.logits[[*ids, *tokens][-1]].argsort(descending=True).tolist()
                tokens.append([t for t in ranking if t not in special][i % 6])
            return tokens, FinishReason.LENGTH

        llm.script = lambda ids, lora: (
            ranked(ids, lora) if ids == prompt else (script, FinishReason.STOP)
        )
        # Two requests asking different k share steps: vLLM gathers the larger for both.
        stream = asyncio.create_task(
            collect(eng.stream(GenRequest(prompt, 9, logprobs=2, prompt_logprobs=3)))
        )
        plain = await eng.generate(GenRequest(prompt, 9, logprobs=5, prompt_logprobs=0))
        stopped = await collect(eng.stream(GenRequest(words, 40, stop=["more"], logprobs=1)))
        return llm, ranked(prompt, None)[0], await stream, plain, stopped

    llm, answer, (*deltas, streamed), plain, (*stop_deltas, stopped) = run(main())
    assert [lp.token for lp in plain.logprobs] == answer[:9] and plain.completion_tokens == 9
    assert flat(as_tuples(plain.logprobs)) == pytest.approx(
        flat(expected_logprobs(llm, prompt, answer[:9], 5))
    )
    assert flat(as_tuples(streamed.logprobs)) == pytest.approx(
        flat(expected_logprobs(llm, prompt, answer[:9], 2))
    )
    # Each Delta carries the logprobs of its new tokens; together, the answer's.
    assert all(isinstance(d, Delta) for d in deltas) and len(deltas) > 2
    assert [lp for d in deltas for lp in d.logprobs] == streamed.logprobs
    assert "".join(d.text for d in deltas) == streamed.text == plain.text
    # The prompt's: none for its first token, then each one's after those before it.
    for result, k in ((streamed, 3), (plain, 0)):
        assert result.prompt_logprobs[0] is None and len(result.prompt_logprobs) == len(prompt)
        assert flat(as_tuples(result.prompt_logprobs[1:])) == pytest.approx(
            flat(expected_logprobs(llm, prompt[:1], prompt[1:], k))
        )
    # A stop string: its text is held back and cut, the logprobs of its tokens are not.
    assert (stopped.text, stopped.finish_reason) == (" answer of base and ", "stop")
    sent = [lp for d in stop_deltas for lp in d.logprobs]
    upto = next(m for m in range(len(script)) if "more" in tokenizer.decode(script[:m]))
    assert sent == stopped.logprobs and len(sent) == stopped.completion_tokens == upto
    assert [lp.token for lp in sent] == script[:upto]
    assert "".join(d.text for d in stop_deltas) == stopped.text


def test_requests_vllm_refuses_are_bad_requests(tokenizer, tiny_model, tmp_path):
    deep = {"type": "array", "items": {}}
    for _ in range(80):
        deep = {"type": "array", "items": deep}
    schema = {"type": "json_schema", "schema": {"type": "x"}}
    # (request, the parameter vLLM names, what it says)
    refused = [
        (GenRequest([5], 4, logprobs=21), "logprobs", "max allowed: 20"),
        (GenRequest([5, 6], 4, prompt_logprobs=21), "prompt_logprobs", "max allowed: 20"),
        (GenRequest([5], 4, logit_bias={512: 1.0}), "logit_bias", "out-of-vocab"),
        (GenRequest([5], 4, presence_penalty=2.5), None, "presence_penalty must be in"),
        (GenRequest([5], 4, grammar=schema), None, "Grammar error"),
        (GenRequest([5], 4, grammar={"type": "json_schema", "schema": deep}), None, "nested"),
    ]
    a, b = (fingerprint(n, make_adapter(tiny_model, tmp_path / n, seed=1)) for n in "ab")

    async def main():
        eng, _ = engine(tokenizer, tiny_model, max_loras=1)
        for r, param, says in refused:
            r = dataclasses.replace(r, adapter=a)
            for stream in (False, True):
                with pytest.raises(BadRequest, match=says) as e:
                    if stream:
                        async for _ in eng.stream(r):
                            pass
                    else:
                        await eng.generate(r)
                assert e.value.param == param
        # No refusal kept its adapter's slot (the only one), and vLLM's largest k is taken.
        answer = await eng.generate(GenRequest([5], 4, adapter=b, logprobs=20))
        assert answer.finish_reason == "length" and len(answer.logprobs[0].top) == 20

    run(main())


async def collect(pieces) -> list:
    return [p async for p in pieces]


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
