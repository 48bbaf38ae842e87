"""Structured outputs and tool calls (issue 27).

In the engine: constrained rows (a JSON schema, a regex, a choice) always match their grammar, share a
batch with free rows without changing those rows' bytes, end with "stop" the moment the grammar is
complete, and compile each grammar once. Over HTTP, through the official ``openai`` client against a
real BentoML server: ``response_format`` (json_object, json_schema), vLLM's ``structured_outputs``,
tools with every ``tool_choice``, streamed and not, a tool result sent back, and a 400 naming every
field or schema feature the server cannot honour.
"""

from __future__ import annotations

import asyncio
import json

import jsonschema
import openai
import pytest

from conftest import tiny_gpt
from lmforge.generation.chat import ChatEngine
from lmforge.generation.engine import ServingEngine
from lmforge.generation.grammar import Constraint, GrammarError
from lmforge.generation.sampling_params import SamplingParams
from lmforge.serving import aio
from lmforge.tokenizer import ChatTokenizer, train_bpe
from lmforge.tool_calls import call_grammar, parse_calls, render_call, template_messages
from test_service import CORPUS, run_self, running_server

# A nested object, an enum, an array and integer bounds (the acceptance schema).
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 10},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
# The same features, small enough for the HTTP tests' model (a context of 64 tokens).
SMALL = {
    "type": "object",
    "properties": {
        "a": {"type": "integer", "minimum": 0, "maximum": 99},
        "r": {"enum": ["x", "y"]},
        "t": {"type": "array", "items": {"enum": [1, 2]}, "maxItems": 2},
        "o": {
            "type": "object",
            "properties": {"z": {"type": "integer", "minimum": -5, "maximum": 5}},
            "required": ["z"],
            "additionalProperties": False,
        },
    },
    "required": ["a", "r", "t", "o"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "the weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 4}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "integer", "minimum": -12, "maximum": 14}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}


# --------------------------------------------------------------------------- the engine


@pytest.fixture(scope="module")
def chat() -> ChatEngine:
    tok = ChatTokenizer(train_bpe(CORPUS, vocab_size=300))
    model = tiny_gpt(tok.vocab_size, block_size=256, n_head=2, n_kv_head=2, tie_embeddings=False).eval()
    return ChatEngine(model, tok)


@pytest.fixture(scope="module")
def engine(chat):
    engine = ServingEngine(chat, max_batch=8)
    yield engine
    engine.close()


def run(engine, chat, jobs):
    """``jobs``: (prompt ids, params, constraint or None, n); their finished rows, in order."""

    async def go():
        return await asyncio.gather(
            *[aio.generate(engine, ids, p, chat=True, n=n, constraint=c) for ids, p, c, n in jobs]
        )

    return asyncio.run(go())


def test_constrained_rows_always_match_and_free_rows_keep_their_bytes(engine, chat):
    ids = chat.chat_ids([{"role": "user", "content": "who is there?"}])
    hot = SamplingParams(max_new_tokens=200, temperature=1.0, seed=7)
    free = [(ids, SamplingParams(max_new_tokens=40, temperature=0.0), None, 1), (ids, hot, None, 2)]
    alone = run(engine, chat, free)
    mixed = run(engine, chat, [*free, (ids, hot, Constraint.json_schema(PERSON), 8)])
    # Free rows that shared their batch with constrained ones: the same tokens as alone.
    for a, m in zip(alone, mixed[:2], strict=True):
        assert [f.generation.token_ids for f in a] == [f.generation.token_ids for f in m]
    for f in mixed[2]:
        assert f.generation.finish_reason == "stop"  # ended by the grammar, not by the budget
        jsonschema.validate(json.loads(f.generation.text), PERSON)


def test_regex_and_choice(engine, chat):
    ids = chat.chat_ids([{"role": "user", "content": "code?"}])
    p = SamplingParams(max_new_tokens=40, temperature=1.0, seed=1)
    rows = run(
        engine,
        chat,
        [
            (ids, p, Constraint.regex(r"[A-Z][a-z]{2,5}-[0-9]{3}"), 6),
            (ids, p, Constraint.choice(["yes", "no", "maybe"]), 6),
        ],
    )
    codes, words = ([f.generation.text for f in r] for r in rows)
    import re

    assert all(re.fullmatch(r"[A-Z][a-z]{2,5}-[0-9]{3}", c) for c in codes), codes
    assert set(words) <= {"yes", "no", "maybe"} and words, words
    assert all(f.generation.finish_reason == "stop" for r in rows for f in r)


def test_grammars_compile_once_and_name_what_they_cannot_do(chat):
    grammars = chat.grammars
    before = grammars.misses
    for _ in range(3):
        grammars.matcher(
            Constraint.json_schema({"type": "object", "properties": {"q": {"type": "integer"}}}), (5,)
        )
    assert grammars.misses == before + 1
    with pytest.raises(GrammarError, match="uniqueItems"):
        grammars.check(Constraint.json_schema({"type": "array", "uniqueItems": True}), (5,))
    with pytest.raises(GrammarError, match="regex"):
        grammars.check(Constraint.regex("[a-"), (5,))


def test_a_bare_model_refuses_constraints(chat):
    from lmforge.generation.driver import ModelFront
    from lmforge.generation.interface import Request

    engine = ServingEngine(ModelFront(chat.model, pad_id=0), thread=False)
    with pytest.raises(ValueError, match="tokenizer"):
        engine.submit(
            Request([1, 2], SamplingParams(), chat=False, constraint=Constraint.json_object()),
            lambda *_: None,
        )


# --------------------------------------------------------------------------- the tool-call format


def test_the_template_the_parser_and_the_grammar_agree(chat):
    """What SFT renders for a call is what the parser reads and what the call grammar accepts."""
    call = {
        "id": "c1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city":"Oslo","unit":"C"}'},
    }
    turns = template_messages(
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "c1", "content": "-3"},
        ],
        [WEATHER],
    )
    assert turns[0]["role"] == "system" and "get_weather" in turns[0]["content"]
    written = turns[2]["content"]
    assert written == render_call("get_weather", {"city": "Oslo", "unit": "C"})
    content, calls = parse_calls(written)
    assert content is None and [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo", "unit": "C"})
    ]
    # The grammar accepts exactly the rendered call: feed its tokens through a matcher.
    matcher = chat.grammars.matcher(
        Constraint.lark(call_grammar([WEATHER], "required")), chat.tok.stop_ids(True)
    )
    for t in chat.tok.encode(written):
        assert matcher.consume_token(t), matcher.get_error()
    assert matcher.is_accepting()
    enc = chat.tok.render_chat(turns[1:3] + [{"role": "assistant", "content": "cold"}])
    trained = chat.tok.decode([i for i, m in zip(enc.ids, enc.assistant_mask, strict=True) if m])
    assert written in trained and "<tool_response>" not in trained  # SFT learns calls, not results


