"""Constrained decoding (rayft.serving.grammar) with the tiny-llama tokenizer: random walks
through the masks always end in text that parses and validates."""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

from rayft.serving.grammar import GrammarError, Grammars, check

PADDING = 40  # the model's logits are wider than the tokenizer's vocabulary

SCHEMAS = {
    "flat": {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "age": {"type": "integer"},
            "score": {"type": "number"},
            "ok": {"type": "boolean"},
        },
        "required": ["name", "age", "score", "ok"],
        "additionalProperties": False,
    },
    "nested": {
        "type": "object",
        "properties": {
            "status": {"enum": ["open", "shipped", "refunded"]},
            "lines": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"sku": {"type": "string"}, "qty": {"type": "integer"}},
                    "required": ["sku", "qty"],
                    "additionalProperties": False,
                },
            },
            "note": {"anyOf": [{"type": "null"}, {"type": "string", "maxLength": 8}]},
        },
        "required": ["status", "lines", "note"],
        "additionalProperties": False,
    },
    "recursive": {
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "v": {"type": "integer", "minimum": 0, "maximum": 9},
                    "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}, "maxItems": 2},
                },
                "required": ["v", "kids"],
                "additionalProperties": False,
            }
        },
        "$ref": "#/$defs/node",
    },
    "pattern+items": {
        "type": "object",
        "properties": {
            "ticket": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{4}$"},
            "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 3},
        },
        "required": ["ticket", "tags"],
        "additionalProperties": False,
    },
    "optional": {
        "type": "object",
        "properties": {"a": {"type": "string"}, "b": {"type": "number", "exclusiveMinimum": 0}},
        "additionalProperties": False,
    },
    "integer": {"type": "integer", "minimum": -50, "maximum": 500},
}


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def eos(tok) -> list[int]:
    return sorted(tok.convert_tokens_to_ids(["<|endoftext|>", "<|im_end|>"]))


@pytest.fixture(scope="module")
def grammars(tok, eos) -> Grammars:
    return Grammars(tok, eos, len(tok) + PADDING)


def valid(text: str, schema: dict) -> bool:
    try:
        jsonschema.validate(json.loads(text), schema)
    except (ValueError, jsonschema.ValidationError):
        return False
    return True


def walk(grammars, tok, eos, spec: dict, seed: int, budget: int = 600) -> str:
    """Sample among the allowed tokens (half the time among allowed closing tokens, so values
    end) until an eos token is accepted; check every mask on the way."""
    rng = random.Random(seed)
    closers = {i for i in range(len(tok)) if tok.decode([i]) in ('"', "}", "]", ",")}
    schema = spec.get("schema", {"type": "object"})
    m, out = grammars.matcher(spec), []
    for _ in range(budget):
        mask = m.mask()
        assert mask.shape == (len(tok) + PADDING,) and mask.dtype == torch.bool
        assert not mask[len(tok) :].any(), "a padding id past the tokenizer's vocab is allowed"
        allowed = mask.nonzero()[:, 0].tolist()
        text = tok.decode(out)
        # Every end token is allowed exactly when the text so far is a complete, valid value.
        assert all(mask[e] == mask[eos[0]] for e in eos)
        assert bool(mask[eos[0]]) == valid(text, schema), text
        closing = [t for t in allowed if t in closers or t in eos]
        t = rng.choice(closing if closing and rng.random() < 0.5 else allowed)
        m.accept(t)
        if t in eos:
            assert m.done()
            return text
        assert not m.done()
        out.append(t)
    raise AssertionError(f"no complete value within {budget} tokens: {tok.decode(out)!r}")


@pytest.mark.parametrize("name", SCHEMAS)
def test_random_walks_parse_and_validate(grammars, tok, eos, name):
    schema = SCHEMAS[name]
    for seed in range(4):
        text = walk(grammars, tok, eos, {"type": "json_schema", "schema": schema}, seed)
        jsonschema.validate(json.loads(text), schema)
        # Compact: no whitespace outside string literals.
        assert not re.search(r"\s", re.sub(r'"(?:[^"\\]|\\.)*"', "", text)), text


