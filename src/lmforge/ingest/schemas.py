"""Normalize raw records of any supported shape into lmforge's three example schemas.

- text:       {"text": str}
- sft:        {"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}
              (tool calls, tool results and a record's offered ``tools`` come in OpenAI's shapes and
              are written as plain turns by :func:`lmforge.tool_calls.template_messages`, the chat
              template's own rule, so SFT trains on the format the server parses)
- preference: {"prompt": [messages...], "chosen": str, "rejected": str}

A record that does not fit raises `RecordProblem` with a reason and the field at fault;
the caller reports it through the strict/lenient ledger.
"""

from __future__ import annotations

import re
from typing import Any

from lmforge.tool_calls import ToolFormatError, template_messages

ROLES = ("system", "user", "assistant", "tool")


class RecordProblem(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class Filtered(RecordProblem):
    """Well-formed input dropped by a content rule (counted as a drop, never an error)."""


def _field(record: Any, name: str, *, allow_empty: bool = False) -> str:
    if not isinstance(record, dict):
        raise RecordProblem(
            "not_an_object", f"expected an object with field {name!r}, got {type(record).__name__}"
        )
    if name not in record or record[name] is None:
        raise RecordProblem("missing_field", f"missing field {name!r}")
    value = record[name]
    if not isinstance(value, str):
        raise RecordProblem("wrong_type", f"field {name!r} must be a string, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise Filtered("empty_field", f"field {name!r} is empty")
    return value


def _messages(value: Any, name: str, tools: Any = None) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise RecordProblem(
            "wrong_type", f"field {name!r} must be a non-empty list of {{role, content}} messages"
        )
    if tools is not None and not isinstance(tools, list):
        raise RecordProblem("wrong_type", "field 'tools' must be a list of tool definitions")
    out = []
    for i, msg in enumerate(value):
        role = _field(msg, "role") if isinstance(msg, dict) else None
        if role not in ROLES:
            raise RecordProblem("bad_message", f"{name}[{i}].role must be one of {ROLES}, got {role!r}")
        calls = msg.get("tool_calls")
        if calls:
            if role != "assistant" or not isinstance(calls, list):
                raise RecordProblem(
                    "bad_message", f"{name}[{i}].tool_calls must be a list on an assistant message"
                )
            content = msg.get("content") or ""
            out.append({"role": role, "content": content, "tool_calls": calls})
        else:
            out.append({"role": role, "content": _field(msg, "content", allow_empty=True)})
    if not tools and not any(m["role"] == "tool" or "tool_calls" in m for m in out):
        return out
    try:
        return template_messages(out, tools)
    except (ToolFormatError, TypeError, AttributeError) as exc:
        raise RecordProblem("bad_message", f"{name}: {exc}") from None


def _alpaca_prompt(record: Any) -> str:
    instruction = _field(record, "instruction")
    extra = (
        _field(record, "input", allow_empty=True) if isinstance(record, dict) and record.get("input") else ""
    )
    return f"{instruction}\n\n{extra}" if extra.strip() else instruction


_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def _hh_dialogue(text: str, name: str) -> list[dict[str, str]]:
    parts = _HH_TURN.split("\n\n" + text.lstrip("\n") if not text.startswith("\n\n") else text)
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content.strip()})
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        raise RecordProblem(
            "bad_dialogue", f"field {name!r} is not a Human/Assistant dialogue ending with the Assistant"
        )
    return messages


def to_text(record: Any, schema: str, text_field: str) -> dict:
    if isinstance(record, str) and schema == "text":
        return {"text": record}
    if schema == "text":
        return {"text": _field(record, text_field)}
    if schema == "alpaca":
        return {"text": f"{_alpaca_prompt(record)}\n\n{_field(record, 'output')}"}
    raise RecordProblem("bad_schema", f"schema {schema!r} cannot be used as pretraining text")


def to_sft(record: Any, schema: str, messages_field: str) -> dict:
    if schema == "messages":
        if not isinstance(record, dict) or messages_field not in record:
            raise RecordProblem("missing_field", f"missing field {messages_field!r}")
        messages = _messages(record[messages_field], messages_field, record.get("tools"))
    elif schema == "alpaca":
        messages = [
            {"role": "user", "content": _alpaca_prompt(record)},
            {"role": "assistant", "content": _field(record, "output")},
        ]
    elif schema == "hh":
        messages = _hh_dialogue(_field(record, "chosen"), "chosen")
    elif schema == "qa":  # {question, answer}: GSM8K's layout
        messages = [
            {"role": "user", "content": _field(record, "question")},
            {"role": "assistant", "content": _field(record, "answer")},
        ]
    else:
        raise RecordProblem("bad_schema", f"schema {schema!r} cannot be used as SFT dialogues")
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise Filtered("no_assistant_turn", "dialogue has no non-empty assistant message")
    return {"messages": messages}


def to_preference(record: Any, schema: str, messages_field: str) -> dict:
    if schema == "alpaca_preference":
        prompt = [{"role": "user", "content": _alpaca_prompt(record)}]
        chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    elif schema == "preference":
        raw_prompt = record.get("prompt") if isinstance(record, dict) else None
        if isinstance(raw_prompt, list):
            prompt = _messages(raw_prompt, "prompt")
        else:
            prompt = [{"role": "user", "content": _field(record, "prompt")}]
        chosen, rejected = _field(record, "chosen"), _field(record, "rejected")
    elif schema == "hh":
        good, bad = (
            _hh_dialogue(_field(record, "chosen"), "chosen"),
            _hh_dialogue(_field(record, "rejected"), "rejected"),
        )
        if good[:-1] != bad[:-1]:
            raise RecordProblem(
                "bad_dialogue", "chosen and rejected dialogues differ before the last assistant turn"
            )
        prompt, chosen, rejected = good[:-1], good[-1]["content"], bad[-1]["content"]
    else:
        raise RecordProblem("bad_schema", f"schema {schema!r} cannot be used as preference pairs")
    if chosen == rejected:
        raise Filtered("identical_pair", "chosen and rejected replies are identical")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}
