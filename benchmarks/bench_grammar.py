"""Structured-output grammar libraries compared on CPU, measured in one run on this machine.

    .venv/bin/python benchmarks/bench_grammar.py [--model smollm2-135m-instruct] [--steps 200]

For llguidance, xgrammar and outlines-core (each only if installed; outlines-core is not a
rayft dependency: `pip install outlines-core==0.2.14` to include it), with the real tokenizer
of --model and its logits width:

- tokenizer index: what each library builds once per engine;
- compile: turning each JSON schema into a matcher for that tokenizer (library caches off);
- mask: the time of one next-token bitmask fill, mean and median over --steps steps of a
  random walk: at each step a token is drawn among the allowed ones (half the time among the
  allowed closing tokens `"` `}` `]` `,` and the end tokens, so values finish), and the walk
  starts over whenever a value is complete (every library walks the same way, seeded);
- outcome: "refused" when compiling raised (the reasons are listed last), "N/M bad" when N of
  the M finished walks produced text that `json.loads` + `jsonschema.validate` reject (a
  keyword silently ignored), "ok (M)" otherwise.

"rayft (llguidance)" is rayft.serving.grammar itself: llguidance plus the unpack of each mask
into a bool tensor of the logits width, which is what the transformers engine pays per row and
step. Whitespace is off for every library (compact JSON). Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import jsonschema


def obj(required: list[str] | None = None, **props) -> dict:
    """An object schema with these properties and no others; all required unless listed."""
    return {
        "type": "object",
        "properties": props,
        "required": list(props) if required is None else required,
        "additionalProperties": False,
    }


STR, INT = {"type": "string"}, {"type": "integer"}
SCHEMAS: dict[str, dict] = {
    "json_object": {"type": "object"},
    "flat": obj(name=STR, age=INT, score={"type": "number"}, active={"type": "boolean"}),
    "nested+enum": obj(
        id=STR,
        status={"enum": ["open", "shipped", "refunded"]},
        lines={"type": "array", "items": obj(sku=STR, qty=INT)},
        address=obj(["city"], city=STR, zip=STR),
    ),
    "anyOf": obj(contact={"anyOf": [{"type": "null"}, INT, obj(phone=STR)]}),
    "$ref/$defs": {
        "$defs": {"addr": obj(city=STR)},
        **obj(home={"$ref": "#/$defs/addr"}, work={"$ref": "#/$defs/addr"}),
    },
    "recursive $ref": {
        "$defs": {
            "node": obj(v=INT, kids={"type": "array", "items": {"$ref": "#/$defs/node"}}),
        },
        "$ref": "#/$defs/node",
    },
    "pattern": obj(ticket={"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"}),
    "minItems/maxItems": obj(tags={"type": "array", "items": STR, "minItems": 2, "maxItems": 4}),
    "optional props": obj([], a=STR, b=INT, c={"type": "object"}),
    "additionalProps schema": {**obj(name=STR), "additionalProperties": INT},
    "min/max number": obj(
        n={"type": "integer", "minimum": 1, "maximum": 12},
        x={"type": "number", "exclusiveMinimum": 0, "maximum": 1},
    ),
    "min/maxLength": obj(s={"type": "string", "minLength": 2, "maxLength": 5}),
    "format": obj(
        when={"type": "string", "format": "date-time"}, id={"type": "string", "format": "uuid"}
    ),
    "oneOf/allOf/const": obj(
        kind={"const": "pet"},
        pet={"oneOf": [STR, INT]},
        meta={"allOf": [{"type": "object"}, {"required": ["k"]}]},
    ),
    "uniqueItems": {"type": "array", "items": {"enum": [1, 2, 3]}, "uniqueItems": True},
    "not": {"type": "object", "properties": {"a": {"not": STR}}},
}


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, eos: list[int], width: int):
        import llguidance
        import llguidance.hf
        import torch

        self.llg, self.torch = llguidance, torch
        self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=width, eos_token=eos)
        self.bits = torch.zeros((self.tok.vocab_size + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        grammar = self.llg.LLMatcher.grammar_from_json_schema(
            schema, overrides={"whitespace_flexible": False}
        )
        m = self.llg.LLMatcher(self.tok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def matcher(self, compiled):
        return compiled.deep_copy()

    def fill(self, m):
        m.unsafe_compute_mask_ptr(self.bits.data_ptr(), self.bits.numel() * 4)
        return self.bits

    def accept(self, m, token: int) -> None:
        assert m.consume_token(token), m.get_error()

    def allowed(self, bits) -> list[int]:
        return allowed_ids(bits)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, eos: list[int], width: int):
        import xgrammar

        self.xgr = xgrammar
        info = xgrammar.TokenizerInfo.from_huggingface(tok, vocab_size=width, stop_token_ids=eos)
        self.compiler = xgrammar.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bits = xgrammar.allocate_token_bitmask(1, width)

    def compile(self, schema: dict):
        return self.compiler.compile_json_schema(schema, any_whitespace=False)

    def matcher(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, m):
        m.fill_next_token_bitmask(self.bits)
        return self.bits[0]

    def accept(self, m, token: int) -> None:
        assert m.accept_token(token)

    def allowed(self, bits) -> list[int]:
        return allowed_ids(bits)


class OutlinesCore:
    """outlines-core compiles a schema to one regex, then the regex to a token-level automaton.
    Its vocabulary takes one end token and the tokens' bytes, so byte-level BPE is undone here."""

    name = "outlines-core"

    def __init__(self, tok, eos: list[int], width: int):
        import outlines_core
        import torch

        self.oc, self.eos = outlines_core, eos
        byte_of = {c: b for b, c in byte_level_chars().items()}
        vocab: dict[bytes, list[int]] = {}
        special = set(tok.all_special_ids)
        for text, i in tok.get_vocab().items():
            if i not in special:
                vocab.setdefault(bytes(byte_of[c] for c in text), []).append(i)
        self.vocab = outlines_core.Vocabulary(eos[0], vocab)
        self.bits = torch.zeros((width + 31) // 32, dtype=torch.int32)

    def compile(self, schema: dict):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema), "")
        return self.oc.Index(regex, self.vocab)

    def matcher(self, compiled):
        return self.oc.Guide(compiled)

    def fill(self, m):
        m.write_mask_into(self.bits.data_ptr(), self.bits.numel(), 4)
        return self.bits

    def accept(self, m, token: int) -> None:
        if token not in self.eos:
            m.advance(token, return_tokens=False)

    def allowed(self, bits) -> list[int]:
        return allowed_ids(bits)


