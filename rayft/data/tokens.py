"""Template rendering, tokenization and label masking with the base model's own tokenizer.

Labels come from rendering the chat template for each prefix of the conversation: the text an
assistant turn adds (after the generation prompt) is a character span of the full rendering,
and tokens starting inside such spans keep their labels. This works with any prefix-stable
template, including SmolLM2's, which has no `{% generation %}` markers for
`return_assistant_tokens_mask`.
"""

from __future__ import annotations

from typing import Any

from rayft.errors import RayftError

IGNORE = -100


class TemplateError(RayftError):
    """The tokenizer's chat template cannot be used for label masking."""


def render_chat(tok: Any, messages: list[dict[str, str]]) -> tuple[str, list[tuple[int, int]]]:
    """Full template text and the character spans of the assistant answers."""
    full = tok.apply_chat_template(messages, tokenize=False)
    spans = []
    for k, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start_text = tok.apply_chat_template(
            messages[:k], tokenize=False, add_generation_prompt=True
        )
        last = k == len(messages) - 1  # the whole rendering is this prefix: skip a render
        end_text = full if last else tok.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (full.startswith(start_text) and full.startswith(end_text)):
            raise TemplateError(
                f"chat template of {tok.name_or_path} is not prefix-stable (rendering the first "
                f"{k + 1} messages is not a prefix of the whole conversation), so assistant "
                "turns cannot be located for label masking; set data.assistant_only_loss: false "
                "or use a tokenizer with a prefix-stable template"
            )
        spans.append((len(start_text), len(end_text)))
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


def tokenize_sft(
    tok: Any, rows: list[dict[str, Any]], assistant_only: bool
) -> list[tuple[str, list[int], list[int]]]:
    """(text, input_ids, labels) per SFT row; rows carry `messages` (list) or `text` (str)."""
    texts, spans = [], []
    for row in rows:
        if row["messages"]:
            text, sp = render_chat(tok, row["messages"])
        else:  # plain text: the whole text is learned, ended by EOS so examples stay apart
            text, sp = row["text"] + (tok.eos_token or ""), None
        texts.append(text)
        spans.append(sp)
    enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    out = []
    for text, sp, ids, offsets in zip(
        texts, spans, enc["input_ids"], enc["offset_mapping"], strict=True
    ):
        labels = list(ids) if sp is None or not assistant_only else mask_labels(ids, offsets, sp)
        out.append((text, list(ids), labels))
    return out


def preference_tokens(tok: Any, prompt: list[dict[str, str]], chosen: str, rejected: str) -> int:
    """Prompt (with generation prompt) plus the longer answer, in tokens."""
    prompt_text = tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    lengths = tok([prompt_text, chosen, rejected], add_special_tokens=False)["input_ids"]
    return len(lengths[0]) + max(len(lengths[1]), len(lengths[2])) + 1  # + end of turn
