"""Template rendering, tokenization and label masking with the base model's own tokenizer.

Labels come from the chat template's renderings of the conversation's prefixes: the text an
assistant turn adds (after the generation prompt) is a character span of the full rendering,
and tokens starting inside such spans keep their labels. This works with any prefix-stable
template, including SmolLM2's, which has no `{% generation %}` markers for
`return_assistant_tokens_mask`.

Rendering every prefix of every row costs two template renders per answer. Rows of one shape
(the same roles in the same order) share one *skeleton*: the conversation rendered once with a
placeholder for each content, with the spans found on its prefix renderings. A row's own full
rendering must then equal the skeleton with its contents filled in; where it does not (a
template that edits or inspects contents), the row takes the prefix renderings itself.

A template that provably writes each content out whole and reads nothing else of it (the
*verbatim* ones, such as SmolLM2's and most ChatML templates) is not rendered per row at all:
rendering it was a third of `prepare`'s time. The proof is a probe: the skeleton is rendered
once more with contents that record every use but being written out (a comparison, a test,
`len`, a method, escaping), and the text must come out the same. Filters the probe cannot see
(they read the string in C) disqualify a template outright, and the first rows of every shape
are still rendered and compared in each process, a check against what the probe missed.

A conversation the template itself refuses (many templates raise on roles out of order) is
one bad row, not a broken job: it becomes a `template_error` RowError for the rejects.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rayft.data import template
from rayft.data.fields import RowError
from rayft.errors import RayftError

IGNORE = -100
# Placeholders for contents in skeletons: private-use characters no cleaned text carries
# around a number, and no template edits; with a newline and a quote inside, which JSON or
# HTML escaping would change, so that a template escaping its contents has no skeleton.
_HOLE = '\ue000{}\n"\ue001'
_HOLES = re.compile('\ue000(\\d+)\n"\ue001')
_SKELETONS: dict[tuple, _Skeleton | None] = {}
# Rows of a verbatim skeleton rendered and compared in each process before it is trusted.
VERIFY_FIRST = 32
# Jinja filters that read a string without calling its methods (C code, or a copy made with
# str()): a probe cannot see them, so a template that uses one is compared row by row.
_OPAQUE_FILTERS = re.compile(
    r"\|\s*(wordcount|striptags|forceescape|urlize|urlencode|pprint|int|float|filesizeformat|"
    r"xmlattr|dictsort|items)\b"
)


class TemplateError(RayftError):
    """The tokenizer's chat template cannot be used for label masking."""


def load_tokenizer(model_path: str) -> Any:
    """The model's fast tokenizer, as AutoTokenizer gives it, but by the class its
    tokenizer_config.json names: AutoTokenizer also loads the model's config, which imports
    torch (3.2 s -> 0.8 s of every data worker's start)."""
    import transformers

    try:
        config = json.loads((Path(model_path) / "tokenizer_config.json").read_text())
        tok = getattr(transformers, config["tokenizer_class"]).from_pretrained(model_path)
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        tok = None  # a hub id, no class named, or one this transformers lacks
    if tok is None or not tok.is_fast:  # only the auto class knows which fast one to take
        tok = transformers.AutoTokenizer.from_pretrained(model_path)
    return tok


def _unstable(tok: Any, k: int) -> TemplateError:
    return TemplateError(
        f"chat template of {tok.name_or_path} is not prefix-stable (rendering the first "
        f"{k + 1} messages is not a prefix of the whole conversation), so assistant "
        "turns cannot be located for label masking; set data.assistant_only_loss: false "
        "or use a tokenizer with a prefix-stable template"
    )


