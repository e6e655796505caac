"""The transformers engine: one base model plus many LoRA adapters in one process (CPU or GPU).

Requests for different adapters share one `generate` call: LoRA layers add per-row adapter
deltas with two batched matmuls (`lora_batch`), or, for layer kinds it does not cover, through
PEFT's mixed-adapter batches (`adapter_names=`), so eight adapters cost one forward pass per
token, not eight. Streaming requests join the same batches (`stream_batch`: the batch's
`generate` reports each step's tokens, and streaming rows get their text as it grows), so a
stream neither waits behind nor holds up the requests that arrive with it. DoRA cannot join
mixed batches, so a DoRA adapter is merged into its own copy
of the base (the in-replica "merged fallback") and batched separately; with `serve.dora:
merge` the engine declares DoRA unsupported instead, and rayft serves each DoRA adapter as its
own merged deployment: the path vLLM takes, so that path runs on CPU in the tests.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayft.adapters import check_compatible, linears
from rayft.dtypes import default_dtype, torch_dtype
from rayft.serving import lora_batch
from rayft.serving.errors import AdapterRefused, EngineFailed, ServeError
from rayft.serving.protocol import AdapterRef, GenRequest, GenResult

BASE = "__base__"  # PEFT's name for "no adapter" inside a mixed batch


class TransformersEngine:
    def __init__(
        self,
        model_path: str,
        max_loaded_adapters: int = 16,
        max_lora_rank: int = 64,
        device: str | None = None,
        dora: str = "native",
    ):
        self.adapter_kinds = self.serves(dora)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch_dtype(default_dtype(self.device == "cuda"))
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.eval()
        self.base_linears = linears(self.model)
        self.max_loaded = max_loaded_adapters
        self.max_rank = max_lora_rank
        self.pad_id = self.tokenizer.pad_token_id
        if self.pad_id is None:
            self.pad_id = self.tokenizer.eos_token_id
        # Where an answer ends: the tokenizer's end token and every end token the model's
        # generation config names (Llama 3's end-of-turn besides end-of-text; `rayft merge`
        # writes the trained end-of-turn ids there).
        declared = self.model.generation_config.eos_token_id
        declared = declared if isinstance(declared, list) else [declared]
        self.eos_ids = sorted({self.tokenizer.eos_token_id, *declared} - {None})
        self._peft = None  # the PeftModel wrapping self.model once an adapter is resident
        self._resident: OrderedDict[str, str] = OrderedDict()  # key -> name, oldest first
        self._merged: dict[str, torch.nn.Module] = {}  # key -> DoRA merged fallback
        self._stacks = lora_batch.LoraStacks()
        # One forward at a time: PEFT's adapter injection mutates modules, and two torch calls
        # fighting over the same cores are slower than one after the other.
        self._lock = threading.Lock()

    # ------------------------------------------------------------------ adapters

    @staticmethod
    def serves(dora: str = "native") -> frozenset[str]:
        """Adapter kinds this engine serves itself (`serve.dora`)."""
        return frozenset({"lora", "dora"} if dora == "native" else {"lora"})

    def check_adapter(self, path: str) -> dict:
        return check_compatible(Path(path), self.base_linears, self.max_rank)

    def loaded_adapters(self) -> list[str]:
        return list(self._resident.values())

    def _ensure(self, ref: AdapterRef, keep: set[str]) -> None:
        """Make `ref` resident (lock held); evict least recently used adapters not in `keep`."""
        if ref.key in self._resident:
            self._resident.move_to_end(ref.key)
        else:
            info = self.check_adapter(ref.path)
            if info["dora"] and "dora" not in self.adapter_kinds:
                raise AdapterRefused(
                    f"adapter {ref.name!r} is DoRA, which this engine does not serve "
                    "(serve.dora: merge); it is served as a merged deployment instead",
                    "model",
                )
            if info["dora"]:
                self._merged[ref.key] = self._merge_copy(ref)
            else:
                from peft import PeftModel

                if self._peft is None:
                    self._peft = PeftModel.from_pretrained(
                        self.model, ref.path, adapter_name=ref.key
                    )
                    self._peft.eval()
                else:
                    self._peft.load_adapter(ref.path, adapter_name=ref.key)
                self._stacks.add(self._peft, ref.key)
            self._resident[ref.key] = ref.name
        # A batch may need more adapters than fit: those stay until the next batch.
        for key in [k for k in self._resident if k not in keep]:
            if len(self._resident) <= self.max_loaded:
                break
            self._evict(key)

    def _merge_copy(self, ref: AdapterRef) -> torch.nn.Module:
        from peft import PeftModel

        # A copy of the PeftModel carries the LoRA layers of the other adapters: unload drops them.
        base = copy.deepcopy(self._peft).unload() if self._peft else copy.deepcopy(self.model)
        return PeftModel.from_pretrained(base, ref.path).merge_and_unload().eval()

    def _evict(self, key: str) -> None:
        self._resident.pop(key)
        if self._merged.pop(key, None) is not None:
            return
        self._stacks.drop(key)
        left = [k for k in self._peft.peft_config if k != key]
        if not left:  # PEFT cannot hold zero adapters: go back to the plain base model
            self.model = self._peft.unload()
            self._peft = None
            return
        self._peft.delete_adapter(key)
        self._peft.set_adapter(left[0])  # PeftModel keeps a stale active adapter otherwise

    # ------------------------------------------------------------------ generation

    def generate(self, requests: list[GenRequest], on_step=None) -> list[GenResult | ServeError]:
        """Answer a batch. `on_step(rows, tokens)`, when given, is called from inside the model
        with each decoding step's new token of batch rows `rows`, and `on_step(i, result)` once
        request i is answered (or failed)."""
        results: list[GenResult | ServeError | None] = [None] * len(requests)
        with self._lock:
            keep = {r.adapter.key for r in requests if r.adapter}
            for i, r in enumerate(requests):
                if r.adapter:
                    # One adapter that cannot load fails its own requests, not the whole batch.
                    try:
                        self._ensure(r.adapter, keep)
                    except Exception as e:
                        results[i] = _load_error(r.adapter, e)
                        if on_step:
                            on_step(i, results[i])
            groups: dict[tuple, list[int]] = {}
            for i, r in enumerate(requests):
                if results[i] is not None:
                    continue
                merged = r.adapter.key if r.adapter and r.adapter.key in self._merged else None
                sampling = (0.0, 1.0) if r.temperature == 0 else (r.temperature, r.top_p)
                groups.setdefault((merged, sampling, r.seed), []).append(i)
            for (merged, _, _), idx in groups.items():
                group = [requests[i] for i in idx]
                streamer = _StepStreamer(idx, group, on_step, self) if on_step else None
                try:
                    answers = self._run(group, merged, streamer)
                except Exception as e:  # fails this group's requests, not the whole batch
                    answers = [_group_error(group, e)] * len(group)
                for j, (i, res) in enumerate(zip(idx, answers, strict=True)):
                    if streamer and streamer.answered[j] is not None:
                        results[i] = streamer.answered[j]  # the same result, given already
                        continue
                    results[i] = res
                    if on_step:
                        on_step(i, res)
        return results  # type: ignore[return-value]

    def logits(
        self, ids: torch.Tensor, mask: torch.Tensor, adapter: AdapterRef | None = None
    ) -> torch.Tensor:
        """Teacher-forced float32 logits of the very model that answers `adapter`'s requests
        (a DoRA adapter's merged copy, LoRA rows through the same stacked layers)."""
        with self._lock:
            merged = None
            if adapter is not None:
                self._ensure(adapter, {adapter.key})
                merged = adapter.key if adapter.key in self._merged else None
            model, extra, ctx = self._pick([GenRequest([], 1, adapter=adapter)] * len(ids), merged)
            with ctx, torch.inference_mode():
                out = model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device), **extra
                )
        return out.logits.float()

    def _pick(self, reqs: list[GenRequest], merged: str | None) -> tuple:
        """(model, extra generate kwargs, context manager) for one homogeneous group."""
        if merged is not None:
            return self._merged[merged], {}, contextlib.nullcontext()
        names = [r.adapter.key if r.adapter else BASE for r in reqs]
        if self._peft is None:
            return self.model, {}, contextlib.nullcontext()
        if all(n == BASE for n in names):
            # Base-only batches switch the LoRA layers off instead of routing around them.
            return self._peft, {}, self._peft.disable_adapter()
        if self._stacks.covers({n for n in names if n != BASE}):
            rows = [None if n == BASE else n for n in names]
            return self._peft, {}, self._stacks.apply(self._peft, rows)
        return self._peft, {"adapter_names": names}, contextlib.nullcontext()

    def _gen_kwargs(self, r: GenRequest, max_new: int) -> dict:
        kw = {"max_new_tokens": max_new, "pad_token_id": self.pad_id, "eos_token_id": self.eos_ids}
        if r.temperature == 0:
            kw.update(do_sample=False)
        else:
            kw.update(do_sample=True, temperature=r.temperature, top_p=r.top_p)
        return kw

    def _batch_tensors(self, reqs: list[GenRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row ends where generation starts
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _run(self, reqs: list[GenRequest], merged: str | None, streamer=None) -> list[GenResult]:
        model, extra, ctx = self._pick(reqs, merged)
        ids, mask = self._batch_tensors(reqs)
        kw = self._gen_kwargs(reqs[0], max(r.max_tokens for r in reqs)) | extra
        if reqs[0].seed is not None:
            torch.manual_seed(reqs[0].seed)
        with ctx, torch.inference_mode():
            out = model.generate(input_ids=ids, attention_mask=mask, streamer=streamer, **kw)
        return [self._result(r, out[i, ids.shape[1] :].tolist()) for i, r in enumerate(reqs)]

    def _until_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The tokens before the first end token, and whether there was one."""
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        return (tokens, False) if end is None else (tokens[:end], True)

    def _result(self, r: GenRequest, tokens: list[int]) -> GenResult:
        tokens, ended = self._until_eos(tokens[: r.max_tokens])
        finish = "stop" if ended else "length"
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        cut = cut_at_stop(text, r.stop)
        if cut is not None:
            text, finish = cut, "stop"
        return GenResult(text, len(r.prompt_ids), len(tokens), finish)

    def stream_batch(
        self, requests: list[GenRequest]
    ) -> Iterator[list[str | GenResult | ServeError | None]]:
        """`generate` for a batch in which some requests stream: yields one entry per request
        at a time: a text piece ('' when there is nothing new; always '' for requests that do
        not stream), then the request's GenResult or ServeError once, then None. Generation
        runs in a thread (under the model lock); steps that pile up between two reads become
        one entry, so a slow reader costs nothing but latency."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        end = object()

        def work() -> None:
            try:
                self.generate(requests, on_step=lambda rows, x: events.put((rows, x)))
            except BaseException as e:  # re-raised in the reader, which owns the requests
                events.put((None, e))
            events.put((None, end))

        threading.Thread(target=work, daemon=True).start()
        tokens: list[list[int]] = [[] for _ in requests]
        shown = [0] * len(requests)  # characters of text already yielded
        final: list[GenResult | ServeError | None] = [None] * len(requests)
        sent = [False] * len(requests)
        finished = False
        while not finished:
            pending = [events.get()]
            with contextlib.suppress(queue.Empty):
                while True:
                    pending.append(events.get_nowait())
            for rows, x in pending:
                if rows is None:
                    if x is end:
                        finished = True
                        continue
                    raise x
                if isinstance(rows, int):
                    final[rows] = x
                    continue
                for i, t in zip(rows, x.reshape(-1).tolist(), strict=True):
                    tokens[i].append(t)
            out: list[str | GenResult | ServeError | None] = []
            for i, r in enumerate(requests):
                if sent[i]:
                    out.append(None)
                elif final[i] is not None:
                    res = final[i]
                    if r.stream and isinstance(res, GenResult) and len(res.text) > shown[i]:
                        out.append(res.text[shown[i] :])  # the rest first, the summary next
                        shown[i] = len(res.text)
                        continue
                    out.append(res)
                    sent[i] = True
                elif r.stream:
                    text = self._partial(r, tokens[i])
                    out.append(text[shown[i] :])
                    shown[i] = max(shown[i], len(text))
                else:
                    out.append("")
            if any(x is not None for x in out):  # all None: every row was answered already
                yield out
        if not all(sent):  # the summaries of rows whose last text came with the end
            yield [None if sent[i] else final[i] for i in range(len(requests))]

    def _partial(self, r: GenRequest, tokens: list[int]) -> str:
        """The text of an unfinished answer that is safe to show: complete words only, and
        nothing that could still become the start of a stop string."""
        tokens, _ = self._until_eos(tokens)
        text = self.tokenizer.decode(tokens[: r.max_tokens], skip_special_tokens=True)
        cut = cut_at_stop(text, r.stop)
        if cut is not None:
            return cut
        end = text.rfind(" ") + 1 if not text.endswith("\n") else len(text)
        hold = max((len(s) for s in r.stop), default=1) - 1
        return text[: max(0, min(end, len(text) - hold))]


class _StepStreamer:
    """What `generate(streamer=)` calls: the prompt once (skipped), then each step's new token
    per row. Not TextStreamer: that one takes batch size 1 only.

    A row that reaches EOS or its own max_tokens is answered at once (`on_step(i, result)`),
    not when the longest row of its group is done: its result cannot change any more (rows
    past EOS only get padding), and a short stream should not wait for a long neighbour."""

    def __init__(self, rows: list[int], reqs: list[GenRequest], on_step, engine):
        self.rows, self.reqs, self.on_step, self.engine = rows, reqs, on_step, engine
        self.prompt = True
        self.tokens: list[list[int]] = [[] for _ in rows]
        self.answered: list[GenResult | None] = [None] * len(rows)

    def put(self, value: torch.Tensor) -> None:
        if self.prompt:
            self.prompt = False
            return
        self.on_step(self.rows, value)
        for j, t in enumerate(value.reshape(-1).tolist()):
            if self.answered[j] is not None:
                continue
            self.tokens[j].append(t)
            if t in self.engine.eos_ids or len(self.tokens[j]) >= self.reqs[j].max_tokens:
                self.answered[j] = self.engine._result(self.reqs[j], self.tokens[j])
                self.on_step(self.rows[j], self.answered[j])

    def end(self) -> None:
        pass


def _group_error(group: list[GenRequest], e: Exception) -> ServeError:
    if isinstance(e, ServeError):
        return e
    names = sorted({r.adapter.name if r.adapter else "base" for r in group})
    return EngineFailed(
        f"generation failed for the {len(group)} request(s) of one batch group (model/adapter "
        f"{', '.join(names)}; temperature {group[0].temperature}, top_p {group[0].top_p}): "
        f"{type(e).__name__}: {e}"[:800]
        + ". Other requests of the batch were answered; retry, and report it if it persists",
    )


def _load_error(ref: AdapterRef, e: Exception) -> ServeError:
    if isinstance(e, ServeError):
        return e
    return AdapterRefused(f"adapter {ref.name!r} ({ref.path}) could not be loaded: {e}", "model")


def cut_at_stop(text: str, stops: list[str]) -> str | None:
    """`text` up to the earliest stop string, or None when none occurs."""
    hits = [text.index(s) for s in stops if s and s in text]
    return text[: min(hits)] if hits else None
