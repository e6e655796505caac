"""Row formats: detect them, validate one row, and turn it into rayft's one internal shape.

Every format becomes either an SFT example (`messages`: list of {role, content}; plain text
rows carry `text` instead) or a preference example (`prompt` messages, `chosen`, `rejected`).
Validation follows OpenAI's fine-tuning data checks; each problem is a `RowError` naming the
field, so the pipeline can report file, line and field.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FORMATS = ("chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference")
KIND_OF = {f: ("preference" if f == "preference" else "sft") for f in FORMATS}
ROLES = ("system", "user", "assistant")
# OpenAI chat rows may also call tools: assistant turns with `tool_calls`, `tool` turns with
# the results. Other formats have no tool turns.
CHAT_ROLES = (*ROLES, "tool")
# ShareGPT speakers as the common exports spell them.
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
}


class RowError(ValueError):
    """One bad row: `kind` is the error class (counted), `field` where it is."""

    def __init__(self, kind: str, field: str, reason: str):
        super().__init__(reason)
        self.kind, self.field, self.reason = kind, field, reason


@dataclass
class Example:
    """A valid row in rayft's internal shape (before cleaning)."""

    kind: str  # sft | preference
    messages: list[dict[str, str]] | None = None  # sft chat rows
    text: str | None = None  # sft plain-text rows
    tools: list[dict[str, Any]] | None = None  # chat rows: the tool schemas offered
    prompt: list[dict[str, str]] | None = None  # preference rows
    chosen: str | None = None
    rejected: str | None = None


def detect(obj: Any) -> str | None:
    """The format a parsed row looks like, or None."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    if "messages" in keys:
        return "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys or {"preferred_output", "non_preferred_output"} <= keys:
        return "preference"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if "text" in keys:
        return "text"
    return None


def parse_line(line: str) -> Any:
    """json.loads that raises RowError(bad_json) with the parser's position."""
    try:
        return json.loads(line)
    except ValueError as e:
        raise RowError("bad_json", "(row)", f"not valid JSON: {e}") from None


def to_example(obj: Any, fmt: str) -> Example:
    """Validate one parsed row of format `fmt` and convert it; raises RowError."""
    if not isinstance(obj, dict):
        raise RowError("not_object", "(row)", f"expected a JSON object, got {type(obj).__name__}")
    return _CONVERT[fmt](obj)


# --------------------------------------------------------------------------- field checks


