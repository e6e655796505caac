"""OpenAI tool calling on models that only write text: check a request's `tools` and
`tool_choice`, read tool calls out of an answer (whole or streamed), and the JSON schema that a
forced call (`tool_choice` "required" or a named function) must follow.

How tools get into the prompt is `rayft.serving.prompts`; which of the KNOWN_FAMILIES to read
an answer with is the `family` of the prompt it rendered (`family_of` for the model's own
template, "hermes" where it had to write the tools itself).
"""

from __future__ import annotations

import json
import re
import uuid

from jsonschema import Draft202012Validator, SchemaError

from rayft.serving.errors import BadRequest

KNOWN_FAMILIES = {
    "hermes": '<tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks, one per call '
    "(Qwen 2.5, Hermes) or a list of calls each (SmolLM2); how templates that ignore tools are "
    "prompted",
    "llama3_json": 'the whole answer is {"name": ..., "parameters": {...}}, several joined by '
    "';', optionally after <|python_tag|>, as Llama 3.1-3.3 write them",
}

OPEN, CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
NO_PARAMETERS = {"type": "object", "properties": {}}
TOOL_KEYS = {"type", "function"}
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
SEPARATOR = re.compile(r"\s*(;\s*)?")  # between llama3_json calls


def family_of(tokenizer) -> str:
    """How the model's own chat template asks for tool calls: Llama 3.1-style templates mention
    `<|python_tag|>` or the `ipython` role; anything else is read as Hermes, the most common
    format (Qwen 2.5, Hermes, many fine-tunes)."""
    template = tokenizer.chat_template or ""
    if isinstance(template, dict):  # named templates ("default", "tool_use", ...)
        template = "\n".join(template.values())
    return "llama3_json" if PYTHON_TAG in template or "ipython" in template else "hermes"


# --------------------------------------------------------------------------- the request


def refuse(param: str, why: str) -> BadRequest:
    """The 400 for a malformed field, named as pydantic names it (`messages.2.content.1.type`)."""
    return BadRequest(f"{param}: {why}", param, "invalid_value")


def check_tools(tools, tool_choice=None) -> list[dict] | None:
    """`tools` as the templates and the schema below want them (OpenAI's shape, `parameters`
    always present), or None when the request offers none. Raises BadRequest naming the field:
    a name OpenAI would refuse, a `parameters` that is not a JSON schema, a `tool_choice`
    without tools or naming a function that is not offered."""
    if tools is None:
        if tool_choice is not None:
            raise refuse("tool_choice", "only allowed when tools are given")
        return None
    if not isinstance(tools, list) or not tools:
        raise refuse("tools", "must be a non-empty array of tools; leave it out to offer none")
    out, seen = [], set()
    for i, tool in enumerate(tools):
        where = f"tools.{i}"
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise refuse(f"{where}.type", 'must be "function"')
        fn = tool.get("function")
        if not isinstance(fn, dict):
            raise refuse(f"{where}.function", "must be an object")
        for key, known in ((where, TOOL_KEYS), (f"{where}.function", FUNCTION_KEYS)):
            extra = sorted(set(tool if key == where else fn) - known)
            if extra:  # a misspelt `paramters` would offer a function without parameters
                raise refuse(
                    f"{key}.{extra[0]}", f"unknown key (known: {', '.join(sorted(known))})"
                )
        strict = fn.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise refuse(f"{where}.function.strict", "must be true or false")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME.match(name):
            raise refuse(f"{where}.function.name", "must be 1-64 letters, digits, '_' or '-'")
        if name in seen:
            raise refuse(f"{where}.function.name", f"'{name}' is offered twice")
        seen.add(name)
        params = fn.get("parameters", NO_PARAMETERS)
        try:
            if not isinstance(params, dict):
                raise SchemaError("not an object")
            Draft202012Validator.check_schema(params)
        except SchemaError as e:
            why = f"not a valid JSON schema ({e.message})"
            raise refuse(f"{where}.function.parameters", why) from None
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise refuse(f"{where}.function.description", "must be a string")
        described = {"description": desc} if desc is not None else {}
        described |= {"strict": True} if strict else {}
        out.append(
            {"type": "function", "function": {"name": name, **described, "parameters": params}}
        )
    _check_choice(tool_choice, seen)
    return out


