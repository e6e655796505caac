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
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from rayft.adapters import check_compatible, linears
from rayft.dtypes import default_dtype, torch_dtype
from rayft.serving import hf_stream, lora_batch
from rayft.serving.errors import AdapterRefused, ServeError
from rayft.serving.protocol import AdapterRef, Delta, GenRequest, GenResult, TokenLogprob
from rayft.serving.sampling import Decoder, Finished, Row, cut_at_stop, prompt_logprobs

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
        # Every token is picked by sampling.Decoder: none of the model's own generation
        # defaults (a repetition_penalty, say) may change the logits before it sees them.
        self.model.generation_config = GenerationConfig(
            eos_token_id=self.eos_ids, pad_token_id=self.pad_id
        )
        self._grammars = None  # grammar.Grammars, built by the first constrained request
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
            groups: dict[str | None, list[int]] = {}
            for i, r in enumerate(requests):
                if results[i] is not None:
                    continue
                merged = r.adapter.key if r.adapter and r.adapter.key in self._merged else None
                groups.setdefault(merged, []).append(i)  # sampling is per row (Decoder)
            for merged, idx in groups.items():
                group = [requests[i] for i in idx]
                streamer = hf_stream.StepStreamer(idx, group, on_step, self) if on_step else None
                try:
                    answers = self._run(group, merged, streamer)
                except Exception as e:  # fails this group's requests, not the whole batch
                    answers = [hf_stream.group_error(group, e)] * len(group)
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

    def _batch_tensors(self, reqs: list[GenRequest]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r.prompt_ids) for r in reqs)
        ids = torch.full((len(reqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(reqs), width), dtype=torch.long)
        for i, r in enumerate(reqs):  # left padding: every row ends where generation starts
            ids[i, width - len(r.prompt_ids) :] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _decode(self, tokens: list[int], r: GenRequest | None = None) -> str:
        skip = r is None or r.skip_special_tokens
        return self.tokenizer.decode(tokens, skip_special_tokens=skip)

    def _rows(self, reqs: list[GenRequest]) -> list[Row]:
        rows = []
        for r in reqs:
            try:
                matcher = None
                if r.grammar is not None:
                    if self._grammars is None:
                        from rayft.serving.grammar import Grammars

                        width = self.model.get_output_embeddings().weight.shape[0]
                        self._grammars = Grammars(self.tokenizer, self.eos_ids, width)
                    matcher = self._grammars.matcher(r.grammar)
                rows.append(Row(r, self.eos_ids, matcher, lambda t, r=r: self._decode(t, r)))
            except Exception as e:  # this request fails alone: a row that decodes nothing
                row = Row(GenRequest(r.prompt_ids, 1, 0.0), self.eos_ids)
                row.error, row.finished, row.req = e, True, r
                rows.append(row)
        return rows

    def _run(self, reqs: list[GenRequest], merged: str | None, streamer=None) -> list[GenResult]:
        rows = self._rows(reqs)
        prompt_lps = self._prompt_logprobs(reqs, merged)
        model, extra, ctx = self._pick(reqs, merged)
        ids, mask = self._batch_tensors(reqs)
        if streamer is not None:
            streamer.rows_state, streamer.prompt_lps = rows, prompt_lps
        with ctx, torch.inference_mode():
            model.generate(
                input_ids=ids,
                attention_mask=mask,
                streamer=streamer,
                do_sample=False,  # the Decoder has picked the token: greedy takes it
                logits_processor=[Decoder(rows, self.pad_id)],
                stopping_criteria=[Finished(rows)],
                max_new_tokens=max(r.max_tokens for r in reqs),
                pad_token_id=self.pad_id,
                eos_token_id=self.eos_ids,
                **extra,
            )
        return [
            self._result(r, rows[i].tokens, rows[i].logprobs, prompt_lps[i])
            if rows[i].error is None
            else hf_stream.group_error([r], rows[i].error)
            for i, r in enumerate(reqs)
        ]

    def _prompt_logprobs(self, reqs: list[GenRequest], merged: str | None) -> list:
        """Teacher-forced log-probabilities of the prompts that ask for them (echo)."""
        out: list = [None] * len(reqs)
        idx = [i for i, r in enumerate(reqs) if r.prompt_logprobs is not None]
        if not idx:
            return out
        asking = [reqs[i] for i in idx]
        model, extra, ctx = self._pick(asking, merged)
        ids, mask = self._batch_tensors(asking)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at 0
        with ctx, torch.inference_mode():
            logits = model(
                input_ids=ids, attention_mask=mask, position_ids=positions, **extra
            ).logits
        for j, i in enumerate(idx):
            n = len(reqs[i].prompt_ids)
            out[i] = prompt_logprobs(
                logits[j, -n:], reqs[i].prompt_ids, reqs[i].prompt_logprobs or 0
            )
        return out

    def _until_eos(self, tokens: list[int]) -> tuple[list[int], bool]:
        """The tokens before the first end token, and whether there was one."""
        end = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        return (tokens, False) if end is None else (tokens[:end], True)

    def _result(
        self,
        r: GenRequest,
        tokens: list[int],
        logprobs: list[TokenLogprob] | None = None,
        prompt_lps: list | None = None,
    ) -> GenResult:
        """A finished row's answer. Every generated token counts and keeps its log-probability
        (vLLM's rule: the end token and a stop string's tokens too); the text stops before the
        end token and the stop string."""
        body, ended = self._until_eos(tokens[: r.max_tokens])
        generated = len(body) + ended
        finish = "stop" if ended else "length"
        text = self._decode(body, r)
        cut = cut_at_stop(text, r.stop)
        if cut is not None:
            text, finish = cut, "stop"
        return GenResult(
            text,
            len(r.prompt_ids),
            generated,
            finish,
            logprobs=None if r.logprobs is None else list((logprobs or [])[:generated]),
            prompt_logprobs=prompt_lps,
        )

    def stream_batch(
        self, requests: list[GenRequest]
    ) -> Iterator[list[Delta | GenResult | ServeError | None]]:
        """See `hf_stream.stream_batch`."""
        return hf_stream.stream_batch(self, requests)


def _load_error(ref: AdapterRef, e: Exception) -> ServeError:
    if isinstance(e, ServeError):
        return e
    return AdapterRefused(f"adapter {ref.name!r} ({ref.path}) could not be loaded: {e}", "model")
