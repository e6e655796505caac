"""Row formats: detect them, validate one row, and turn it into rayft's one internal shape.

Every format becomes either an SFT example (`messages`: list of {role, content}; plain text
rows carry `text` instead) or a preference example (`prompt` messages, `chosen`, `rejected`).
Validation follows OpenAI's fine-tuning data checks; each problem is a `RowError` naming the
field, so the pipeline can report file, line and field. Every key of OpenAI's chat, tools and
preference formats is either kept for training or reported (docs/contracts.md has the table);
a key set to null counts as absent, as Parquet files give every message every key.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from rayft.data import fields
from rayft.data.fields import RowError

FORMATS = ("chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference")
KIND_OF = {f: ("preference" if f == "preference" else "sft") for f in FORMATS}
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


@dataclass
class Example:
    """A valid row in rayft's internal shape (before cleaning)."""

    kind: str  # sft | preference
    messages: list[dict[str, str]] | None = None  # sft chat rows
    text: str | None = None  # sft plain-text rows
    tools: list[dict[str, Any]] | None = None  # chat rows: the tool schemas offered
    parallel_tool_calls: bool | None = None  # chat rows: False when the row says so, else None
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


def _need_assistant(messages: list[dict[str, str]], field: str) -> None:
    if not any(m["role"] == "assistant" for m in messages):
        raise RowError("no_assistant", field, f"'{field}' has no assistant turn to learn from")


# --------------------------------------------------------------------------- converters


def _chat(obj: dict) -> Example:
    if "messages" not in obj:
        raise RowError("missing_key", "messages", "missing required key 'messages'")
    if obj.get("functions"):
        raise RowError(
            "unsupported",
            "functions",
            "'functions' is OpenAI's legacy function calling: give the schemas as 'tools' "
            '([{"type": "function", "function": <schema>}]) and the calls as \'tool_calls\'',
        )
    messages = fields.messages(obj["messages"], "messages", openai="chat")
    _need_assistant(messages, "messages")
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise RowError(
            "no_assistant",
            "messages",
            "every assistant turn of 'messages' has weight 0: there is nothing to learn",
        )
    tools = obj.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise RowError("wrong_type", "tools", "'tools' must be a list of tool schemas (objects)")
    parallel = fields.parallel_tool_calls(obj, "parallel_tool_calls")
    if parallel is False:
        for i, m in enumerate(messages):
            if len(m.get("tool_calls", [])) > 1:
                raise RowError(
                    "conflicting_keys",
                    f"messages[{i}].tool_calls",
                    f"'messages[{i}]' makes {len(m['tool_calls'])} tool calls at once, but the "
                    "row sets 'parallel_tool_calls' to false",
                )
    return Example("sft", messages=messages, tools=tools or None, parallel_tool_calls=parallel)


def _sharegpt(obj: dict) -> Example:
    if "conversations" not in obj:
        raise RowError("missing_key", "conversations", "missing required key 'conversations'")
    messages = fields.messages(
        obj["conversations"], "conversations", "from", "value", SHAREGPT_ROLES
    )
    _need_assistant(messages, "conversations")
    return Example("sft", messages=messages)


def _alpaca(obj: dict) -> Example:
    instruction = fields.text(obj, "instruction")
    extra = fields.text(obj, "input", required=False)
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    output = fields.text(obj, "output")
    return Example(
        "sft",
        messages=[{"role": "user", "content": user}, {"role": "assistant", "content": output}],
    )


def _prompt_completion(obj: dict) -> Example:
    # A chat model learns the completion as the answer to the prompt: one user/assistant turn.
    prompt = fields.text(obj, "prompt")
    completion = fields.text(obj, "completion")
    return Example(
        "sft",
        messages=[
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": completion},
        ],
    )


def _plain(obj: dict) -> Example:
    return Example("sft", text=fields.text(obj, "text"))


def _answer(value: Any, field: str) -> str:
    """A preference answer: a string, or a list holding one assistant message (OpenAI's
    preference format trains one-turn answers)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_content", field, f"'{field}' is empty")
        return value
    messages = fields.messages(value, field, openai="preference")
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant", field, f"'{field}' must end with an assistant turn")
    if len(messages) > 1:
        raise RowError(
            "unsupported",
            field,
            f"'{field}' holds {len(messages)} messages; a preference row compares one "
            "assistant answer per side: move the turns before it into the prompt",
        )
    return messages[-1]["content"]


def _preference(obj: dict) -> Example:
    if "input" in obj or "preferred_output" in obj:  # OpenAI's preference format
        for key in ("input", "preferred_output", "non_preferred_output"):
            if key not in obj:
                raise RowError("missing_key", key, f"missing required key '{key}'")
        given = obj["input"]
        if not isinstance(given, dict):
            raise RowError("wrong_type", "input", "'input' must be an object with 'messages'")
        if "messages" not in given:
            raise RowError("missing_key", "input.messages", "missing 'input.messages'")
        for key in ("tools", "functions"):
            if given.get(key):
                raise RowError(
                    "unsupported",
                    f"input.{key}",
                    f"'input.{key}': preference rows reach the trainer as prompt, chosen and "
                    "rejected text, with no tool schemas; leave tool rows out of preference data",
                )
        # Accepted either way: with no tools nothing is called, in parallel or not.
        fields.parallel_tool_calls(given, "input.parallel_tool_calls")
        prompt = fields.messages(given["messages"], "input.messages", openai="preference")
        chosen = _answer(obj["preferred_output"], "preferred_output")
        rejected = _answer(obj["non_preferred_output"], "non_preferred_output")
    else:
        for key in ("prompt", "chosen", "rejected"):
            if key not in obj:
                raise RowError("missing_key", key, f"missing required key '{key}'")
        p = obj["prompt"]
        prompt = (
            [{"role": "user", "content": fields.text(obj, "prompt")}]
            if not isinstance(p, list)
            else fields.messages(p, "prompt", openai="preference")
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