def _check_choice(choice, names: set[str]) -> None:
    if choice is None or choice in ("none", "auto", "required"):
        return
    if isinstance(choice, str):
        why = (
            'must be "none", "auto", "required" or {"type": "function", "function": {"name": ...}}'
        )
        raise refuse("tool_choice", why)
    if not isinstance(choice, dict) or choice.get("type") != "function":
        raise refuse("tool_choice.type", 'must be "function"')
    fn = choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not _offered(name, names):
        offered = ", ".join(sorted(names))
        raise refuse("tool_choice.function.name", f"{name!r} is not an offered tool ({offered})")


def _named(tool_choice) -> str | None:
    return tool_choice["function"]["name"] if isinstance(tool_choice, dict) else None


def _names(tools: list[dict] | None) -> dict[str, dict | None]:
    """Offered name -> its parameters schema when the function is `strict` (its calls must
    validate), else None."""
    return {
        t["function"]["name"]: t["function"]["parameters"] if t["function"].get("strict") else None
        for t in tools or []
    }


def _offered(name, names: dict) -> bool:
    return isinstance(name, str) and name in names  # a list or object as a name is no name


def _fits(name: str, args: dict, names: dict) -> bool:
    """A strict function's call counts only when its arguments validate (under "auto" nothing
    constrains them; an invalid one stays content)."""
    schema = names.get(name)
    return schema is None or Draft202012Validator(schema).is_valid(args)


def new_call(name: str, arguments: dict) -> dict:
    """A tool call as OpenAI answers it: `arguments` is a JSON string."""
    return {
        "id": f"call_{uuid.uuid4().hex[:24]}",
        "type": "function",
        "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)},
    }


# --------------------------------------------------------------------------- reading answers