def _prefix_spans(
    tok: Any, messages: list[dict[str, Any]], full: str, kw: dict[str, Any] | None = None
) -> list[tuple[int, int]]:
    """Answer spans from renderings of the prefixes of `messages` (two per answer); `kw` are
    the template's other arguments (`tools`, `parallel_tool_calls`)."""
    kw = kw or {}
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        last = k == len(messages) - 1  # the whole rendering is this prefix: skip a render
        end_text = full if last else template.apply(tok, messages[: k + 1], "messages", **kw)
        if k:
            start_text = template.apply(
                tok, messages[:k], "messages", add_generation_prompt=True, **kw
            )
            stable = full.startswith(start_text) and full.startswith(end_text)
            start = len(start_text)
        else:
            # An answer in the first turn has no prefix to render (templates refuse an empty
            # conversation), and what the template writes before it is not all ours to learn:
            # SmolLM2 injects a default system prompt there. So the span starts at the
            # answer's own text, the last occurrence in its rendering (only end-of-turn
            # markers follow it); at 0 if the template rewrote the text.
            stable = full.startswith(end_text)
            content = m.get("content") or ""  # null beside tool_calls
            start = max(end_text.rfind(content), 0) if content else 0
        if not stable:
            raise _unstable(tok, k)
        spans.append((start, len(end_text)))
    return spans


@dataclass
class _Skeleton:
    """A conversation shape rendered with content placeholders: the literal text between the
    contents (`pieces`, one more than contents) and the answer spans as (piece, offset);
    `verbatim` once the probe found the template writing contents out whole, `checked` the rows
    compared with their own rendering since."""

    pieces: tuple[str, ...]
    spans: tuple[tuple[tuple[int, int], tuple[int, int]], ...]
    verbatim: bool = False
    checked: int = 0

    def fill(self, contents: list[str]) -> tuple[str, list[tuple[int, int]]]:
        """The text with `contents` in their places, and the answer spans in it."""
        starts, at = [], 0  # where each piece starts in the filled-in text
        for i, piece in enumerate(self.pieces):
            starts.append(at)
            at += len(piece) + (len(contents[i]) if i < len(contents) else 0)
        filled = "".join(p + c for p, c in zip(self.pieces, [*contents, ""], strict=True))
        return filled, [(starts[a] + x, starts[b] + y) for (a, x), (b, y) in self.spans]

    @property
    def trusted(self) -> bool:
        return self.verbatim and self.checked >= VERIFY_FIRST


_PROBE_USES: list[str] = []


class _Probe(str):
    """A content in the probe rendering: the same text, but every use of it other than being
    written out or concatenated (which never call its methods) is noted in _PROBE_USES."""

    __slots__ = ()

    def __getattribute__(self, name: str):
        if name != "__class__":  # isinstance() against other types asks: that reads nothing
            _PROBE_USES.append(name)
        return str.__getattribute__(self, name)


def _noting(name: str):
    def use(self, *args):
        _PROBE_USES.append(name)
        return getattr(str, name)(self, *args)

    return use


for _use in (
    *("__len__", "__contains__", "__iter__", "__getitem__", "__hash__", "__format__"),
    *("__eq__", "__ne__", "__lt__", "__le__", "__gt__", "__ge__", "__mod__", "__mul__", "__rmul__"),
):
    setattr(_Probe, _use, _noting(_use))


