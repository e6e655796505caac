"""How a chat becomes prompt tokens: one rule for the chat routes of `rayft serve` and for
`rayft eval`, so an evaluated answer is the answer the server gives to the same messages.

`normalize` turns OpenAI's message shapes (content parts, tool calls, tool results) into the
plain shape chat templates read; `chat_prompt` renders them, with the request's tools, by the
model's own template, or, where that template would drop the tools or the tool turns, in the
Hermes format (see `hermes_messages`), so tools are never silently left out of a prompt.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass

from jinja2 import TemplateError

from rayft.messages import join_text_parts
from rayft.serving.errors import BadRequest
from rayft.serving.tools import family_of, refuse

ROLES = ("system", "developer", "user", "assistant", "tool")
MEDIA = ("image_url", "input_audio", "file", "image", "audio", "video")

TOOLS_PREAMBLE = (  # Qwen 2.5's words, which Hermes-format models were trained on
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
    "{tools}\n</tools>\n\n"
    "For each function call, return a json object with function name and arguments within "
    "<tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>'
)


def normalize(messages) -> list[dict]:
    """The messages of a chat request as chat templates read them: `content` always a string
    (text parts joined by newlines, as vLLM joins them; null only where OpenAI allows it, on an
    assistant turn with tool calls); tool calls with their `arguments` parsed to an object (the
    templates write them with `tojson`); tool results with the `name` of the call they answer.
    Raises BadRequest naming the field, e.g. `messages.2.content.1.type` for an image part."""
    if not isinstance(messages, list) or not messages:
        raise refuse("messages", "must be a non-empty array of messages")
    out, call_names = [], {}
    for i, m in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(m, dict):
            raise refuse(where, "must be an object with a role and content")
        role = m.get("role")
        if role not in ROLES:
            raise refuse(f"{where}.role", f"must be one of {', '.join(ROLES)}")
        if m.get("function_call") is not None:
            raise refuse(f"{where}.function_call", "deprecated and not supported; use tool_calls")
        msg = {"role": role}
        if m.get("tool_calls") is not None:
            if role != "assistant":
                raise refuse(f"{where}.tool_calls", "only assistant messages carry tool calls")
            calls = _tool_calls(m["tool_calls"], f"{where}.tool_calls")
            call_names.update((c["id"], c["function"]["name"]) for c in calls)
            if calls:
                msg["tool_calls"] = calls
        if m.get("content") is None and "tool_calls" not in msg:
            why = "required (null only on an assistant message with tool_calls)"
            raise refuse(f"{where}.content", why)
        msg["content"] = _text(m.get("content"), role, f"{where}.content")
        if m.get("name") is not None:
            if not isinstance(m["name"], str):
                raise refuse(f"{where}.name", "must be a string")
            msg["name"] = m["name"]
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str):
                raise refuse(f"{where}.tool_call_id", "required: the id of the call it answers")
            if cid not in call_names:
                why = f"'{cid}' is not the id of a tool call in an earlier assistant message"
                raise refuse(f"{where}.tool_call_id", why)
            msg["tool_call_id"] = cid
            msg.setdefault("name", call_names[cid])
        out.append(msg)
    return out


def _text(content, role: str, where: str) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list) or not content:
        raise refuse(where, "must be a string or a non-empty array of content parts")
    texts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" and role == "assistant" else "text"
        if kind in MEDIA:
            why = f"'{kind}' parts are not supported: this server serves text models"
            raise refuse(f"{where}.{j}.type", why)
        if kind != key:
            raise refuse(f"{where}.{j}.type", f"must be '{key}' in a {role} message")
        if not isinstance(part.get(key), str):
            raise refuse(f"{where}.{j}.{key}", "must be a string")
        texts.append(part[key])
    return join_text_parts(texts)


def _tool_calls(calls, where: str) -> list[dict]:
    if not isinstance(calls, list):
        raise refuse(where, "must be an array of tool calls")
    out = []
    for j, call in enumerate(calls):
        at = f"{where}.{j}"
        if not isinstance(call, dict):
            raise refuse(at, "must be an object with id, type and function")
        if not isinstance(call.get("id"), str) or not call["id"]:
            raise refuse(f"{at}.id", "must be a non-empty string")
        if call.get("type", "function") != "function":
            raise refuse(f"{at}.type", 'must be "function"')
        fn = call.get("function")
        if not isinstance(fn, dict):
            raise refuse(f"{at}.function", "must be an object with name and arguments")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise refuse(f"{at}.function.name", "must be a non-empty string")
        try:
            args = json.loads(fn["arguments"]) if isinstance(fn.get("arguments"), str) else None
        except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
            args = None
        if not isinstance(args, dict):
            raise refuse(f"{at}.function.arguments", "must be a JSON string of an object")
        out.append({"id": call["id"], "type": "function", "function": {**fn, "arguments": args}})
    return out


# --------------------------------------------------------------------------- rendering


@dataclass(frozen=True)
class ChatPrompt:
    ids: list[int]
    text: str
    rendering: str
    """`template` where the model's chat template wrote everything; `hermes` where it would
    have dropped the tools or tool turns, so they were written as `hermes_messages` says."""
    family: str
    """How to read tool calls out of the answer (a key of tools.KNOWN_FAMILIES)."""


def chat_prompt(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> ChatPrompt:
    """`messages` (as `normalize` writes them) and `tools` (as `tools.check_tools` writes
    them) rendered by the model's chat template, ending with the assistant's generation prompt.

    Rendered to text, then tokenized without special tokens: the template writes the ones it
    wants itself (BOS, turn markers), and a tokenizer that also adds its own would start the
    prompt with a BOS the model never saw in training.

    Templates are free to ignore `tools` and many cannot write tool calls or tool results
    (SmolLM2's and tiny-llama's ChatML templates do neither): when the template's text lacks
    a tool's or a call's name, or a tool result, the chat is rewritten in the Hermes format and
    rendered again, rather than prompting without them.
    """
    messages = _roles_for(tokenizer, messages)
    tooled = bool(tools) or any("tool_calls" in m or m["role"] == "tool" for m in messages)
    text = _native(tokenizer, messages, tools) if tooled else _render(tokenizer, messages)
    rendering = "template"
    if text is None:
        text, rendering = _render(tokenizer, hermes_messages(messages, tools)), "hermes"
    family = "hermes" if rendering == "hermes" else family_of(tokenizer)
    for i, m in enumerate(messages):  # training reports this as a row error: the same rule
        if m["role"] != "tool" and m.get("name") and m["name"] not in text:
            raise refuse(
                f"messages.{i}.name",
                "this model's chat template does not render a message's name: remove it, or "
                "write the name into the content",
            )
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    return ChatPrompt(ids, text, rendering, family)


def chat_prompt_ids(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
    """The token ids of `chat_prompt`."""
    return chat_prompt(tokenizer, messages, tools).ids


def hermes_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """The chat rewritten as Qwen 2.5's template writes tools, for templates that cannot: the
    tools' JSON in a system preamble (after the system message's own text), each earlier call
    as a `<tool_call>` block in its assistant turn, and each run of tool results as
    `<tool_response>` blocks in one user turn."""
    out, after_tool = [], False
    for m in messages:
        if m["role"] == "tool":
            block = f"<tool_response>\n{m['content']}\n</tool_response>"
            if after_tool:
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block})
            after_tool = True
            continue
        after_tool = False
        blocks = [_call_block(c["function"]) for c in m.get("tool_calls", [])]
        m = {k: v for k, v in m.items() if k != "tool_calls"}
        if blocks:
            m["content"] = "\n".join(([m["content"]] if m["content"] else []) + blocks)
        out.append(m)
    if tools:
        listed = "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools)
        preamble = TOOLS_PREAMBLE.format(tools=listed)
        if out[0]["role"] == "system":
            out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{preamble}".lstrip()}
        else:
            out.insert(0, {"role": "system", "content": preamble})
    return out


def _call_block(fn: dict) -> str:
    call = {"name": fn["name"], "arguments": fn["arguments"]}
    return f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>"


def _roles_for(tokenizer, messages: list[dict]) -> list[dict]:
    """`developer` becomes `system`, as OpenAI does for models without a developer role,
    unless the template names that role itself."""
    template = tokenizer.chat_template or ""
    if "developer" in (template if isinstance(template, str) else "".join(template.values())):
        return messages
    return [{**m, "role": "system"} if m["role"] == "developer" else m for m in messages]


def _render(tokenizer, messages: list[dict], tools: list[dict] | None = None) -> str:
    try:
        return tokenizer.apply_chat_template(
            messages, tools=tools, add_generation_prompt=True, tokenize=False
        )
    except TemplateError as e:  # the template's own raise_exception, e.g. roles out of order
        raise BadRequest(
            f"messages: the model's chat template refused them: {e}", "messages", "invalid_value"
        ) from None


def _native(tokenizer, messages: list[dict], tools: list[dict] | None) -> str | None:
    """The template's own rendering of a chat with tools or tool turns; None when it fails or
    leaves any of them out. Left out = a name that appears no more often than when rendered
    with neither tools nor calls, or a tool result missing from the text."""
    try:
        text = _render(tokenizer, messages, tools)
    except Exception:  # whatever breaks the template here, the Hermes rewrite does not use
        return None
    try:
        bare = _render(
            tokenizer, [{k: v for k, v in m.items() if k != "tool_calls"} for m in messages]
        )
    except Exception:  # e.g. a template that refuses a tool turn without the call before it
        bare = ""
    want = Counter(t["function"]["name"] for t in tools or [])
    want.update(c["function"]["name"] for m in messages for c in m.get("tool_calls", []))
    if any(text.count(name) - bare.count(name) < n for name, n in want.items()):
        return None
    if any(m["content"] not in text for m in messages if m["role"] == "tool"):
        return None
    return text
