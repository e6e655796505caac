"""The chat template's text for a conversation, and what it must render of a row.

Templates drop what they do not know without an error: tool schemas and calls, a message's
`name`, `parallel_tool_calls`. Training on that text teaches the answers without them, so a
row whose keys leave no trace in the text is a `template_error` RowError, reported with its
field like the other bad rows (see docs/contracts.md, "OpenAI's training formats").
"""

from __future__ import annotations

from typing import Any

import jinja2

from rayft.data.fields import RowError


def apply(tok: Any, messages: list[dict[str, Any]], field: str, **kwargs: Any) -> str:
    """The template's text for `messages`; a refusal is this row's error, not the job's."""
    try:
        return tok.apply_chat_template(messages, tokenize=False, **kwargs)
    except (jinja2.TemplateError, ValueError, TypeError) as e:
        # TypeError: a template that does not expect a field (content null beside tool_calls)
        raise RowError(
            "template_error",
            field,
            f"the chat template of {tok.name_or_path} cannot render this conversation: {e}",
        ) from None


def check_tools(tok: Any, messages: list[dict[str, Any]], tools: list | None, text: str) -> None:
    """A template that knows nothing of tools renders tool calls as empty turns and drops the
    schemas without an error: training on that teaches answers without their calls. Every
    call's name and argument names, and every schema's name, must be in the text."""
    wanted = [
        (f"messages[{k}].tool_calls", s)
        for k, m in enumerate(messages)
        for c in m.get("tool_calls", [])
        for s in (c["function"]["name"], *c["function"]["arguments"])
    ]
    for t in tools or []:
        name = (t.get("function") or {}).get("name") or t.get("name")
        if isinstance(name, str):
            wanted.append(("tools", name))
    for field, s in wanted:
        if s not in text:
            raise RowError(
                "template_error",
                field,
                f"the chat template of {tok.name_or_path} does not render tools or tool calls "
                f"({s!r} is not in its text); use a base model whose chat template supports "
                "tools, or leave tool rows out",
            )


def check_rendered(tok: Any, messages: list[dict[str, Any]], kw: dict[str, Any], text: str) -> None:
    """What `check_tools` does for a message's `name` and the row's `parallel_tool_calls`:
    most templates drop them without an error. A name's text may appear in the rendering by
    chance (a speaker called "user"), so each is taken out in turn: the text must change."""
    for k, m in enumerate(messages):
        if "name" not in m:
            continue
        bare = {x: v for x, v in m.items() if x != "name"}
        if apply(tok, [*messages[:k], bare, *messages[k + 1 :]], "messages", **kw) == text:
            raise RowError(
                "template_error",
                f"messages[{k}].name",
                f"the chat template of {tok.name_or_path} does not render a message's name "
                f"(its text is the same without {m['name']!r}); leave 'name' out to train "
                "without it, write the speaker into the content, or use a base model whose "
                "chat template renders names",
            )
    if "parallel_tool_calls" in kw:
        rest = {x: v for x, v in kw.items() if x != "parallel_tool_calls"}
        if apply(tok, messages, "messages", **rest) == text:
            raise RowError(
                "template_error",
                "parallel_tool_calls",
                f"the chat template of {tok.name_or_path} does not render "
                "'parallel_tool_calls': false (its text is the same without it); leave the key "
                "out to train these calls without it, or use a base model whose chat template "
                "renders it",
            )