class Rayft:
    """rayft.serving.grammar itself: llguidance plus the unpack into a bool tensor of the
    logits width, which is what the transformers engine pays per row and step."""

    name = "rayft (llguidance)"

    def __init__(self, tok, eos: list[int], width: int):
        from rayft.serving.grammar import Grammars

        self.grammars = Grammars(tok, eos, width)

    def compile(self, schema: dict):
        spec = {"type": "json_schema", "schema": schema}
        self.grammars.matcher(spec)  # compiled and cached
        return spec

    def matcher(self, spec):
        return self.grammars.matcher(spec)

    def fill(self, m):
        return m.mask()

    def allowed(self, mask) -> list[int]:
        return mask.nonzero()[:, 0].tolist()

    def accept(self, m, token: int) -> None:
        m.accept(token)


def byte_level_chars() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are spelt in."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    bs += range(ord("®"), ord("ÿ") + 1)
    cs, extra = list(bs), 0
    for b in range(256):
        if b not in bs:  # unprintable bytes are moved to 256 and up
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return dict(zip(bs, map(chr, cs), strict=True))


def allowed_ids(bits) -> list[int]:
    """Token ids whose bit is set in a packed int32 bitmask (bit j of word i: token 32*i+j)."""
    import numpy as np

    flat = np.unpackbits(bits.numpy().view(np.uint8), bitorder="little")
    return np.nonzero(flat)[0].tolist()


