"""Tool calls read out of an answer as it streams (`ToolStream`), in OpenAI's delta shapes.
Joined, the deltas are `tools.split_answer` of the whole text, however it was cut."""

from __future__ import annotations

from rayft.serving.tools import (
    CLOSE,
    KNOWN_FAMILIES,
    OPEN,
    PYTHON_TAG,
    _hermes_calls,
    _names,
    split_answer,
)


class ToolStream:
    """Reads tool calls out of an answer as it streams: `feed` each piece of text, `close` at
    the end; both return the deltas to send, as the `delta` of OpenAI's chat chunks
    (`{"content": ...}` or `{"tool_calls": [...]}`). Joined, they are `split_answer` of the
    whole text (ids aside), however the text was cut into pieces.

    Text that may still become a call is held back: a tail that could be the start of
    `<tool_call>` (hermes), the whole answer once it starts with `{` or `<|python_tag|>`
    (llama3_json, whose calls are all or nothing), everything under a forced `tool_choice`.
    A call's arguments come in one delta, once its block is complete: a block is only a call
    once its JSON parses, and a call already streamed cannot be taken back. `calls` lists the
    calls sent so far (for finish_reason "tool_calls").
    """

    def __init__(
        self, family: str, tools: list[dict] | None, tool_choice=None, parallel: bool = True
    ) -> None:
        self.parallel = parallel  # parallel_tool_calls: false makes only the first call
        if not tools or tool_choice == "none":
            self.mode = "plain"
        elif tool_choice == "required" or isinstance(tool_choice, dict):
            self.mode = "forced"
        elif family in KNOWN_FAMILIES:
            self.mode = family
        else:
            raise ValueError(f"unknown tool call family {family!r}")
        self.tools, self.tool_choice, self.names = tools, tool_choice, _names(tools)
        self.calls: list[dict] = []
        self._buf = ""
        self._in_call = False  # hermes: inside a <tool_call> block
        self._llama_calls: bool | None = None  # llama3_json: None until the answer's start says
        self._started = False  # some content was sent
        self._space = ""  # trailing whitespace held back: parsed content is stripped

    def feed(self, piece: str) -> list[dict]:
        out: list[dict] = []
        if self.mode == "plain":
            if piece:
                out.append({"content": piece})
            return out
        self._buf += piece
        if self.mode == "hermes":
            self._hermes(out)
        elif self.mode == "llama3_json" and self._llama_calls is not True:
            head = self._buf.lstrip()
            if self._llama_calls is None and head.startswith(("{", PYTHON_TAG)):
                self._llama_calls = True
            elif self._llama_calls is None and head and not PYTHON_TAG.startswith(head):
                self._llama_calls = False
            if self._llama_calls is False:
                self._content(self._buf, out)
                self._buf = ""
        return out

    def close(self) -> list[dict]:
        out: list[dict] = []
        text, self._buf = self._buf, ""
        if self.mode == "hermes":
            if self._in_call:
                self._block(text, OPEN + text, out)
            else:
                self._content(text, out)
        elif self.mode in ("llama3_json", "forced"):
            content, calls = split_answer(text, self.mode, self.tools, self.tool_choice)
            for call in calls:
                self._call(call, out)
            if content:
                self._content(content, out)
        return out

    def _hermes(self, out: list[dict]) -> None:
        while True:
            if not self._in_call:
                start = self._buf.find(OPEN)
                if start < 0:
                    keep = next(
                        (k for k in range(len(OPEN) - 1, 0, -1) if self._buf.endswith(OPEN[:k])), 0
                    )
                    self._content(self._buf[: len(self._buf) - keep], out)
                    self._buf = self._buf[len(self._buf) - keep :]
                    return
                self._content(self._buf[:start], out)
                self._buf, self._in_call = self._buf[start + len(OPEN) :], True
            end = self._buf.find(CLOSE)
            if end < 0:
                return
            body, self._buf, self._in_call = self._buf[:end], self._buf[end + len(CLOSE) :], False
            self._block(body, OPEN + body + CLOSE, out)

    def _block(self, body: str, written: str, out: list[dict]) -> None:
        calls = _hermes_calls(body, self.names)
        for call in calls:
            self._call(call, out)
        if not calls:
            self._content(written, out)

    def _content(self, text: str, out: list[dict]) -> None:
        if self.mode == "forced":  # a forced answer that is not a call: as written
            out.append({"content": text})
            return
        if not self._started:
            text = text.lstrip()
        text = self._space + text
        body = text.rstrip()
        self._space = text[len(body) :]
        if body:
            out.append({"content": body})
            self._started = True

    def _call(self, call: dict, out: list[dict]) -> None:
        if self.calls and not self.parallel:
            return
        i, fn = len(self.calls), call["function"]
        self.calls.append(call)
        head = {"name": fn["name"], "arguments": ""}
        out.append(
            {"tool_calls": [{"index": i, "id": call["id"], "type": "function", "function": head}]}
        )
        out.append({"tool_calls": [{"index": i, "function": {"arguments": fn["arguments"]}}]})