def _text(obj: dict, key: str, field: str | None = None, required: bool = True) -> str:
    field = field or key
    if key not in obj or obj[key] is None:
        if not required:
            return ""
        raise RowError("missing_key", field, f"missing required key '{field}'")
    value = obj[key]
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        # OpenAI content parts: [{"type": "text", "text": ...}]; only text parts make sense here.
        if any(p.get("type") != "text" or not isinstance(p.get("text"), str) for p in value):
            raise RowError("wrong_type", field, f"'{field}' has non-text content parts")
        value = "".join(p["text"] for p in value)
    if not isinstance(value, str):
        raise RowError(
            "wrong_type", field, f"'{field}' must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise RowError("empty_content", field, f"'{field}' is empty")
    return value


def _messages(
    value: Any,
    field: str,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
    tools: bool = False,
) -> list[dict[str, Any]]:
    """{role, content} per message; with `tools`, also OpenAI's tool turns: an assistant turn
    with `tool_calls` (its content may be null) and `tool` turns (content and tool_call_id)."""
    if not isinstance(value, list):
        raise RowError("wrong_type", field, f"'{field}' must be a list, got {type(value).__name__}")
    if not value:
        raise RowError("empty_content", field, f"'{field}' is an empty list")
    out = []
    for where, m in _objects(value, field):
        if role_key not in m:
            raise RowError("missing_key", f"{where}.{role_key}", f"missing '{where}.{role_key}'")
        raw_role = m[role_key]
        known_roles = roles or {r: r for r in (CHAT_ROLES if tools else ROLES)}
        role = known_roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            known = ", ".join(sorted(known_roles))
            raise RowError(
                "unknown_role", f"{where}.{role_key}", f"unknown role {raw_role!r} (known: {known})"
            )
        calls = m.get("tool_calls") if tools and role == "assistant" else None
        if calls is not None:
            message: dict[str, Any] = {
                "role": role,
                "content": _text(m, content_key, f"{where}.{content_key}", required=False),
                "tool_calls": _tool_calls(calls, f"{where}.tool_calls"),
            }
        else:
            message = {"role": role, "content": _text(m, content_key, f"{where}.{content_key}")}
        if role == "tool":
            message["tool_call_id"] = _text(m, "tool_call_id", f"{where}.tool_call_id")
        out.append(message)
    return out


def _objects(value: list, field: str):
    """(`field[i]`, item) for each item of a list that must hold JSON objects."""
    for i, item in enumerate(value):
        where = f"{field}[{i}]"
        if not isinstance(item, dict):
            raise RowError("wrong_type", where, f"'{where}' must be an object")
        yield where, item


def _tool_calls(value: Any, field: str) -> list[dict[str, Any]]:
    """OpenAI tool calls: a non-empty list of {id, type: function, function: {name,
    arguments (a JSON string)}}."""
    if not isinstance(value, list) or not value:
        raise RowError("wrong_type", field, f"'{field}' must be a non-empty list of tool calls")
    out = []
    for where, call in _objects(value, field):
        if call.get("type") != "function":
            raise RowError(
                "wrong_type",
                f"{where}.type",
                f"'{where}.type' must be 'function', got {call.get('type')!r}",
            )
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise RowError("missing_key", f"{where}.function", f"missing object '{where}.function'")
        name = _text(fn, "name", f"{where}.function.name")
        if not isinstance(fn.get("arguments"), str):  # OpenAI sends the arguments as JSON text
            raise RowError(
                "wrong_type",
                f"{where}.function.arguments",
                f"'{where}.function.arguments' must be a string (the arguments as JSON)",
            )
        arguments = fn["arguments"]
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise RowError(
                "wrong_type",
                f"{where}.function.arguments",
                f"'{where}.function.arguments' must be a JSON object, got {arguments[:80]!r}",
            )
        out.append(
            {
                "id": _text(call, "id", f"{where}.id"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return out


def _need_assistant(messages: list[dict[str, str]], field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant", field, f"'{field}' has no assistant turn to learn from")


# --------------------------------------------------------------------------- converters


def _chat(obj: dict) -> Example:
    if "messages" not in obj:
        raise RowError("missing_key", "messages", "missing required key 'messages'")
    messages = _messages(obj["messages"], "messages", tools=True)
    _need_assistant(messages, "messages")
    tools = obj.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise RowError("wrong_type", "tools", "'tools' must be a list of tool schemas (objects)")
    return Example("sft", messages=messages, tools=tools or None)


def _sharegpt(obj: dict) -> Example:
    if "conversations" not in obj:
        raise RowError("missing_key", "conversations", "missing required key 'conversations'")
    messages = _messages(obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES)
    _need_assistant(messages, "conversations")
    return Example("sft", messages=messages)


def _alpaca(obj: dict) -> Example:
    instruction = _text(obj, "instruction")
    extra = _text(obj, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = _text(obj, "output")
    return Example(
        "sft",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}],
    )


def _prompt_completion(obj: dict) -> Example:
    # A chat model learns the completion as the answer to the prompt: one user/assistant turn.
    prompt = _text(obj, "prompt")
    completion = _text(obj, "completion")
    return Example(
        "sft",
        messages=[
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ],
    )


def _plain(obj: dict) -> Example:
    return Example("sft", text=_text(obj, "text"))


def _answer(value: Any, field: str) -> str:
    """A preference answer: a string or a list of messages ending in an assistant turn."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_content", field, f"'{field}' is empty")
        return value
    messages = _messages(value, field)
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant", field, f"'{field}' must end with an assistant turn")
    return messages[-1]["content"]


def _preference(obj: dict) -> Example:
    if "input" in obj or "preferred_output" in obj:  # OpenAI's preference format
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in obj:
                raise RowError("missing_key", key, f"missing required key '{key}'")
        if not isinstance(obj["input"], dict):
            raise RowError("wrong_type", "input", "'input' must be an object with 'messages'")
        if "messages" not in obj["input"]:
            raise RowError("missing_key", "input.messages", "missing 'input.messages'")
        prompt = _messages(obj["input"]["messages"], "input.messages")
        chosen = _answer(obj["preferred_output"], "preferred_output")
        rejected = _answer(obj["non_preferred_output"], "non_preferred_output")
    else:
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise RowError("missing_key", key, f"missing required key '{key}'")
        p = obj["prompt"]
        prompt = (
            [{"role": "user", "content": _text(obj, "prompt")}]
            if not isinstance(p, list)
            else _messages(p, "prompt")
        )
        chosen = _answer(obj["chosen"], "chosen")
        rejected = _answer(obj["rejected"], "rejected")
    return Example("preference", prompt=prompt, chosen=chosen, rejected=rejected)


_CONVERT: dict[str, Callable[[dict], Example]] = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _plain,
    "preference": _preference,
}
