"""One row's fields: text, message lists with OpenAI's message keys, tool calls.

Each check raises a `RowError` naming the field (`messages[3].weight`), so the pipeline can
report file, line and field. A key set to null counts as absent: Parquet files give every
message every key (a user turn's `tool_call_id` is null there).
"""

from __future__ import annotations

import json
from typing import Any

from rayft.messages import join_text_parts

ROLES = ("system", "user", "assistant")
# OpenAI chat rows may also call tools: assistant turns with `tool_calls`, `tool` turns with
# the results. Other formats have no tool turns.
CHAT_ROLES = (*ROLES, "tool")
# Keys of OpenAI's messages that rayft does not train with, and what to write instead.
NOT_TRAINED = {
    "function_call": "it is OpenAI's legacy function calling: write the call as 'tool_calls'",
    "refusal": "rayft learns 'content' only: put the refusal text there",
    "audio": "rayft trains on text only",
}
# OpenAI's keys that only one role carries.
OWNER = {"tool_calls": "assistant", "tool_call_id": "tool", "weight": "assistant"}


class RowError(ValueError):
    """One bad row: `kind` is the error class (counted), `field` where it is."""

    def __init__(self, kind: str, field: str, reason: str):
        super().__init__(reason)
        self.kind, self.field, self.reason = kind, field, reason


def text(obj: dict, key: str, field: str | None = None, required: bool = True) -> str:
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
        value = join_text_parts([p["text"] for p in value])  # as the server joins them
    if not isinstance(value, str):
        raise RowError(
            "wrong_type", field, f"'{field}' must be a string, got {type(value).__name__}"
        )
    if required and not value.strip():
        raise RowError("empty_content", field, f"'{field}' is empty")
    return value


def messages(
    value: Any,
    field: str,
    role_key: str = "role",
    content_key: str = "content",
    roles: dict[str, str] | None = None,
    openai: str | None = None,
) -> list[dict[str, Any]]:
    """{role, content} per message. `openai` reads OpenAI's message keys: "chat" keeps
    `name`, `weight` 0 and the tool turns (an assistant turn with `tool_calls`, its content
    possibly null; `tool` turns with content and tool_call_id); any other value (the row's
    format: "preference", "reinforcement", "kto") reports them, as those rows reach the
    trainer as role and content only."""
    if not isinstance(value, list):
        raise RowError("wrong_type", field, f"'{field}' must be a list, got {type(value).__name__}")
    if not value:
        raise RowError("empty_content", field, f"'{field}' is an empty list")
    chat = openai == "chat"
    out = []
    for where, m in objects(value, field):
        if role_key not in m:
            raise RowError("missing_key", f"{where}.{role_key}", f"missing '{where}.{role_key}'")
        raw_role = m[role_key]
        known_roles = roles or {r: r for r in (CHAT_ROLES if chat else ROLES)}
        role = known_roles.get(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            known = ", ".join(sorted(known_roles))
            legacy = (
                "; role 'function' is OpenAI's legacy function calling: write the result as a "
                "'tool' message with 'tool_call_id'"
                if openai and raw_role == "function"
                else ""
            )
            raise RowError(
                "unknown_role",
                f"{where}.{role_key}",
                f"unknown role {raw_role!r} (known: {known}){legacy}",
            )
        extras = _openai_keys(m, where, role, openai) if openai else {}
        if "tool_calls" in extras:
            message: dict[str, Any] = {
                "role": role,
                "content": text(m, content_key, f"{where}.{content_key}", required=False),
                "tool_calls": _tool_calls(extras.pop("tool_calls"), f"{where}.tool_calls"),
            }
        else:
            message = {"role": role, "content": text(m, content_key, f"{where}.{content_key}")}
        if role == "tool":
            message["tool_call_id"] = text(m, "tool_call_id", f"{where}.tool_call_id")
        out.append(message | extras)
    return out


def _openai_keys(m: dict, where: str, role: str, fmt: str) -> dict[str, Any]:
    """What rayft keeps of an OpenAI message's keys beyond role and content (chat rows:
    `tool_calls`, `name`, `weight` 0), or a RowError for a key it cannot train with; `fmt`
    is the row's format."""
    given = {k: v for k, v in m.items() if v is not None}
    chat = fmt == "chat"
    for key, instead in NOT_TRAINED.items():
        if key in given:
            raise RowError("unsupported", f"{where}.{key}", f"'{where}.{key}': {instead}")
    if not chat:
        if "weight" in given:
            raise RowError(
                "bad_weight",
                f"{where}.weight",
                f"'{where}.weight' has no meaning in a {fmt} row: its prompt is never "
                "learned, and an answer always whole; leave 'weight' out",
            )
        for key in ("name", "tool_calls", "tool_call_id"):
            if key in given:
                raise RowError(
                    "unsupported",
                    f"{where}.{key}",
                    f"'{where}.{key}': {fmt} rows reach the trainer as role and content "
                    f"only, so '{key}' would be lost; leave it out",
                )
        return {}
    for key, owner in OWNER.items():
        if key in given and role != owner:
            kind = "bad_weight" if key == "weight" else "unsupported"
            raise RowError(
                kind,
                f"{where}.{key}",
                f"'{where}.{key}': as in OpenAI's format, only {owner} messages carry "
                f"'{key}', not {role} ones",
            )
    extras: dict[str, Any] = {}
    if "tool_calls" in given:
        extras["tool_calls"] = given["tool_calls"]
    if "name" in given:
        name = given["name"]
        if not isinstance(name, str) or not name.strip():
            raise RowError(
                "wrong_type", f"{where}.name", f"'{where}.name' must be a non-empty string"
            )
        extras["name"] = name
    if "weight" in given:
        weight = given["weight"]
        # Only the integers 0 and 1, as OpenAI allows: true, 1.0 and "1" are not weights here
        # (Python would take True == 1), and any other number would be a loss weight rayft
        # does not apply.
        if type(weight) is not int or weight not in (0, 1):
            raise RowError(
                "bad_weight",
                f"{where}.weight",
                f"'{where}.weight' must be 0 (do not learn this answer) or 1 (learn it, the "
                f"default), got {json.dumps(weight)}",
            )
        if weight == 0:
            extras["weight"] = 0
    return extras


def objects(value: list, field: str):
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
    for where, call in objects(value, field):
        if call.get("type") != "function":
            raise RowError(
                "wrong_type",
                f"{where}.type",
                f"'{where}.type' must be 'function', got {call.get('type')!r}",
            )
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise RowError("missing_key", f"{where}.function", f"missing object '{where}.function'")
        name = text(fn, "name", f"{where}.function.name")
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
                "id": text(call, "id", f"{where}.id"),
                "type": "function",
                "function": {"name": name, "arguments": arguments},
            }
        )
    return out


def parallel_tool_calls(obj: dict, field: str) -> bool | None:
    """False where the row turns parallel tool calls off; None for true or absent (what every
    chat template does anyway: nothing stops several calls in one turn)."""
    value = obj.get("parallel_tool_calls")
    if value is not None and not isinstance(value, bool):
        raise RowError("wrong_type", field, f"'{field}' must be true or false, got {value!r}")
    return False if value is False else None
