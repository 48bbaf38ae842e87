"""Request schemas of the lmforge service, with bounds.

Every sampling knob is checked here, before it reaches the engine, so a bad value is a 422 that
names the field (``temperature``, ``messages.0.role``...), never a 500. The prompt-length check
needs the tokenizer and happens in the service (400, the message gives both lengths).

Native routes (``/generate``, ``/generate_stream``, ``/tokenize``) reject unknown fields, so a typo
such as ``temprature`` is an error rather than silently ignored. The OpenAI-compatible routes ignore
fields they do not know (clients send ``user``, ``frequency_penalty: 0``...), but bound those they do.
"""

from __future__ import annotations

import json
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_NEW_TOKENS = 4096
MAX_TOP_LOGPROBS = 20
MAX_STOP = 8
MAX_PROMPT_CHARS = 200_000
MAX_LOGIT_BIAS = 300

Role = Literal["system", "user", "assistant", "tool"]
StopString = Annotated[str, Field(min_length=1, max_length=256)]


class TextPart(BaseModel):
    """OpenAI content part; only text is supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


FunctionName = Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
MAX_TOOLS = 64


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    arguments: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] = Field(
        description="a JSON object, as text"
    )

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, value: str) -> str:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if not isinstance(parsed, dict):
            raise ValueError("must be a JSON object")
        return value


class ToolCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: Annotated[str, Field(max_length=256)] | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send `name` etc.

    role: Role
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart] | None = None
    tool_calls: Annotated[list[ToolCallItem], Field(max_length=MAX_TOOLS)] | None = None
    tool_call_id: Annotated[str, Field(max_length=256)] | None = None

    @model_validator(mode="after")
    def _content_or_calls(self) -> Message:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise ValueError("`content` is required (it may be null only for an assistant's tool_calls)")
        if self.tool_calls and self.role != "assistant":
            raise ValueError("`tool_calls` belong to assistant messages")
        return self

    def as_dict(self) -> dict:
        content = self.content
        if isinstance(content, list):
            content = "".join(p.text for p in content)
        out: dict = {"role": self.role, "content": content}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        return out


Messages = Annotated[list[Message], Field(min_length=1, max_length=256)]
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1, max_length=65_536)]
LogitBias = Annotated[
    dict[Annotated[str, Field(pattern=r"^[0-9]{1,9}$")], Annotated[float, Field(ge=-100.0, le=100.0)]],
    Field(max_length=MAX_LOGIT_BIAS),
]
Prompt = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]


def _exactly_one(model: BaseModel, *names: str) -> BaseModel:
    """The request gives exactly one of the fields ``names`` (say, `prompt` or `messages`)."""
    if sum(getattr(model, n) is not None for n in names) != 1:
        quoted = [f"`{n}`" for n in names]
        raise ValueError(f"give exactly one of {', '.join(quoted[:-1])} or {quoted[-1]}")
    return model


def _stop_list(value: object) -> object:
    return [value] if isinstance(value, str) else value


class Sampling(BaseModel):
    """Sampling knobs shared by all generation routes (native names)."""

    temperature: float = Field(1.0, ge=0.0, le=10.0, description="0 means greedy")
    top_k: int | None = Field(
        None, ge=0, le=2**31 - 1, description="keep the k most likely tokens; 0/None = off"
    )
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(
        1.0, gt=0.0, le=10.0, description="CTRL-style, on prompt and reply tokens"
    )
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: once per generated token")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: per occurrence")
    logit_bias: LogitBias | None = Field(None, description="token id (as a string) -> bias in [-100, 100]")
    seed: int | None = Field(None, ge=0, le=2**63 - 1, description="same seed, same params: same output")
    n: int = Field(1, ge=1, le=MAX_N, description="choices per prompt, each its own row of the batch")


class GenerateRequest(Sampling):
    model_config = ConfigDict(extra="forbid")

    prompt: Prompt | None = Field(None, description="raw text, continued as is")
    messages: Messages | None = Field(None, description="a conversation, answered as the assistant")
    max_new_tokens: int = Field(64, ge=1, le=MAX_NEW_TOKENS)
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP)
    logprobs: bool = Field(False, description="return each chosen token's log-probability")
    top_logprobs: int = Field(0, ge=0, le=MAX_TOP_LOGPROBS, description="alternatives per step")

    _stop = field_validator("stop", mode="before")(_stop_list)

    @model_validator(mode="after")
    def _one_input(self) -> GenerateRequest:
        return _exactly_one(self, "prompt", "messages")  # type: ignore[return-value]


class TokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    text: Prompt | None = None
    messages: Messages | None = None
    add_generation_prompt: bool = Field(True, description="for messages: end with the assistant header")
    add_bos: bool = Field(False, description="for text: prepend <|bos|> as /generate does")

    @model_validator(mode="after")
    def _one_input(self) -> TokenizeRequest:
        return _exactly_one(self, "text", "messages")  # type: ignore[return-value]


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ids: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=1_000_000)]
    skip_special: bool = True


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: Annotated[str, Field(max_length=64)] = "response"
    description: str | None = None
    schema_: dict | bool = Field(default_factory=dict, alias="schema", description="the JSON schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: ``text`` (free), ``json_object`` or ``json_schema``."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("`json_schema` is required when type is json_schema")
        return self


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs``: exactly one of a JSON schema, a regex, a choice or a Lark grammar."""

    model_config = ConfigDict(extra="forbid")
    json_: dict | bool | None = Field(None, alias="json", description="a JSON schema")
    regex: Annotated[str, Field(min_length=1, max_length=10_000)] | None = None
    choice: (
        Annotated[
            list[Annotated[str, Field(min_length=1, max_length=1000)]], Field(min_length=1, max_length=256)
        ]
        | None
    ) = None
    grammar: Annotated[str, Field(min_length=1, max_length=100_000)] | None = Field(
        None, description="a Lark grammar (llguidance's dialect; may embed %json {...})"
    )

    @model_validator(mode="after")
    def _one(self) -> StructuredOutputs:
        return _exactly_one(self, "json_", "regex", "choice", "grammar")  # type: ignore[return-value]


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName
    description: Annotated[str, Field(max_length=10_000)] | None = None
    parameters: dict | None = Field(None, description="the arguments' JSON schema")
    strict: bool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: FunctionName


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"] = "function"
    function: NamedFunction