def walk(lib, compiled, tok, eos: set[int], closers: set[int], steps: int, seed: int = 0):
    """Seconds of each mask fill over `steps` steps, and the texts of the values finished."""
    rng = random.Random(seed)
    m, out, texts, spent = lib.matcher(compiled), [], [], []
    for _ in range(steps):
        start = time.perf_counter()
        bits = lib.fill(m)
        spent.append(time.perf_counter() - start)
        allowed = lib.allowed(bits)
        assert allowed, "empty mask"
        closing = [t for t in allowed if t in closers]
        t = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        lib.accept(m, t)
        if t in eos:
            texts.append(tok.decode(out))
            m, out = lib.matcher(compiled), []
        else:
            out.append(t)
    return spent, texts


def outcome(schema: dict, texts: list[str]) -> str:
    bad = 0
    for text in texts:
        try:
            jsonschema.validate(json.loads(text), schema)
        except (ValueError, jsonschema.ValidationError):
            bad += 1
    if not texts:
        return "none finished"
    return f"{bad}/{len(texts)} bad" if bad else f"ok ({len(texts)})"


def table(title: str, cells: dict[tuple[str, str], str], libs: list[str]) -> None:
    print(f"\n{title}")
    head = f"{'schema':<23}" + "".join(f"| {lib:<19}" for lib in libs)
    print(f"{head}\n{'-' * len(head)}")
    for name in SCHEMAS:
        print(f"{name:<23}" + "".join(f"| {cells[name, lib]:<19}" for lib in libs))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()

    from transformers import AutoConfig, AutoTokenizer

    import rayft.serving.grammar  # noqa: F401  (imported here, not in the timed set-up below)
    from rayft import models

    path = models.resolve(args.model)
    tok = AutoTokenizer.from_pretrained(path)
    width = max(AutoConfig.from_pretrained(path).vocab_size, len(tok))
    eos = sorted({tok.eos_token_id, *tok.convert_tokens_to_ids(["<|endoftext|>"])} - {None})
    closers = {i for i in range(len(tok)) if tok.decode([i]) in ('"', "}", "]", ",")} | set(eos)
    print(f"model {args.model}: tokenizer {len(tok)} tokens, logits width {width}, eos {eos}")

    libs = []
    for cls in (LLGuidance, XGrammar, OutlinesCore, Rayft):
        try:
            start = time.perf_counter()
            libs.append(cls(tok, eos, width))
            print(f"{cls.name}: tokenizer index {time.perf_counter() - start:.2f} s")
        except ImportError as e:
            print(f"{cls.name}: skipped ({e})")

    compile_ms, mask_us, result, refusals = {}, {}, {}, []
    for name, schema in SCHEMAS.items():
        for lib in libs:
            key = name, lib.name
            try:
                start = time.perf_counter()
                compiled = lib.compile(schema)
                compile_ms[key] = f"{1e3 * (time.perf_counter() - start):.1f}"
            except Exception as e:  # each library raises its own types
                compile_ms[key] = mask_us[key] = "-"
                result[key] = "refused"
                refusals.append(f"{lib.name} refused {name}: {str(e).strip().splitlines()[0]}")
                continue
            spent, texts = walk(lib, compiled, tok, set(eos), closers, args.steps)
            mask_us[key] = (
                f"{1e6 * statistics.mean(spent):.0f} ({1e6 * statistics.median(spent):.0f})"
            )
            result[key] = outcome(schema, texts)
    names = [lib.name for lib in libs]
    table("compile (ms, first compile of the schema)", compile_ms, names)
    table(f"mask (us, mean and (median) of {args.steps} steps of a random walk)", mask_us, names)
    table("outcome: refused / walks whose text failed validation / ok (walks)", result, names)
    print("", *refusals, sep="\n")


if __name__ == "__main__":
    main()
