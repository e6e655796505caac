"""Row formats: detect them, validate one row, and turn it into rayft's one internal shape.

Every format becomes one of four kinds of example: SFT (`messages`: list of {role, content};
plain text rows carry `text` instead), preference (`prompt` messages, `chosen`, `rejected`),
prompt (reinforcement rows: `prompt` messages ending with the user turn, and the `item` the
grader reads) or unpaired (KTO rows: `prompt` messages, one `completion`, a boolean `label`).
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

FORMATS = ("chat", "alpaca", "sharegpt", "prompt_completion", "text", "preference",
           "reinforcement", "kto")  # fmt: skip
KIND_OF = {f: "sft" for f in FORMATS} | {
    "preference": "preference",
    "reinforcement": "prompt",
    "kto": "unpaired",
}
# Reinforcement prompts: OpenAI's RFT rows may give the instructions as a `developer` turn, its
# newer name for the system prompt; open models' chat templates know only `system`.
PROMPT_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
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

    kind: str  # sft | preference | prompt | unpaired
    messages: list[dict[str, str]] | None = None  # sft chat rows
    text: str | None = None  # sft plain-text rows
    tools: list[dict[str, Any]] | None = None  # chat rows: the tool schemas offered
    parallel_tool_calls: bool | None = None  # chat rows: False when the row says so, else None
    prompt: list[dict[str, str]] | None = None  # preference, prompt and unpaired rows
    prompt_field: str = "prompt"  # where the row gave the prompt, for errors
    chosen: str | None = None
    rejected: str | None = None
    item: dict[str, Any] | None = None  # prompt rows: the row's other keys, for the grader
    completion: str | None = None  # unpaired rows
    label: bool | None = None  # unpaired rows: whether the completion is a desirable one


def detect(obj: Any, objective: str = "auto") -> str | None:
    """The format a parsed row looks like, or None. For `training.objective` grpo, chat rows
    and rows with a prompt but no answer are reinforcement prompts."""
    if not isinstance(obj, dict):
        return None
    keys = set(obj)
    grpo = objective == "grpo"
    if "messages" in keys:
        return "reinforcement" if grpo else "chat"
    if "conversations" in keys:
        return "sharegpt"
    if {"chosen", "rejected"} <= keys or {"preferred_output", "non_preferred_output"} <= keys:
        return "preference"
    if "instruction" in keys and "output" in keys:
        return "alpaca"
    if {"prompt", "completion", "label"} <= keys:
        return "kto"
    if {"prompt", "completion"} <= keys:
        return "prompt_completion"
    if grpo and "prompt" in keys and not keys & {"completion", "chosen"}:
        return "reinforcement"
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


def _answer(value: Any, field: str, openai: str = "preference") -> str:
    """A preference or KTO answer: a string, or a list holding one assistant message (OpenAI's
    preference format trains one-turn answers, and TRL's trainers take one answer)."""
    if isinstance(value, str):
        if not value.strip():
            raise RowError("empty_content", field, f"'{field}' is empty")
        return value
    messages = fields.messages(value, field, openai=openai)
    if messages[-1]["role"] != "assistant":
        raise RowError("no_assistant", field, f"'{field}' must end with an assistant turn")
    if len(messages) > 1:
        raise RowError(
            "unsupported",
            field,
            f"'{field}' holds {len(messages)} messages; a {openai} row takes one assistant "
            "answer: move the turns before it into the prompt",
        )
    return messages[-1]["content"]


def _prompt(obj: dict, openai: str) -> list[dict[str, Any]]:
    """`prompt` as messages: a string is one user turn."""
    if not isinstance(obj.get("prompt"), list):
        return [{"role": "user", "content": fields.text(obj, "prompt")}]
    roles = PROMPT_ROLES if openai == "reinforcement" else None
    return fields.messages(obj["prompt"], "prompt", roles=roles, openai=openai)


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
        prompt = _prompt(obj, "preference")
        chosen = _answer(obj["chosen"], "chosen")
        rejected = _answer(obj["rejected"], "rejected")
    return Example("preference", prompt=prompt, chosen=chosen, rejected=rejected)


def _reinforcement(obj: dict) -> Example:
    # OpenAI's reinforcement fine-tuning rows: `messages`, the rest for the grader; TRL's
    # prompt-only rows: `prompt` (text or messages), the rest for the reward functions.
    if obj.get("messages") is not None or obj.get("prompt") is None:
        if obj.get("messages") is None:
            raise RowError(
                "missing_key", "messages", "missing required key 'messages' (or TRL's 'prompt')"
            )
        if obj.get("tools"):
            raise RowError(
                "unsupported",
                "tools",
                "'tools': rayft does not prepare reinforcement prompts with tool schemas yet; "
                "leave 'tools' out of these rows",
            )
        field, rest = "messages", ("messages", "tools")
        prompt = fields.messages(obj[field], field, roles=PROMPT_ROLES, openai="reinforcement")
    else:
        field, rest = "prompt", ("prompt",)
        prompt = _prompt(obj, "reinforcement")
    last = len(prompt) - 1
    if prompt[last]["role"] != "user":
        why = (
            "the model writes the answer while it trains, and the grader finds a reference in "
            "the row's other keys: move the answer into one, e.g. 'reference_answer'"
            if prompt[last]["role"] == "assistant"
            else "the turn the model answers"
        )
        raise RowError(
            "not_user_last",
            f"{field}[{last}].role",
            f"'{field}[{last}].role' is {obj[field][last]['role']}, but a reinforcement prompt "
            f"ends with a user turn ({why}); assistant turns before it are context",
        )
    # A key set to null counts as absent, as elsewhere: Parquet gives every row every key.
    item = {k: v for k, v in obj.items() if k not in rest and v is not None}
    return Example("prompt", prompt=prompt, prompt_field=field, item=item)


def _kto(obj: dict) -> Example:
    for key in ("prompt", "completion", "label"):
        if obj.get(key) is None:
            raise RowError("missing_key", key, f"missing required key '{key}'")
    if not isinstance(obj["label"], bool):
        raise RowError(
            "wrong_type",
            "label",
            "'label' must be true (a desirable completion) or false (an undesirable one), "
            f"got {json.dumps(obj['label'])}",
        )
    prompt = _prompt(obj, "kto")
    completion = _answer(obj["completion"], "completion", "kto")
    return Example("unpaired", prompt=prompt, completion=completion, label=obj["label"])


_CONVERT: dict[str, Callable[[dict], Example]] = {
    "chat": _chat,
    "sharegpt": _sharegpt,
    "alpaca": _alpaca,
    "prompt_completion": _prompt_completion,
    "text": _plain,
    "preference": _preference,
    "reinforcement": _reinforcement,
    "kto": _kto,
}
