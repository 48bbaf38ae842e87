"""Structured outputs and tool calls on the OpenAI routes: request fields -> a grammar
(:class:`lmforge.generation.grammar.Constraint`) that the engine applies row by row, and replies ->
OpenAI's ``tool_calls`` shapes (whole, or as stream deltas). The tool-call format itself lives in
:mod:`lmforge.tool_calls`, shared with the chat template and SFT."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from lmforge.generation.grammar import Constraint
from lmforge.tool_calls import ToolFormatError, call_grammar, parse_calls
from services.backend import Backend
from services.errors import ApiError
from services.schemas import ChatCompletionRequest, CompletionRequest, StructuredOutputs


def refuse_unsupported(req: CompletionRequest | ChatCompletionRequest) -> None:
    """A field the server would otherwise ignore is a 400 that names it."""
    for name, instead in req.unsupported():
        raise ApiError(
            400, f"{name}: not supported by this server ({instead})", param=name, code="unsupported_parameter"
        )


def constraint_of(so: StructuredOutputs) -> tuple[Constraint, str]:
    """vLLM's ``structured_outputs`` as a constraint, and the field it came from."""
    if so.json_ is not None:
        return Constraint.json_schema(so.json_), "structured_outputs.json"
    if so.regex is not None:
        return Constraint.regex(so.regex), "structured_outputs.regex"
    if so.choice is not None:
        return Constraint.choice(so.choice), "structured_outputs.choice"
    return Constraint.lark(so.grammar or ""), "structured_outputs.grammar"


def _output_constraint(req: CompletionRequest | ChatCompletionRequest) -> tuple[Constraint | None, str]:
    """The constraint of ``structured_outputs`` or ``response_format`` and the field it came from."""
    so, rf = req.structured_outputs, req.response_format
    if so is not None and rf is not None and rf.type != "text":
        raise ApiError(
            400, "structured_outputs: give it or response_format, not both", param="structured_outputs"
        )
    if so is not None:
        return constraint_of(so)
    if rf is None or rf.type == "text":
        return None, "response_format"
    if rf.type == "json_object":
        return Constraint.json_object(), "response_format"
    assert rf.json_schema is not None
    return Constraint.json_schema(rf.json_schema.schema_), "response_format.json_schema.schema"


@dataclass
class Plan:
    """What a request asks of a reply: its grammar, and the tools it may call (None: no tool mode)."""

    constraint: Constraint | None = None
    tools: list[dict] | None = None  # offered tools (rendered into the prompt)
    calls: bool = False  # a reply may be tool calls (tool_choice is not none)


def plan(b: Backend, req: CompletionRequest | ChatCompletionRequest, *, chat: bool) -> Plan:
    refuse_unsupported(req)
    constraint, where = _output_constraint(req)
    out = Plan(constraint)
    if isinstance(req, ChatCompletionRequest):
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        choice: Any = req.tool_choice or ("auto" if tools else "none")
        if choice != "none" and not tools:
            raise ApiError(400, "tool_choice: needs `tools`", param="tool_choice")
        out.tools = tools
        if choice != "none":
            if constraint is not None:
                raise ApiError(
                    400, f"{where.split('.')[0]}: not with tool calls (tool_choice none)", param=where
                )
            if not isinstance(choice, str):
                choice = choice.model_dump()
            try:
                grammar = call_grammar(tools or [], choice, parallel=req.parallel_tool_calls)
            except ToolFormatError as exc:
                raise ApiError(400, str(exc), param="tool_choice") from exc
            out.constraint, out.calls, where = Constraint.lark(grammar or ""), True, "tools"
    out.constraint = b.constraint(out.constraint, chat=chat, field=where)
    return out


def _calls_json(calls: list) -> list[dict]:
    return [
        {
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": c.name, "arguments": c.arguments},
        }
        for c in calls
    ]


def tool_message(text: str | None, finish: str) -> tuple[dict, str]:
    """An assistant message for a reply that may hold calls, and its finish reason."""
    content, calls = parse_calls(text or "")
    if not calls:
        return {"role": "assistant", "content": text}, finish
    message = {"role": "assistant", "content": content, "tool_calls": _calls_json(calls)}
    return message, "tool_calls" if finish == "stop" else finish


@dataclass
class ToolStream:
    """Streamed deltas of a reply that may be tool calls. Under the call grammar a reply is calls
    exactly when its first character is ``<``: text streams as usual, calls are held until the
    reply ends, then sent as one ``tool_calls`` delta (each call whole, as the openai client joins)."""

    text: str = ""
    holding: bool | None = None  # None: no text seen yet
    sent: list[str] = field(default_factory=list)

    def delta(self, piece: str | None, finish: str | None) -> tuple[dict, str | None]:
        """The delta to send for this piece of text, and the finish reason to report."""
        piece = piece or ""
        self.text += piece
        if self.holding is None and self.text:
            self.holding = self.text.startswith("<")
        if not self.holding:
            return ({"content": piece} if piece else {}), finish
        if finish is None:
            return {}, None
        content, calls = parse_calls(self.text)
        if not calls:
            return {"content": self.text}, finish
        items = [{"index": i, **call} for i, call in enumerate(_calls_json(calls))]
        out: dict = {"tool_calls": items}
        if content:
            out["content"] = content
        return out, "tool_calls" if finish == "stop" else finish