def _verbatim(tok: Any, holes: list[dict[str, str]], text: str) -> bool:
    """Whether the template, for this shape, writes every content out whole and reads nothing
    else of it: rendered with probing contents it must note no use and give `text` again."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template

        source = tok.get_chat_template()
        if _OPAQUE_FILTERS.search(source):
            return False
        probes = [{**m, "content": _Probe(m["content"])} for m in holes]
        _PROBE_USES.clear()
        # What apply_chat_template passes, but for the contents it would copy to plain str.
        out = _compile_jinja_template(source).render(
            messages=probes,
            tools=None,
            documents=None,
            add_generation_prompt=False,
            **tok.special_tokens_map,
        )
    except Exception:  # noqa: BLE001 - a probe that fails proves nothing: compare rows instead
        return False
    finally:
        uses = list(_PROBE_USES)
        _PROBE_USES.clear()
    return not uses and out == text


def _skeleton(tok: Any, roles: tuple[str, ...]) -> _Skeleton | None:
    """The skeleton of conversations with `roles`, or None where there is none to share (the
    template refuses the shape, moves or repeats contents, or is not prefix-stable: those
    rows take the prefix renderings, which raise the right error)."""
    key = (tok.name_or_path, tok.chat_template, roles)
    if key in _SKELETONS:
        return _SKELETONS[key]
    holes = [{"role": r, "content": _HOLE.format(i)} for i, r in enumerate(roles)]
    skeleton = None
    try:
        text = template.apply(tok, holes, "messages")
        parts = _HOLES.split(text)  # literal, hole number, literal, ...
        order = [int(x) for x in parts[1::2]]
        if order == list(range(len(roles))):
            spans = _prefix_spans(tok, holes, text)
            skeleton = _Skeleton(
                tuple(parts[0::2]),
                tuple((_locate(text, a), _locate(text, b)) for a, b in spans),
                verbatim=_verbatim(tok, holes, text),
            )
    except (RowError, TemplateError):
        pass
    if len(_SKELETONS) > 4096:  # shapes are few; a bound keeps odd data from growing it
        _SKELETONS.clear()
    _SKELETONS[key] = skeleton
    return skeleton


def _locate(text: str, pos: int) -> tuple[int, int]:
    """(piece, offset in piece) of skeleton position `pos` (never inside a placeholder)."""
    piece, at = 0, 0
    for m in _HOLES.finditer(text):
        if m.start() >= pos:
            break
        piece, at = piece + 1, m.end()
    return piece, pos - at


def render_chat(
    tok: Any, messages: list[dict[str, Any]], kw: dict[str, Any] | None = None
) -> tuple[str, list[tuple[int, int]]]:
    """Full template text and the character spans of the assistant answers, one per answer;
    `kw` are the template's other arguments (`tools`, `parallel_tool_calls`)."""
    kw = kw or {}
    sk = None
    if not kw and all(m.keys() == {"role", "content"} for m in messages):
        sk = _skeleton(tok, tuple(m["role"] for m in messages))
    if sk is not None and sk.trusted:
        return sk.fill([m["content"] for m in messages])
    full = template.apply(tok, messages, "messages", **kw)
    if sk is not None:
        filled, spans = sk.fill([m["content"] for m in messages])
        if filled == full:
            sk.checked += 1
            return full, spans
        sk.verbatim = False  # the probe missed something: compare every row from now on
    return full, _prefix_spans(tok, messages, full, kw)