def parse_tool_calls(text: str, family: str, tools: list[dict]) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer. A call counts only if its JSON parses and names
    an offered tool; anything else stays in the content, verbatim. Content is stripped; None
    when nothing is left."""
    names = _names(tools)
    if family == "llama3_json":
        calls = _llama3_calls(text, names)
        return (None, calls) if calls else (text.strip() or None, [])
    if family != "hermes":
        raise ValueError(f"unknown tool call family {family!r} (known: {sorted(KNOWN_FAMILIES)})")
    content, calls, pos = [], [], 0
    while (start := text.find(OPEN, pos)) >= 0:
        content.append(text[pos:start])
        end = text.find(CLOSE, start + len(OPEN))
        after = len(text) if end < 0 else end + len(CLOSE)  # an unclosed last block: to the end
        block = _hermes_calls(text[start + len(OPEN) : len(text) if end < 0 else end], names)
        calls += block
        if not block:
            content.append(text[start:after])
        pos = after
    content.append(text[pos:])
    return "".join(content).strip() or None, calls


def _hermes_calls(body: str, names: set[str]) -> list[dict]:
    """The calls of one block: an object, or a list of them as SmolLM2 was trained to write
    (`<tool_call>[{...}, {...}]</tool_call>`); all of them valid, or none."""
    try:
        objs = json.loads(body)
    except (ValueError, RecursionError):
        return []
    calls = [_hermes_call(obj, names) for obj in (objs if isinstance(objs, list) else [objs])]
    return calls if calls and all(calls) else []


def _hermes_call(obj, names: set[str]) -> dict | None:
    if not isinstance(obj, dict) or not _offered(obj.get("name"), names):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):  # some fine-tunes write the arguments as a JSON string
        try:
            args = json.loads(args)
        except (ValueError, RecursionError):
            return None
    ok = isinstance(args, dict) and _fits(obj["name"], args, names)
    return new_call(obj["name"], args) if ok else None


def _llama3_calls(text: str, names: set[str]) -> list[dict]:
    """All or nothing, as Llama 3.1 answers either with calls only or with text only."""
    rest = text.strip().removeprefix(PYTHON_TAG).lstrip()
    decoder, calls, pos = json.JSONDecoder(), [], 0
    while True:
        try:
            obj, pos = decoder.raw_decode(rest, pos)
        except (ValueError, RecursionError):
            return []
        if not isinstance(obj, dict) or not _offered(obj.get("name"), names):
            return []
        args = obj.get("parameters", obj.get("arguments"))
        if not isinstance(args, dict) or not _fits(obj["name"], args, names):
            return []
        calls.append(new_call(obj["name"], args))
        sep = SEPARATOR.match(rest, pos)
        if sep.end() == len(rest):  # a trailing ';' is fine
            return calls
        if not sep.group(1):
            return []
        pos = sep.end()


# --------------------------------------------------------------------------- forced calls


def forced_schema(tools: list[dict], tool_choice, parallel_tool_calls: bool = True) -> dict | None:
    """The JSON schema the answer must follow when `tool_choice` forces a call, for constrained
    decoding; None for "auto", "none" or no choice. "required": an array of
    `{"name": <an offered tool>, "arguments": <its parameters>}` (at most one item when
    parallel_tool_calls is false); a named function: that function's parameters only."""
    if isinstance(tool_choice, dict):
        name = _named(tool_choice)
        return next(t["function"]["parameters"] for t in tools if t["function"]["name"] == name)
    if tool_choice != "required":
        return None
    one_of_each = [
        {
            "type": "object",
            "properties": {
                "name": {"type": "string", "const": t["function"]["name"]},
                "arguments": t["function"]["parameters"],
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema = {"type": "array", "minItems": 1, "items": {"anyOf": one_of_each}}
    if not parallel_tool_calls:
        schema["maxItems"] = 1
    return schema


def forced_calls(text: str, tools: list[dict], tool_choice) -> list[dict]:
    """The tool calls of an answer written under `forced_schema`; [] when it does not follow
    it (cut short by max_tokens, or decoding was not constrained): answer it as content."""
    try:
        obj = json.loads(text)
    except (ValueError, RecursionError):
        return []
    name = _named(tool_choice)
    if name is not None:
        return [new_call(name, obj)] if isinstance(obj, dict) else []
    if tool_choice != "required" or not isinstance(obj, list) or not obj:
        return []
    names, calls = _names(tools), []
    for item in obj:
        if not isinstance(item, dict) or not _offered(item.get("name"), names):
            return []
        if not isinstance(item.get("arguments"), dict):
            return []
        calls.append(new_call(item["name"], item["arguments"]))
    return calls


def finish_reason(tool_choice, called: bool, engine_reason: str) -> str:
    """OpenAI's: "tool_calls" when the answer is calls, except under a named tool_choice
    (OpenAI answers "stop" there); the engine's reason otherwise ("length" stays)."""
    if called and engine_reason == "stop" and not isinstance(tool_choice, dict):
        return "tool_calls"
    return engine_reason


def split_answer(
    text: str, family: str, tools: list[dict] | None, tool_choice=None, parallel: bool = True
) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a whole answer to a request: forced calls read as
    `forced_calls`, "auto" as `parse_tool_calls`, no tools or "none" as plain content. Without
    `parallel` (parallel_tool_calls: false) only the first call is made."""
    if not tools or tool_choice == "none":
        return text, []
    if tool_choice == "required" or isinstance(tool_choice, dict):
        calls = forced_calls(text, tools, tool_choice)
        return (None, calls) if calls else (text, [])
    content, calls = parse_tool_calls(text, family, tools)
    return content, calls if parallel else calls[:1]