# --------------------------------------------------------------------------- over HTTP, with the openai client


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> dict:
    """The HTTP tests' toy model, with a context of 1024 tokens (tool definitions fill ~500)."""
    root = tmp_path_factory.mktemp("structured")
    tracking_uri = f"sqlite:///{root / 'mlflow.db'}"
    published = run_self(tracking_uri, "publish", str(root), "long-context")
    return {**published, "root": root, "tracking_uri": tracking_uri}


@pytest.fixture(scope="module")
def client(registry):
    with running_server(registry, "structured") as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


ASK = [{"role": "user", "content": "Hi"}]


def test_json_schema_replies_always_validate(client):
    fmt = {"type": "json_schema", "json_schema": {"name": "small", "schema": SMALL}}
    for seed in range(12):
        r = client.chat.completions.create(
            model="", messages=ASK, response_format=fmt, temperature=1.0, seed=seed, max_tokens=200
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), SMALL)
    r = client.chat.completions.create(
        model="",
        messages=ASK,
        response_format={"type": "json_object"},
        temperature=1.0,
        seed=3,
        max_tokens=200,
        n=3,
    )
    assert all(isinstance(json.loads(c.message.content), dict) for c in r.choices)
    r = client.completions.create(
        model="",
        prompt="Colour:",
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"choice": ["red", "green", "blue"]}},
    )
    assert r.choices[0].text in {"red", "green", "blue"}
    chunks = client.chat.completions.create(
        model="", messages=ASK, response_format=fmt, temperature=1.0, seed=5, max_tokens=200, stream=True
    )
    jsonschema.validate(
        json.loads("".join(c.choices[0].delta.content or "" for c in chunks if c.choices)), SMALL
    )


