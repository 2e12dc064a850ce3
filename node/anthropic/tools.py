"""Tool calls in each model family's own convention: how the tool list, a call and a result are
written into the prompt, and how a call is read back out of the model's reply.

    Gemma 3   a fenced block, then nothing:   ```tool_code\\n{"name": ..., "input": {...}}\\n```
              (a Python call `name(a=1)` in the block is read too); results come back fenced as
              ```tool_output
    Llama 3   `<|python_tag|>{"name": ..., "parameters": {...}}`, or a reply that is only that JSON

Calls in the history are written back exactly as the model is asked to write them, so a resent
conversation renders the tokens the model generated and its cached prefix keeps serving it.
"""

from __future__ import annotations

import ast
import json
import re
import secrets
from dataclasses import dataclass

from node.anthropic.request import ToolCall, ToolResult, ToolSpec

_DECODER = json.JSONDecoder()


@dataclass(frozen=True)
class Parsed:
    text: str
    calls: tuple[ToolCall, ...]


def tool_use_id() -> str:
    return "toolu_" + secrets.token_hex(12)


def describe_tools(tools: tuple[ToolSpec, ...]) -> str:
    sections = []
    for tool in tools:
        lines = [f"## {tool.name}"]
        if tool.description:
            lines.append(tool.description)
        if tool.input_schema:
            lines.append("Input schema: " + json.dumps(tool.input_schema, sort_keys=True))
        sections.append("\n".join(lines))
    return "\n\n".join(sections)


def _call(name: object, arguments: object) -> ToolCall | None:
    if not isinstance(name, str) or not name or not isinstance(arguments, dict | None):
        return None
    return ToolCall(tool_use_id(), name, arguments or {})


def _json_call(data: object) -> ToolCall | None:
    if not isinstance(data, dict):
        return None
    arguments = next((data[k] for k in ("input", "parameters", "arguments") if k in data), {})
    return _call(data.get("name"), arguments)


def _python_call(source: str) -> ToolCall | None:
    """`name(a=1, b="x")`, Gemma's own tool_code style, with literal keyword arguments."""
    try:
        node = ast.parse(source.strip(), mode="eval").body
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Name) or node.args:
            return None
        return _call(node.func.id, {k.arg: ast.literal_eval(k.value) for k in node.keywords})
    except (SyntaxError, ValueError):
        return None


class ToolConvention:
    """How one model family writes tool calls and reads results; subclasses parse the calls.

    The templates are the family's own convention, so a conversation resent with its tool turns
    renders to the same tokens (and hits the cache)."""

    family: str
    openers: tuple[str, ...]
    how_to_call: str  # the instruction, with the call's shape
    call_open: str
    call_close: str
    arguments_key: str
    result_template: str  # {status} and {text}

    def instructions(self, tools: tuple[ToolSpec, ...]) -> str:
        return f"# Tools\n\n{self.how_to_call}\n\n" + describe_tools(tools)

    def call_text(self, call: ToolCall) -> str:
        body = json.dumps({"name": call.name, self.arguments_key: call.input})
        return self.call_open + body + self.call_close

    def result_text(self, result: ToolResult) -> str:
        status = " (error)" if result.is_error else ""
        return self.result_template.format(status=status, text=result.text)


class GemmaTools(ToolConvention):
    family = "gemma"
    openers = ("```tool_code",)
    how_to_call = (
        "To call a tool, reply with one block\n"
        '```tool_code\n{"name": "<tool name>", "input": {<arguments>}}\n```\n'
        "and stop; its result comes back in a ```tool_output block."
    )
    call_open, call_close, arguments_key = "```tool_code\n", "\n```", "input"
    result_template = "```tool_output{status}\n{text}\n```"
    _BLOCK = re.compile(r"```tool_code[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)

    def complete(self, text: str) -> bool:
        return self._BLOCK.search(text) is not None

    def parse(self, text: str) -> Parsed:
        calls, first = [], None
        for match in self._BLOCK.finditer(text):
            body = match.group(1).strip()
            call = _python_call(body) if not body.startswith("{") else _json_call(_loads(body))
            if call is not None:
                calls.append(call)
                first = match.start() if first is None else first
        return Parsed(text if first is None else text[:first].rstrip(), tuple(calls))


class LlamaTools(ToolConvention):
    family = "llama"
    openers = ("<|python_tag|>",)
    TAG = "<|python_tag|>"
    how_to_call = (
        "To call a tool, reply with only\n"
        '<|python_tag|>{"name": "<tool name>", "parameters": {<arguments>}}\n'
        "Its result comes back as tool output."
    )
    call_open, call_close, arguments_key = TAG, "", "parameters"
    result_template = "Tool output{status}:\n{text}"

    def complete(self, text: str) -> bool:
        return bool(self.parse(text).calls)

    def parse(self, text: str) -> Parsed:
        start = text.find(self.TAG)
        body, before = (text[start + len(self.TAG) :], text[:start]) if start >= 0 else (text, "")
        if start < 0 and not text.lstrip().startswith("{"):
            return Parsed(text, ())
        calls, rest = [], body.lstrip()
        while rest.startswith("{"):
            try:
                data, end = _DECODER.raw_decode(rest)
            except ValueError:
                break
            call = _json_call(data)
            if call is None:
                break
            calls.append(call)
            rest = rest[end:].lstrip().lstrip(";").lstrip()
        return Parsed(before.rstrip() if calls else text, tuple(calls))


def _loads(text: str) -> object:
    try:
        return json.loads(text)
    except ValueError:
        return None


ToolFormat = GemmaTools | LlamaTools


def tool_format(engine) -> ToolFormat:
    """The convention of the engine's model family: Llama 3's when its vocabulary has the tag."""
    tokenizer = getattr(engine, "tokenizer", None)
    token_to_id = getattr(tokenizer, "token_to_id", None)
    if token_to_id is not None and token_to_id(LlamaTools.TAG) is not None:
        return LlamaTools()
    return GemmaTools()


class CallWatcher:
    """Splits a streamed reply into text safe to send now and a held-back tail that may open a tool
    call; says when a call is complete, so generation can stop there."""

    def __init__(self, tools: ToolFormat, enabled: bool) -> None:
        self.tools, self.enabled = tools, enabled
        self.text, self.sent = "", 0

    def feed(self, delta: str) -> str:
        self.text += delta
        if not self.enabled:
            return self._release(len(self.text))
        return self._release(self._safe_end())

    def complete(self) -> bool:
        return self.enabled and self.tools.complete(self.text)

    def _safe_end(self) -> int:
        if isinstance(self.tools, LlamaTools) and self.text.lstrip().startswith("{"):
            return self.sent  # a reply that may be nothing but a call
        cut = len(self.text)
        for opener in self.tools.openers:
            found = self.text.find(opener)
            if found >= 0:
                cut = min(cut, found)
                continue
            for n in range(min(len(opener) - 1, len(self.text)), 0, -1):
                if self.text.endswith(opener[:n]):
                    cut = min(cut, len(self.text) - n)
                    break
        return max(cut, self.sent)

    def _release(self, end: int) -> str:
        out, self.sent = self.text[self.sent : end], max(end, self.sent)
        return out
