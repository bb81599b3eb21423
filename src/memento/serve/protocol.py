"""The OpenAI request bodies this server accepts, and their translation into SamplingParams.

Unknown fields are refused (400), not ignored: a client that asks for something this server does
not do should hear so. OpenAI fields with no effect here are accepted only at their neutral value
(e.g. ``presence_penalty=0``). vLLM's extras ``top_k``, ``ignore_eos``, ``stop_token_ids`` and
``include_stop_str_in_output`` are accepted as vLLM takes them (the ``extra_body`` of the client).

The models' JSON schemas are the OpenAPI document's request bodies, so every rule a JSON schema can
state is a constraint here (non-empty prompts and stop strings, token ids >= 0, seeds in int64, an
empty ``logit_bias`` at most), and JSON types are taken as the schema states them: no ``"16"`` for
16 or ``true`` for 1 (strict mode; an integral number such as ``2.0`` is an integer, as in JSON
Schema). What a schema cannot state is a 400 the document declares: rules across fields
(``stream_options`` without ``stream``, ``top_logprobs`` without ``logprobs``, ``best_of`` other
than ``n``) and rules of the model being served (token ids inside its vocabulary, a prompt its
context and KV budget hold).

The response models at the end document the answers (OpenAPI only: the routes return plain dicts,
which FastAPI does not re-validate).
"""

from __future__ import annotations

import copy
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

from memento.engine import SamplingParams

MAX_TOP_LOGPROBS = 20
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""Seeds are int64, as in OpenAI and vLLM (``seed + i`` of sample ``i`` stays a valid torch seed)."""


def _integral(value: Any) -> Any:
    """JSON Schema's integers include ``2.0``: an integral float is the int it equals (strict mode refuses it)."""
    return int(value) if type(value) is float and value.is_integer() else value


def _not_bool(value: Any) -> Any:
    """A number, not a boolean (``false == 0`` would pass a ``Literal[0]``)."""
    if isinstance(value, bool):
        raise ValueError("Input should be a number")
    return value


def _bool(value: Any) -> Any:
    """A boolean, not a number (``0 == False`` would pass a ``Literal[False]``)."""
    if not isinstance(value, bool):
        raise ValueError("Input should be a boolean")
    return value


INTEGRAL = BeforeValidator(_integral)
"""For an ``int`` field, after its bounds (``Annotated[int, Field(ge=0), INTEGRAL]``: before them, the
schema would lose them)."""

TokenId = Annotated[int, Field(ge=0), INTEGRAL]
NonEmptyStr = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[TokenId], Field(min_length=1)]
Neutral = Annotated[Literal[0, 0.0], BeforeValidator(_not_bool)]
"""A penalty this server has no use for: accepted at 0 only."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=128), INTEGRAL] = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: NonEmptyStr | list[NonEmptyStr] | None = None
    seed: Annotated[int, Field(ge=INT64_MIN, le=INT64_MAX), INTEGRAL] | None = None
    presence_penalty: Neutral = 0
    frequency_penalty: Neutral = 0
    logit_bias: Annotated[dict[str, float], Field(max_length=0)] | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] = -1
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    include_stop_str_in_output: bool = False

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _no_logit_bias(cls, value: Any) -> Any:
        if value:  # the schema says so too (maxProperties 0); this says why
            raise ValueError("logit_bias is not supported by this server")
        return value

    @model_validator(mode="after")
    def _neutral_only(self) -> _Sampling:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options is only allowed with stream=true")
        return self

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def sampling_params(self, max_tokens: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=max_tokens,
            stop=self.stops(),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            seed=self.seed,
            logprobs=logprobs,
        )


def _batch_of_one(schema: dict[str, Any]) -> None:
    """The prompt's schema also names OpenAI's batch form, for a batch of one (which is unwrapped)."""
    forms = copy.deepcopy(schema["anyOf"])
    batch = {"type": "array", "items": {"anyOf": forms}, "minItems": 1, "maxItems": 1, "description": "one prompt"}
    schema["anyOf"].append(batch)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class CompletionRequest(_Sampling):
    prompt: Annotated[NonEmptyStr | TokenIds, Field(json_schema_extra=_batch_of_one)]

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, prompt: Any) -> Any:
        if isinstance(prompt, list) and prompt and not all(_is_number(p) for p in prompt):
            if len(prompt) != 1 or not isinstance(prompt[0], str | list):
                raise ValueError("one prompt per request: send several prompts as several requests")
            prompt = prompt[0]  # a batch of one is one prompt
        if prompt in ("", []):
            raise ValueError("prompt is empty")
        return prompt

    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = None
    echo: Annotated[Literal[False], BeforeValidator(_bool)] = False
    best_of: Annotated[int, Field(ge=1, le=128), INTEGRAL] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        return self


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # accepted (clients echo an answer back whole), not sent to the model
    reasoning: str | None = None
    reasoning_content: str | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        return self

    def chat_messages(self) -> list[dict[str, Any]]:
        return [{"role": m.role, "content": m.text()} for m in self.messages]


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None, code: Any = None):
    """OpenAI's error object."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


