"""Request schemas of the lmforge service, with bounds.

Every sampling knob is checked here, before it reaches the engine, so a bad value is a 422 that
names the field (``temperature``, ``messages.0.role``...), never a 500. The prompt-length check
needs the tokenizer and happens in the service (400, the message gives both lengths).

Native routes (``/generate``, ``/generate_stream``, ``/tokenize``) reject unknown fields, so a typo
such as ``temprature`` is an error rather than silently ignored. The OpenAI-compatible routes ignore
fields they do not know (clients send ``user``, ``frequency_penalty: 0``...), but bound those they do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_N = 16
MAX_NEW_TOKENS = 4096
MAX_TOP_LOGPROBS = 20
MAX_STOP = 8
MAX_PROMPT_CHARS = 200_000
MAX_LOGIT_BIAS = 300

Role = Literal["system", "user", "assistant"]
StopString = Annotated[str, Field(min_length=1, max_length=256)]


class TextPart(BaseModel):
    """OpenAI content part; only text is supported."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text"] = "text"
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients may send `name` etc.

    role: Role
    content: Annotated[str, Field(max_length=MAX_PROMPT_CHARS)] | list[TextPart]

    def as_dict(self) -> dict:
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": self.role, "content": content}


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


class _OpenAIBase(Sampling):
    """OpenAI fields plus lmforge extensions (top_k, min_p, repetition_penalty)."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=MAX_NEW_TOKENS)
    stop: list[StopString] | None = Field(None, max_length=MAX_STOP)
    stream: bool = False
    stream_options: StreamOptions | None = None

    _stop = field_validator("stop", mode="before")(_stop_list)


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