def test_json_object_gives_an_object(grammars, tok, eos):
    for seed in range(6):
        text = walk(grammars, tok, eos, {"type": "json_object"}, seed)
        assert isinstance(json.loads(text), dict)


def test_eos_only_once_the_value_is_complete(grammars, tok, eos):
    m = grammars.matcher({"type": "json_schema", "schema": SCHEMAS["optional"]})
    tokens = tok.encode('{"a":"yes"}', add_special_tokens=False)
    with pytest.raises(ValueError, match="before the JSON value is complete"):
        grammars.matcher({"type": "json_object"}).accept(eos[0])
    for t in tokens:
        mask = m.mask()
        assert mask[t] and not mask[eos].any()
        m.accept(t)
    assert m.mask().nonzero()[:, 0].tolist() == eos  # closed object: nothing but the end
    m.accept(eos[1])
    assert m.done()


def test_a_number_may_end_or_go_on(grammars, tok, eos):
    m = grammars.matcher({"type": "json_schema", "schema": {"type": "integer"}})
    m.accept(tok.convert_tokens_to_ids("1"))
    mask = m.mask()
    assert mask[eos].all() and mask[tok.convert_tokens_to_ids("2")]


def test_disallowed_token_is_refused(grammars, tok):
    m = grammars.matcher({"type": "json_object"})
    with pytest.raises(ValueError, match="not allowed"):
        m.accept(tok.convert_tokens_to_ids("1"))


def test_matchers_of_one_spec_are_independent(grammars, tok):
    spec = {"type": "json_schema", "schema": SCHEMAS["flat"]}
    a, b = grammars.matcher(spec), grammars.matcher(json.loads(json.dumps(spec)))
    first = b.mask().clone()
    for t in tok.encode('{"name":"', add_special_tokens=False):
        a.accept(t)
    assert torch.equal(b.mask(), first) and not torch.equal(a.mask(), first)


def test_fill_matches_mask_per_row(grammars, tok):
    rows = [grammars.matcher({"type": "json_schema", "schema": s}) for s in SCHEMAS.values()]
    rows[0].accept(tok.encode('{"', add_special_tokens=False)[0])
    out = torch.ones((len(rows), grammars.vocab_width), dtype=torch.bool)
    grammars.fill(rows, out)
    assert torch.equal(out, torch.stack([m.mask() for m in rows]))


@pytest.mark.parametrize(
    "schema,feature",
    [
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ],
)
def test_unsupported_schema_names_the_feature(grammars, schema, feature):
    spec = {"type": "json_schema", "schema": schema}
    with pytest.raises(GrammarError, match=f'"{feature}"'):
        check(spec)
    with pytest.raises(GrammarError, match=f'"{feature}"'):
        grammars.matcher(spec)


@pytest.mark.parametrize(
    "spec,words",
    [
        (None, "not supported"),
        ("json", "not supported"),
        ({}, "not supported"),
        ({"type": "text"}, "'text' is not supported"),
        ({"type": "json_schema"}, 'needs "schema"'),
        ({"type": "json_schema", "schema": "{}"}, 'needs "schema"'),
        ({"type": "json_schema", "schema": {"type": "strin"}}, "strin"),
        ({"type": "json_schema", "schema": {"$ref": "#/$defs/gone"}}, "gone"),
        ({"type": "json_schema", "schema": {"type": "string", "pattern": "(("}}, "regex"),
        ({"type": "json_schema", "schema": {"type": "string", "format": "colour"}}, "colour"),
    ],
)
def test_check_refuses_garbage(spec, words):
    with pytest.raises(GrammarError, match=re.escape(words)):
        check(spec)


def test_check_accepts_what_matcher_serves():
    check({"type": "json_object"})
    for schema in SCHEMAS.values():
        check({"type": "json_schema", "schema": schema, "name": "x", "strict": True})