# -- the answers (documentation: the OpenAPI document's response schemas) --------------------------


class _Answer(BaseModel):
    model_config = ConfigDict(extra="forbid")  # the schema lists every field the server sends


class ErrorDetail(_Answer):
    message: str
    type: str = Field(description="invalid_request_error, not_found, rate_limit_exceeded, server_error, ...")
    param: str | None = Field(description="the request field at fault, when one is")
    code: int | str | None = Field(description="the HTTP status (null in an error event of a stream)")


class ErrorResponse(_Answer):
    """OpenAI's error object (:func:`error_body`)."""

    error: ErrorDetail


FinishReason = Literal["stop", "length", "abort"]
StopReason = Annotated[
    str | int | None,
    Field(
        description='the stop string or token id that ended the sample; "memento_format_error" when the memento '
        "format did (as on the vLLM backend)"
    ),
]


class CompletionTokensDetails(_Answer):
    reasoning_tokens: int = Field(description="sampled tokens inside <think> ... </think> (the tags left out)")


class Usage(_Answer):
    """Token counts, as vLLM 0.32 reports them, and the request's KV (the same fields on the vLLM backend)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: None = Field(description="always null: no prefix cache, so no cached prompt tokens")
    completion_tokens_details: CompletionTokensDetails | None = Field(
        description="chat: the reasoning tokens (summed over the samples); completions: null"
    )
    peak_kv_tokens: int = Field(description="the request's peak live KV (tokens; the largest over its samples)")
    evicted_tokens: int = Field(description="tokens evicted from the request's KV (summed over its samples)")


class CompletionLogprobs(_Answer):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Answer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason
    stop_reason: StopReason


class CompletionResponse(_Answer):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage


class TopLogprob(_Answer):
    token: str
    logprob: float | None
    bytes: list[int]


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Answer):
    content: list[TokenLogprob]


REASONING = "the thinking (blocks and mementos) between <think> and </think>; null when there is none"


class AssistantMessage(_Answer):
    role: Literal["assistant"]
    content: str | None
    reasoning: str | None = Field(description=REASONING + " (vLLM 0.32's name)")
    reasoning_content: str | None = Field(description="the same as reasoning (the name of earlier vLLM)")


class ChatChoice(_Answer):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason
    stop_reason: StopReason


class ChatCompletionResponse(_Answer):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(_Answer):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    max_model_len: int
    kv_budget_tokens: int
    keep_last_n: int


class ModelList(_Answer):
    object: Literal["list"]
    data: list[ModelCard]


class HealthStatus(_Answer):
    status: Literal["ok", "draining"]


class CompletionStreamChoice(_Answer):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: StopReason = None  # in the sample's last chunk


class CompletionChunk(_Answer):
    """One event of a streamed completion (``usage``: with ``stream_options.include_usage``, null but in
    the last chunk, which has no choices)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionStreamChoice]
    usage: Usage | None = None


class ChatDelta(_Answer):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning: str | None = Field(None, description="the reasoning's next piece (vLLM 0.32's name)")
    reasoning_content: str | None = Field(None, description="the same as reasoning (the name of earlier vLLM)")


class ChatStreamChoice(_Answer):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: FinishReason | None
    stop_reason: StopReason = None  # in the sample's last chunk


class ChatCompletionChunk(_Answer):
    """One event of a streamed chat completion (``usage`` as in :class:`CompletionChunk`)."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