# Fields of OpenAI's API that change what is generated and that this server does not do: a request
# that sets one is a 400 naming it, never a reply that silently ignored it.
UNSUPPORTED = {
    "functions": "use `tools`",
    "function_call": "use `tool_choice`",
    "audio": "text only",
    "prediction": "no predicted outputs",
    "web_search_options": "no web search",
    "reasoning_effort": "no reasoning models",
    "suffix": "no insertion",
    "guided_json": "use `structured_outputs.json` or `response_format`",
    "guided_regex": "use `structured_outputs.regex`",
    "guided_choice": "use `structured_outputs.choice`",
    "guided_grammar": "use `structured_outputs.grammar`",
}


class _OpenAIBase(Sampling):
    """OpenAI fields plus lmforge extensions (top_k, min_p, repetition_penalty, structured_outputs).
    Unknown fields are allowed (clients send `user`, `metadata`...); :data:`UNSUPPORTED` ones are refused."""

    model_config = ConfigDict(extra="allow")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: list[StopString] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None

    _stop = field_validator("stop", mode="before")(_stop_list)

    def unsupported(self) -> list[tuple[str, str]]:
        """The set fields this server cannot honour, with what to do instead."""
        extra = self.model_extra or {}
        found = [(name, why) for name, why in UNSUPPORTED.items() if extra.get(name) not in (None, [], {})]
        modalities = extra.get("modalities")
        if modalities not in (None, ["text"]):
            found.append(("modalities", "text only"))
        return found


class CompletionRequest(_OpenAIBase):
    prompt: (
        Prompt
        | Annotated[list[Prompt], Field(min_length=1, max_length=64)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=64)]
    ) = Field(description="text, texts, token ids or lists of token ids (taken as is, no <|bos|> added)")
    max_tokens: int | None = Field(
        16, ge=0, le=MAX_NEW_TOKENS, description="0 with echo + logprobs: score the prompt only"
    )
    logprobs: int | None = Field(None, ge=0, le=5, description="top alternatives per token (legacy API)")
    echo: bool = Field(False, description="prepend the prompt (and its logprobs) to the completion")
    best_of: int | None = Field(None, ge=1, le=1)

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]  # type: ignore[list-item]
        return list(p)  # type: ignore[arg-type]


class ChatCompletionRequest(_OpenAIBase):
    messages: Messages
    max_completion_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = Field(
        None, description="default: auto with tools, none without"
    )
    parallel_tool_calls: bool = Field(True, description="false: at most one call per reply")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("`top_logprobs` needs `logprobs: true`")
        return self


# --------------------------------------------------------------------------- introspection (the playground)

MAX_INTROSPECT_TOP = 20
MAX_DISTRIBUTION_TOP = 200


class TextInput(BaseModel):
    """One of: raw `text` (with `<|bos|>` first unless add_bos is false), a chat (`messages`, rendered
    with the generation prompt), or token `ids` taken as they are."""

    model_config = ConfigDict(extra="forbid")

    text: Prompt | None = None
    messages: Messages | None = None
    ids: TokenIds | None = None
    add_bos: bool = Field(True, description="for text: prepend <|bos|> as /generate does")

    @model_validator(mode="after")
    def _one_input(self) -> TextInput:
        return _exactly_one(self, "text", "messages", "ids")  # type: ignore[return-value]


class IntrospectRequest(TextInput):
    top_k: int = Field(5, ge=1, le=MAX_INTROSPECT_TOP, description="next-token alternatives per position")
    attention_layers: list[Annotated[int, Field(ge=0, le=1023)]] = Field(
        default_factory=list,
        max_length=64,
        description="layers whose attention weights (every head) to return",
    )
    logit_lens: bool = Field(True, description="each layer's top-1 prediction at every position")


class DistributionRequest(TextInput):
    position: int | None = Field(
        None, ge=0, description="predict the token after this position (default: the last)"
    )
    temperature: float = Field(1.0, ge=0.0, le=10.0)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(1.0, gt=0.0, le=10.0)
    top: int = Field(
        20, ge=1, le=MAX_DISTRIBUTION_TOP, description="tokens to return (most likely before or after)"
    )
    sample: bool = Field(False, description="also draw one token as the server would")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    structured_outputs: StructuredOutputs | None = Field(
        None, description="a grammar the reply must match: adds the `grammar` stage"
    )
    reply_start: int | None = Field(
        None,
        ge=0,
        description="with a grammar: where the reply starts in the ids (default: after `position`)",
    )


class CompareRequest(BaseModel):
    """The same prompt through the served version and another one (version number or alias)."""

    model_config = ConfigDict(extra="forbid")

    text: Prompt | None = None
    messages: Messages | None = None
    other: Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")] = Field(
        description="a version number (`2`) or an alias (`candidate`)"
    )
    max_new_tokens: int = Field(32, ge=1, le=128)
    temperature: float = Field(0.0, ge=0.0, le=10.0, description="0: greedy, the fairest comparison")
    seed: int | None = Field(None, ge=0, le=2**63 - 1)

    @model_validator(mode="after")
    def _one_input(self) -> CompareRequest:
        return _exactly_one(self, "text", "messages")  # type: ignore[return-value]
