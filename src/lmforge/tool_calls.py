"""The tool-call format: one spec that the chat template renders (so SFT trains on it and the server
prompts with it), that the server parses replies with, and that the grammar constraining a call is
built from. Because all three read the constants and functions below, the parser cannot disagree with
what the model was taught, nor the constraint with the parser.

The format (Hermes/Qwen-style, written with ordinary text, so it needs no new special tokens and
leaves the tokenizer and every pipeline output unchanged):

* the tools are listed in the system turn, as JSON between ``<tools>`` and ``</tools>``;
* an assistant calls a function with ``<tool_call>{"name":"f","arguments":{...}}</tool_call>``
  (compact JSON, ``name`` first), several calls in a row for parallel calls;
* a tool's result comes back as a user turn ``<tool_response>...</tool_response>``.

:func:`template_messages` turns OpenAI-shaped messages (``role: "tool"``, assistant ``tool_calls``,
``content: null``) into the plain system/user/assistant turns the tokenizer renders;
:func:`parse_calls` reads calls back out of a reply; :func:`call_grammar` is the Lark grammar (with
embedded JSON schemas, :mod:`lmforge.generation.grammar`) that makes a reply a well-formed call of
one of the offered functions, its arguments valid under the function's parameter schema.

Core module: the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
RESULT_OPEN, RESULT_CLOSE = "<tool_response>", "</tool_response>"
TOOLS_OPEN, TOOLS_CLOSE = "<tools>", "</tools>"
TOOLS_PROMPT = (
    "You may call one or more of these functions. To call one, reply with "
    + CALL_OPEN
    + '{"name":<function name>,"arguments":<arguments as a JSON object>}'
    + CALL_CLOSE
    + ".\n"
)
# A reply that is not a call may not start with "<" under tool_choice "auto": the grammar then tells a
# call from text at the first character.
PLAIN_TEXT = r"/[^<](.|\n)*/"
# JSON as the template writes it: no optional whitespace (the grammar engine's x-guidance option).
COMPACT = {"whitespace_flexible": False}


class ToolFormatError(ValueError):
    """A message or tool definition that does not fit the format; the message names the field."""


@dataclass(frozen=True)
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text."""

    name: str
    arguments: str


def _function(tool: Any, where: str) -> dict:
    """The ``function`` part of an OpenAI tool definition ``{"type": "function", "function": {...}}``."""
    fn = tool.get("function") if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
        raise ToolFormatError(f"{where}: a tool is {{'type': 'function', 'function': {{'name': ...}}}}")
    return fn


def render_call(name: str, arguments: Any) -> str:
    """One call as the assistant writes it; ``arguments`` a dict or its JSON text."""
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    body = json.dumps({"name": name, "arguments": args}, separators=(",", ":"), ensure_ascii=False)
    return f"{CALL_OPEN}{body}{CALL_CLOSE}"


def tools_block(tools: Sequence[Any]) -> str:
    """The system-turn text listing the tools (their ``function`` definitions, one JSON per line)."""
    lines = [
        json.dumps(_function(t, f"tools[{i}]"), separators=(",", ":"), ensure_ascii=False)
        for i, t in enumerate(tools)
    ]
    return TOOLS_PROMPT + TOOLS_OPEN + "\n" + "\n".join(lines) + "\n" + TOOLS_CLOSE


def template_messages(messages: Sequence[dict], tools: Sequence[Any] | None = None) -> list[dict]:
    """OpenAI-shaped messages (and offered tools) as the plain turns the chat template renders.

    Messages without tools pass through unchanged (same ids as before this format existed)."""
    out: list[dict] = []
    for i, msg in enumerate(messages):
        role, content = msg.get("role"), msg.get("content")
        calls = msg.get("tool_calls") or []
        if role == "tool":
            out.append({"role": "user", "content": f"{RESULT_OPEN}{content or ''}{RESULT_CLOSE}"})
            continue
        if calls:
            if role != "assistant":
                raise ToolFormatError(f"messages[{i}].tool_calls: only an assistant message calls tools")
            text = content or ""
            for j, call in enumerate(calls):
                fn = _function(call, f"messages[{i}].tool_calls[{j}]")
                try:
                    text += render_call(fn["name"], fn.get("arguments") or {})
                except json.JSONDecodeError as exc:
                    raise ToolFormatError(
                        f"messages[{i}].tool_calls[{j}].function.arguments is not JSON: {exc}"
                    ) from None
            out.append({"role": "assistant", "content": text})
            continue
        out.append({"role": role, "content": "" if content is None and role == "assistant" else content})
    if tools:
        block = tools_block(tools)
        if out and out[0].get("role") == "system":
            out[0] = {"role": "system", "content": f"{out[0]['content']}\n\n{block}"}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def parse_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """A reply's text outside calls (None when empty) and its well-formed calls, in order. A call
    whose JSON does not parse stays in the text (nothing is dropped silently)."""
    calls: list[ToolCall] = []
    rest, at = [], 0
    while (start := text.find(CALL_OPEN, at)) >= 0:
        end = text.find(CALL_CLOSE, start)
        if end < 0:
            break
        body = text[start + len(CALL_OPEN) : end]
        try:
            obj = json.loads(body)
            name, args = obj["name"], obj.get("arguments", {})
            if not isinstance(name, str):
                raise TypeError
        except (ValueError, KeyError, TypeError):
            rest.append(text[at : end + len(CALL_CLOSE)])
        else:
            rest.append(text[at:start])
            calls.append(ToolCall(name, json.dumps(args, separators=(",", ":"), ensure_ascii=False)))
        at = end + len(CALL_CLOSE)
    rest.append(text[at:])
    content = "".join(rest).strip()
    return (content or None), calls


def call_grammar(tools: Sequence[Any], choice: str | dict = "auto", parallel: bool = True) -> str | None:
    """The Lark grammar of a reply under ``tool_choice``: ``"required"`` (one or more calls),
    ``{"type": "function", "function": {"name": f}}`` (a call of f), ``"auto"`` (calls, or text that
    does not start with ``<``); None for ``"none"`` (a free reply). ``parallel=False``: one call."""
    if choice == "none" or not tools:
        return None
    functions = [_function(t, f"tools[{i}]") for i, t in enumerate(tools)]
    if isinstance(choice, dict):
        wanted = _function(choice, "tool_choice")["name"]
        functions = [f for f in functions if f["name"] == wanted]
        if not functions:
            raise ToolFormatError(f"tool_choice: no tool named {wanted!r} among `tools`")
    elif choice not in ("auto", "required"):
        raise ToolFormatError(f"tool_choice must be none, auto, required or a named function, got {choice!r}")
    shapes = [
        {
            "type": "object",
            "properties": {
                "name": {"const": f["name"]},
                "arguments": f.get("parameters") or {"type": "object"},
            },
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for f in functions
    ]
    schema = shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
    schema = {**schema, "x-guidance": COMPACT}
    call = f"call: {json.dumps(CALL_OPEN)} %json {json.dumps(schema)} {json.dumps(CALL_CLOSE)}"
    calls = "call+" if parallel else "call"
    start = f"start: {calls}" if choice != "auto" else f"start: {calls} | plain\nplain: {PLAIN_TEXT}"
    return f"{start}\n{call}\n"
