"""Structured outputs against a served model, through the official ``openai`` client (issue 27's
acceptance): N chat requests with a JSON schema (a nested object, an enum, an array, integer bounds)
at temperature 1.0, each reply parsed and validated; and a tool-call round trip, streamed and not.

    make serve &   # the pipeline's registered champion on 127.0.0.1:3000
    python benchmarks/structured_acceptance.py --url http://127.0.0.1:3000 --n 50

Prints the counts (parsed, valid, finish reasons) and the latency distribution. The schema's string
bounds keep a reply inside the pipeline's tiny model's context (128 tokens): a grammar cannot finish
in fewer tokens than it needs, and a reply cut by the context ends with ``finish_reason: "length"``.
The tool-call round trip needs a context that holds the tool definitions (about 230 tokens here);
with a smaller one it is skipped with the reason.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import urllib.request

import jsonschema
import openai

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 2},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
    },
    "required": ["name", "age", "role", "tags", "address"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:3000")
    ap.add_argument("--n", type=int, default=50)
    ap.add_argument("--model", default="lmforge-chat")
    args = ap.parse_args()
    client = openai.OpenAI(base_url=f"{args.url}/v1", api_key="unused", max_retries=0)
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    ask = [{"role": "user", "content": "Describe a person as JSON."}]
    parsed = valid = 0
    finishes: dict[str, int] = {}
    seconds = []
    for seed in range(args.n):
        t0 = time.perf_counter()
        r = client.chat.completions.create(
            model=args.model, messages=ask, response_format=fmt, temperature=1.0, seed=seed, max_tokens=400
        )
        seconds.append(time.perf_counter() - t0)
        choice = r.choices[0]
        finishes[choice.finish_reason] = finishes.get(choice.finish_reason, 0) + 1
        try:
            value = json.loads(choice.message.content)
            parsed += 1
            jsonschema.validate(value, PERSON)
            valid += 1
        except (ValueError, jsonschema.ValidationError) as exc:
            print(f"seed {seed}: {type(exc).__name__}: {str(exc)[:120]}  {choice.message.content[:200]!r}")
        if seed < 3:
            print(f"seed {seed}: {choice.message.content}")
    print(
        f"json_schema: {parsed}/{args.n} parse, {valid}/{args.n} validate; finish {finishes}; "
        f"latency median {statistics.median(seconds):.2f} s, max {max(seconds):.2f} s"
    )

    with urllib.request.urlopen(f"{args.url}/info", timeout=30) as r:
        info = json.load(r)
    if info["context_length"] < 512:
        print(
            f"tools: skipped, the model's context ({info['context_length']}) cannot hold the tool definitions"
        )
        return
    for stream in (False, True):
        q = [{"role": "user", "content": "Weather in Oslo?"}]
        kw = dict(
            model=args.model,
            messages=q,
            tools=[WEATHER],
            tool_choice="required",
            temperature=1.0,
            seed=1,
            max_tokens=200,
        )
        if not stream:
            r = client.chat.completions.create(**kw)
            calls = [(c.id, c.function.name, c.function.arguments) for c in r.choices[0].message.tool_calls]
            finish = r.choices[0].finish_reason
        else:
            calls, finish = [], None
            for chunk in client.chat.completions.create(**kw, stream=True):
                if chunk.choices:
                    for tc in chunk.choices[0].delta.tool_calls or []:
                        calls.append((tc.id, tc.function.name, tc.function.arguments))
                    finish = chunk.choices[0].finish_reason or finish
        for _, _name, arguments in calls:
            jsonschema.validate(json.loads(arguments), WEATHER["function"]["parameters"])
        history = q + [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": i, "type": "function", "function": {"name": n, "arguments": a}}
                    for i, n, a in calls
                ],
            },
            {"role": "tool", "tool_call_id": calls[0][0], "content": "-3 C, snow"},
        ]
        answer = client.chat.completions.create(
            model=args.model,
            messages=history,
            tool_choice="none",
            tools=[WEATHER],
            temperature=0.0,
            max_tokens=40,
        )
        print(
            f"tools (stream={stream}): finish {finish}, calls {calls}; answer after the result: {answer.choices[0].message.content!r}"
        )


if __name__ == "__main__":
    main()