@pytest.mark.parametrize("stream", [False, True])
def test_a_tool_call_round_trip(client, stream):
    def ask(messages, **kw):
        if not stream:
            r = client.chat.completions.create(
                model="",
                messages=messages,
                tools=[WEATHER, TIME],
                temperature=1.0,
                seed=4,
                max_tokens=120,
                **kw,
            )
            return r.choices[0].message, r.choices[0].finish_reason
        text, calls, finish = "", {}, None
        for chunk in client.chat.completions.create(
            model="",
            messages=messages,
            tools=[WEATHER, TIME],
            temperature=1.0,
            seed=4,
            max_tokens=120,
            stream=True,
            **kw,
        ):
            delta = chunk.choices[0].delta if chunk.choices else None
            if delta is None:
                continue
            text += delta.content or ""
            for tc in delta.tool_calls or []:
                slot = calls.setdefault(tc.index, {"id": tc.id, "name": "", "arguments": ""})
                slot["name"] += tc.function.name or ""
                slot["arguments"] += tc.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        made = [
            openai.types.chat.ChatCompletionMessageFunctionToolCall(
                id=c["id"], type="function", function={"name": c["name"], "arguments": c["arguments"]}
            )
            for c in calls.values()
        ]
        return openai.types.chat.ChatCompletionMessage(
            role="assistant", content=text or None, tool_calls=made or None
        ), finish

    question = [{"role": "user", "content": "Weather in Oslo?"}]
    message, finish = ask(question, tool_choice="required")
    assert finish == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert call.function.name in {"get_weather", "get_time"} and call.id.startswith("call_")
        args = json.loads(call.function.arguments)
        schema = (WEATHER if call.function.name == "get_weather" else TIME)["function"]["parameters"]
        jsonschema.validate(args, schema)
    message, finish = ask(
        question,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        parallel_tool_calls=False,
    )
    assert finish == "tool_calls" and [c.function.name for c in message.tool_calls] == ["get_time"]
    # The result goes back as a tool message; tool_choice none gives plain text.
    history = [
        *question,
        message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": "14:02"},
    ]
    reply, finish = ask(history, tool_choice="none")
    assert not reply.tool_calls and finish in {"stop", "length"}
    reply, finish = ask(history)  # auto: calls or text, never a malformed call
    if reply.tool_calls:
        assert finish == "tool_calls"
    else:
        assert "<tool_call>" not in (reply.content or "")


@pytest.mark.parametrize(
    ("extra", "field", "words"),
    [
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}},
                }
            },
            "response_format.json_schema.schema",
            "uniqueItems",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"not": {"type": "string"}}},
                }
            },
            "response_format.json_schema.schema",
            "not",
        ),
        ({"structured_outputs": {"regex": "[a-"}}, "structured_outputs.regex", "regex"),
        ({"functions": [{"name": "f"}]}, "functions", "tools"),
        ({"suffix": "x"}, "suffix", "not supported"),
        ({"modalities": ["audio"]}, "modalities", "text only"),
        ({"tool_choice": "required"}, "tool_choice", "tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "tool_choice",
            "nope",
        ),
        ({"tools": [WEATHER], "response_format": {"type": "json_object"}}, "response_format", "tool"),
    ],
)
def test_fields_the_server_cannot_honour_are_a_400_naming_them(client, extra, field, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="", messages=ASK, max_tokens=4, extra_body=extra)
    body = err.value.body if isinstance(err.value.body, dict) else {}
    error = body.get("error", body)
    assert error.get("param") == field, error
    assert words in error.get("message", ""), error


def test_unconstrained_requests_are_unchanged_by_the_feature(client):
    """Greedy and seeded replies without a constraint: the same bytes as without any of the fields."""
    base = {"model": "", "messages": ASK, "max_tokens": 24}
    for knobs in ({"temperature": 0.0}, {"temperature": 1.0, "seed": 11}):
        plain = client.chat.completions.create(**base, **knobs).choices[0].message.content
        again = client.chat.completions.create(**base, **knobs, response_format={"type": "text"})
        assert again.choices[0].message.content == plain


def test_sft_dialogues_with_tool_calls_render_as_the_server_prompts(chat):
    """An SFT record in OpenAI's shapes (tools, an assistant's tool_calls, a tool result) is ingested
    as the plain turns the template renders: the same ids as the server's prompt for those messages,
    with the loss on the call and the final answer, not on the tool's result."""
    from lmforge.ingest.schemas import RecordProblem, to_sft

    call = {"type": "function", "function": {"name": "get_time", "arguments": '{"zone":2}'}}
    messages = [
        {"role": "user", "content": "Time in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "content": "14:02"},
        {"role": "assistant", "content": "It is 14:02."},
    ]
    record = to_sft({"tools": [TIME], "messages": messages}, "messages", "messages")
    ingested = chat.tok.render_chat(record["messages"])
    assert ingested.ids == chat.tok.render_chat(messages, tools=[TIME]).ids
    served = chat.chat_ids(messages[:1], tools=[TIME])
    assert ingested.ids[: len(served)] == served  # the server's prompt is the dialogue's beginning
    trained = chat.tok.decode([i for i, m in zip(ingested.ids, ingested.assistant_mask, strict=True) if m])
    assert render_call("get_time", {"zone": 2}) in trained and "It is 14:02." in trained
    assert "14:02</tool_response>" not in trained
    bad = {
        "messages": [
            {"role": "user", "content": "x"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]},
        ]
    }
    with pytest.raises(RecordProblem, match=r"tool_calls\[0\].function.arguments is not JSON"):
        to_sft(bad, "messages", "messages")