def mask_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels equal ids for tokens that start inside an answer span, else IGNORE."""
    if not ids:
        return []
    starts = np.fromiter((s for s, _ in offsets), dtype=np.int64, count=len(offsets))
    # Spans are ordered and disjoint: a start inside one lies after an odd number of bounds.
    bounds = np.asarray(spans, dtype=np.int64).reshape(-1)
    inside = np.searchsorted(bounds, starts, side="right") % 2 == 1
    return np.where(inside, np.asarray(ids, dtype=np.int64), IGNORE).tolist()


def render_sft(
    tok: Any, row: dict[str, Any], assistant_only: bool
) -> tuple[str, list[tuple[int, int]] | None]:
    """Text to tokenize and the spans to learn (None: every token) of a row with `messages`
    (list; `tools`: tool schemas, `parallel_tool_calls`: False, when given) or `text` (str);
    raises RowError(template_error).

    An answer with `weight` 0 is not learned, with or without assistant_only: the row's own
    file says so."""
    messages = row["messages"]
    if not messages:  # plain text: the whole text is learned, ended by EOS so examples stay apart
        return row["text"] + (tok.eos_token or ""), None
    weights = [m.get("weight", 1) for m in messages if m["role"] == "assistant"]
    messages = [_for_template(m) for m in messages]
    kw: dict[str, Any] = {"tools": row["tools"]} if row.get("tools") else {}
    if row.get("parallel_tool_calls") is False:
        kw["parallel_tool_calls"] = False
    if assistant_only or 0 in weights:
        try:
            text, spans = render_chat(tok, messages, kw)
        except TemplateError:  # without assistant_only only this row needs the spans
            if assistant_only:
                raise
            raise RowError(
                "template_error",
                "messages",
                f"an answer has weight 0, but the chat template of {tok.name_or_path} is not "
                "prefix-stable, so the answer cannot be found in the text to leave it out; "
                "remove its weight or the row",
            ) from None
        spans = _weighed(spans, weights, assistant_only, len(text))
    else:  # no masking, no prefix renderings
        text, spans = template.apply(tok, messages, "messages", **kw), None
    template.check_tools(tok, messages, kw.get("tools"), text)
    template.check_rendered(tok, messages, kw, text)
    return text, spans


def _weighed(
    spans: list[tuple[int, int]], weights: list[int], assistant_only: bool, length: int
) -> list[tuple[int, int]]:
    """The spans to learn from the answers' spans: those of weight 1; without assistant_only,
    the whole text but the answers of weight 0."""
    if assistant_only:
        return [s for s, w in zip(spans, weights, strict=True) if w]
    bounds = [0, *(x for s, w in zip(spans, weights, strict=True) if not w for x in s), length]
    return [(a, b) for a, b in zip(bounds[::2], bounds[1::2], strict=True) if a < b]


def _for_template(message: dict[str, Any]) -> dict[str, Any]:
    """The message as chat templates take it: no `weight` (ours to apply, not the template's),
    and tool-call arguments as a mapping (transformers' convention), where OpenAI sends them
    as JSON text."""
    message = {k: v for k, v in message.items() if k != "weight"}
    if "tool_calls" not in message:
        return message
    calls = [
        {**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
        for c in message["tool_calls"]
    ]
    return {**message, "tool_calls": calls}


def encode_sft(
    tok: Any, rendered: list[tuple[str, list[tuple[int, int]] | None]]
) -> list[tuple[str, list[int], list[int]]]:
    """(text, input_ids, labels) per rendered row, tokenized as one batch."""
    if not rendered:
        return []
    texts = [text for text, _ in rendered]
    # The fast tokenizer's own batch encode: what tok(texts) runs, without its conversion of
    # every encoding into a BatchEncoding (a third of the encode time here).
    encodings = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    out = []
    for (text, sp), enc in zip(rendered, encodings, strict=True):
        ids = enc.ids
        labels = list(ids) if sp is None else span_labels(enc, ids, sp, len(text))
        out.append((text, ids, labels))
    return out


def span_labels(enc: Any, ids: list[int], spans: list[tuple[int, int]], length: int) -> list[int]:
    """What mask_labels gives, from two lookups a span instead of every token's offsets
    (reading those was a tenth of `prepare`'s time)."""
    labels = [IGNORE] * len(ids)
    for start, end in spans:
        a, b = (_first_token_at(enc, pos, length, len(ids)) for pos in (start, end))
        if a is None or b is None:  # a character no token covers: read the offsets after all
            return mask_labels(ids, enc.offsets, spans)
        labels[a:b] = ids[a:b]
    return labels


def _first_token_at(enc: Any, pos: int, length: int, count: int) -> int | None:
    """Index of the first of `count` tokens that starts at or after character `pos` of the
    text (`length` characters)."""
    if pos >= length:
        return count
    t = enc.char_to_token(pos)
    if t is None:
        return None
    return t if enc.token_to_chars(t)[0] >= pos else t + 1


def preference_tokens(tok: Any, prompt: list[dict[str, str]], chosen: str, rejected: str) -> int:
    """Prompt (with generation prompt) plus the longer answer, in tokens."""
    prompt_text = template.apply(tok, prompt, "prompt", add_generation_prompt=True)
    lengths = tok([prompt_text, chosen, rejected], add_special_tokens=False)["input_ids"]
    return len(lengths[0]) + max(len(lengths[1]), len(lengths[2])) + 1  # + end of turn


def prompt_tokens(tok: Any, prompt: list[dict[str, str]], completion: str | None = None) -> int:
    """Prompt (with generation prompt) plus a KTO row's completion, in tokens; a GRPO prompt
    has none (the policy writes it)."""
    texts = [template.apply(tok, prompt, "prompt", add_generation_prompt=True)]
    texts += [completion] if completion is not None else []
    lengths = [len(ids) for ids in tok(texts, add_special_tokens=False)["input_ids"]]
    return lengths[0] + sum(n + 1 for n in lengths[1:])  # + end of turn
