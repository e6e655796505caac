"""Rules about chat messages that training data and the serving API share, so a conversation
is trained on the text the server renders for it."""

from __future__ import annotations

# OpenAI content parts ([{"type": "text", "text": ...}, ...]) become one string joined with a
# newline, as vLLM's OpenAI server joins them.
PARTS_SEPARATOR = "\n"


def join_text_parts(texts: list[str]) -> str:
    return PARTS_SEPARATOR.join(texts)
