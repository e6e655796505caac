"""Constrained decoding for `response_format`: JSON objects and JSON schemas, with llguidance.

The transformers engine asks, at every decoding step of a constrained request, which tokens may
come next (`Matcher.mask`, or `Grammars.fill` for a batch), masks the others out of the logits,
samples, and reports the token back (`Matcher.accept`). The answer therefore always parses and
validates, or stops at max tokens.

Why llguidance (benchmarks/bench_grammar.py: SmolLM2's 49k tokenizer, 16 schemas, 2 busy CPUs)
- coverage: it enforced every schema tried (flat, nested, enum, anyOf/oneOf/allOf, const,
  $ref/$defs, recursive $ref, pattern, min/maxItems, min/maxLength, numeric bounds, formats,
  additionalProperties false or a schema) and refuses `uniqueItems` and `not` by name
  ("Unimplemented keys: ["not"]"), so the user gets a 400 that says what to change.
  xgrammar compiled all 16 but silently ignored allOf, uniqueItems and not: its walks broke
  those schemas (5/5, 7/38, 1/14). outlines-core (one regular expression per schema) ignored
  exclusiveMinimum/maximum (13/13 broken), ignored uniqueItems, refused an allOf part and
  `not`, took 0.7-5 s to compile some schemas and takes a single end token.
- speed: a schema compiles in about 1 ms (xgrammar 1-40 ms, outlines-core 10 ms-5 s); a mask
  takes ~10-20 us in llguidance (xgrammar ~3-20 us), ~30-150 us with the unpack into a bool
  tensor here, small next to a forward pass. The tokenizer index takes ~0.3 s, once.
- weight: one wheel with no dependencies. xgrammar's Linux wheel pulls in triton (hundreds of
  MB) that CPU installs of rayft would not otherwise need.
- vLLM agreement: vLLM's "guidance" structured-output backend is this library. With
  `disable_any_whitespace` it builds the very grammar built here (`whitespace_flexible: False`),
  so both engines allow the same answers.

Whitespace: none between JSON tokens (`{"a":1,"b":[2,3]}`). A model, random-weight ones
especially, could otherwise spend its whole budget on spaces and newlines; compact output is
also what vLLM emits with `disable_any_whitespace`.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict

import llguidance
import llguidance.hf
import numpy as np
import torch

SPEC_TYPES = ("json_object", "json_schema")
# Applied over the schema's own "x-guidance" options, so a request cannot turn whitespace back on.
_OPTIONS = {"whitespace_flexible": False}
# Short error messages: the verbose ones dump the parser state and the whole schema.
_LIMITS = llguidance.LLParserLimits(verbose_errors=False)


class GrammarError(ValueError):
    """A grammar spec (from `response_format` or a forced tool call) that cannot be enforced;
    the message says what to change."""


def _grammar(spec: dict) -> str:
    """The llguidance grammar of a spec, or GrammarError saying what is wrong with the spec."""
    if not isinstance(spec, dict) or spec.get("type") not in SPEC_TYPES:
        kind = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
        raise GrammarError(
            f"grammar type {kind!r} is not supported; use "
            '{"type": "json_object"} or {"type": "json_schema", "schema": {...}}'
        )
    if spec["type"] == "json_object":
        schema = {"type": "object"}
    else:
        schema = spec.get("schema")
        if not isinstance(schema, dict):
            raise GrammarError(
                '{"type": "json_schema"} needs "schema": a JSON schema object, '
                f"got {type(schema).__name__}"
            )
        if "x-guidance" in schema:  # vLLM reads it as defaults, this module as overrides
            raise GrammarError(
                'the schema\'s "x-guidance" options are not accepted: both engines decode '
                "compact JSON; remove the key"
            )
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=_OPTIONS)
    except ValueError as e:  # not serialisable to a JSON object
        raise GrammarError(f"the JSON schema is not valid JSON: {e}") from None
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
        grammar, None, limits=_LIMITS
    )
    if is_error:
        raise GrammarError(_unsupported(messages[0]))
    return grammar


def _unsupported(detail: str) -> str:
    detail = " ".join(line.strip() for line in detail.splitlines() if line.strip())
    return (
        f"the JSON schema cannot be enforced: {detail}. "
        "Remove or rewrite that part of the schema (`not` and `uniqueItems` are not supported)."
    )


def check(spec: dict) -> None:
    """Raise GrammarError unless `spec` is a response_format this module can enforce.

    No tokenizer needed and about a millisecond: the ingress calls it to answer 400 before
    routing. `spec` is {"type": "json_object"} or {"type": "json_schema", "schema": {...}}.
    """
    _grammar(spec)


class Grammars:
    """Per engine: the tokenizer's index (built once, ~0.4 s for a 49k vocabulary) and an LRU
    of compiled grammars keyed by spec. Thread-safe; the matchers it hands out are not."""

    def __init__(self, tokenizer, eos_ids: list[int], vocab_width: int, cache_size: int = 32):
        """`tokenizer`: a fast HF tokenizer. `eos_ids`: every token that ends an answer; each is
        allowed exactly when the value is complete. `vocab_width`: the model's logits width,
        which may exceed the tokenizer's vocabulary (padding ids are never allowed)."""
        self.eos_ids = sorted(set(eos_ids))
        self.vocab_width = vocab_width
        # Ids at or past this are padding rows of the model's output layer, or do not exist.
        self._real = min(len(tokenizer), vocab_width)
        if not self.eos_ids or self.eos_ids[-1] >= self._real:
            raise ValueError(f"eos ids {eos_ids} must be real tokens below {self._real}")
        self._tok = llguidance.hf.from_tokenizer(
            tokenizer, n_vocab=max(vocab_width, len(tokenizer)), eos_token=self.eos_ids
        )
        self._words = (self._tok.vocab_size + 31) // 32  # int32 words of one packed bitmask
        assert self._words * 32 >= vocab_width
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()
        self._executor = llguidance.LLExecutor()

    def matcher(self, spec: dict) -> Matcher:
        """A fresh matcher for one request. Raises GrammarError for a spec it cannot enforce."""
        key = json.dumps(spec, sort_keys=True)
        with self._lock:
            compiled = self._cache.get(key)
            if compiled is not None:
                self._cache.move_to_end(key)
        if compiled is None:
            # Built outside the lock (it releases the GIL): two requests racing on one new spec
            # may both build it, which costs a millisecond and keeps the lock short.
            compiled = llguidance.LLMatcher(self._tok, _grammar(spec), log_level=0, limits=_LIMITS)
            if compiled.is_error():
                raise GrammarError(_unsupported(compiled.get_error()))
            with self._lock:
                self._cache[key] = compiled
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return Matcher(self, compiled.deep_copy())

    def fill(self, rows: list[Matcher], out: torch.Tensor) -> None:
        """Write rows[i]'s mask into out[i]: `out` is a CPU bool tensor [len(rows), vocab_width].
        The rows' masks are computed in parallel on llguidance's own threads."""
        bits = np.empty((len(rows), self._words), dtype=np.int32)
        self._executor.unsafe_compute_mask_ptr(
            [(m._ll, i) for i, m in enumerate(rows)], bits.ctypes.data, bits.shape[1] * 4, len(rows)
        )
        out.numpy()[:] = self._unpack(bits)

    def _unpack(self, bits: np.ndarray) -> np.ndarray:
        """Packed int32 bitmasks [B, words] (bit j of word i is token 32*i + j) as bool [B,
        vocab_width].

        numpy, not torch: a torch copy this size goes multi-threaded, and with the cores busy
        (a forward pass, other workers) that cost 10-50 ms per step instead of tens of us."""
        # Little-endian words seen as bytes, each unpacked low bit first, keep token order; the
        # unpacked 0/1 bytes are valid bools as they are.
        flat = np.unpackbits(bits.view(np.uint8), axis=1, bitorder="little").view(np.bool_)
        # llguidance never allows the padding ids (they spell no bytes); clearing them makes
        # that this module's promise rather than a library detail.
        flat[:, self._real :] = False
        return flat[:, : self.vocab_width]


class Matcher:
    """One request's position in its grammar. Use from one thread at a time."""

    def __init__(self, grammars: Grammars, ll: llguidance.LLMatcher):
        self._grammars = grammars
        self._ll = ll
        self._done = False

    def mask(self) -> torch.Tensor:
        """Bool [vocab_width]: the tokens allowed next. Once the value is complete only the eos
        ids are allowed; while more may follow (a number's digits) both are."""
        g = self._grammars
        bits = np.empty((1, g._words), dtype=np.int32)
        self._ll.unsafe_compute_mask_ptr(bits.ctypes.data, bits.shape[1] * 4)
        return torch.from_numpy(g._unpack(bits)[0])

    def accept(self, token: int) -> None:
        """Advance past `token`, which must have been allowed by the last mask."""
        if token in self._grammars.eos_ids and not self._ll.is_accepting():
            raise ValueError(f"eos token {token} chosen before the JSON value is complete")
        if not self._ll.consume_token(token):
            error = self._ll.get_error().splitlines()[0]
            raise ValueError(f"token {token} is not allowed by the grammar here: {error}")
        if token in self._grammars.eos_ids:
            self._done = True

    def done(self) -> bool:
        """True once an eos token was accepted after a complete value."""
        return self._done
