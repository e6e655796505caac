"""Template rendering, tokenization and label masking with the base model's own tokenizer.

Labels come from rendering the chat template for each prefix of the conversation: the text an
assistant turn adds (after the generation prompt) is a character span of the full rendering,
and tokens starting inside such spans keep their labels. This works with any prefix-stable
template, including SmolLM2's, which has no `{% generation %}` markers for
`return_assistant_tokens_mask`.

A conversation the template itself refuses (many templates raise on roles out of order) is
one bad row, not a broken job: it becomes a `template_error` RowError for the rejects.
"""

from __future__ import annotations

from typing import Any

import jinja2

from rayft.data.formats import RowError
from rayft.errors import RayftError

IGNORE = -100


class TemplateError(RayftError):
    """The tokenizer's chat template cannot be used for label masking."""


def _apply(tok: Any, messages: list[dict[str, str]], field: str, **kwargs: Any) -> str:
    """The template's text for `messages`; a refusal is this row's error, not the job's."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except (jinja2.TemplateError, ValueError) as e:
        raise RowError(
            "template_error",
            field,
            f"the chat template of {tok.name_or_path} cannot render this conversation: {e}",
        ) from None


def render_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Full template text and the character spans of the assistant answers."""
    full = _apply(tok, messages, "messages")
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        last = k == len(messages) - 1  # the whole rendering is this prefix: skip a render
        end_text = full if last else _apply(tok, messages[: k + 1], "messages")
        if k:
            start_text = _apply(tok, messages[:k], "messages", add_generation_prompt=True)
            stable = full.startswith(start_text) and full.startswith(end_text)
            start = len(start_text)
        else:
            # An answer in the first turn has no prefix to render (templates refuse an empty
            # conversation), and what the template writes before it is not all ours to learn:
            # SmolLM2 injects a default system prompt there. So the span starts at the
            # answer's own text, the last occurrence in its rendering (only end-of-turn
            # markers follow it); at 0 if the template rewrote the text.
            stable = full.startswith(end_text)
            start = max(end_text.rfind(m["content"]), 0)
        if not stable:
            raise TemplateError(
                f"chat template of {tok.name_or_path} is not prefix-stable (rendering the first "
                f"{k + 1} messages is not a prefix of the whole conversation), so assistant "
                "turns cannot be located for label masking; set data.assistant_only_loss: false "
                "or use a tokenizer with a prefix-stable template"
            )
        spans.append((start, len(end_text)))
    return full, spans


def mask_labels(
    ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]]
) -> list[int]:
    """Labels equal ids for tokens that start inside an answer span, else IGNORE."""
    labels = []
    j = 0
    for tid, (start, _end) in zip(ids, offsets, strict=True):
        while j < len(spans) and start >= spans[j][1]:
            j += 1
        inside = j < len(spans) and spans[j][0] <= start < spans[j][1]
        labels.append(tid if inside else IGNORE)
    return labels


def render_sft(
    tok: Any, row: dict[str, Any], assistant_only: bool
) -> tuple[str, list[tuple[int, int]] | None]:
    """Text to tokenize and answer spans (None: learn every token) of a row with `messages`
    (list) or `text` (str); raises RowError(template_error)."""
    if row["messages"] and assistant_only:
        return render_chat(tok, row["messages"])
    if row["messages"]:  # no masking, no prefix renderings
        return _apply(tok, row["messages"], "messages"), None
    # plain text: the whole text is learned, ended by EOS so examples stay apart
    return row["text"] + (tok.eos_token or ""), None


def encode_sft(
    tok: Any, rendered: list[tuple[str, list[tuple[int, int]] | None]]
) -> list[tuple[str, list[int], list[int]]]:
    """(text, input_ids, labels) per rendered row, tokenized as one batch."""
    if not rendered:
        return []
    texts = [text for text, _ in rendered]
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for (text, sp), ids, offsets in zip(
        rendered, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        labels = list(ids) if sp is None else mask_labels(ids, offsets, sp)
        out.append((text, list(ids), labels))
    return out


def preference_tokens(tok: Any, prompt: list[dict[str, str]], chosen: str, rejected: str) -> int:
    """Prompt (with generation prompt) plus the longer answer, in tokens."""
    prompt_text = _apply(tok, prompt, "prompt", add_generation_prompt=True)
    lengths = tok([prompt_text, chosen, rejected], add_special_tokens=False)["input_ids"]
    return len(lengths[0]) + max(len(lengths[1]), len(lengths[2])) + 1  # + end of turn
