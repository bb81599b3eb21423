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


class ResponseFormat(_Strict):
    type: Literal["text"]


def _text_format_only(value: Any) -> Any:
    """``{"type": "text"}`` (what litellm, hence lighteval, sends with every request) is plain decoding;
    the JSON modes would need constrained decoding, which this server does not do."""
    if isinstance(value, dict) and value.get("type") not in (None, "text"):
        raise ValueError(
            f"response_format type {value.get('type')!r} is not supported: this server has no constrained "
            'decoding (only {"type": "text"})'
        )
    return value


def _unsupported(name: str, neutral: str) -> BeforeValidator:
    """A field accepted at its neutral value only, with a message that names it."""

    def check(value: Any) -> Any:
        if value is not None:
            raise ValueError(f"{name} is not supported by this server (only {neutral})")
        return value

    return BeforeValidator(check)


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
    response_format: Annotated[ResponseFormat | None, BeforeValidator(_text_format_only)] = None
    # Sent by OpenAI-style clients; neutral here: nothing is stored, metadata is not kept.
    store: Annotated[Literal[False], BeforeValidator(_bool)] | None = None
    metadata: dict[str, str] | None = None
    service_tier: Literal["auto", "default"] | None = None
    # vLLM's extras
    top_k: Annotated[int, Field(ge=-1), INTEGRAL] = -1
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=2**31)] = 1.0
    min_tokens: Neutral = 0
    ignore_eos: bool = False
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = False
    """False by default here (vLLM's default is true): a memento model's text is its delimiters. True
    drops special tokens from the returned text (the chat's reasoning is still split at ``<think>``)."""

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

    def sampling_params(
        self, max_tokens: int, logprobs: int | None, prompt_logprobs: int | None = None
    ) -> SamplingParams:
        return SamplingParams(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
            max_tokens=max_tokens,
            stop=self.stops(),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
            include_stop_str_in_output=self.include_stop_str_in_output,
            seed=self.seed,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
        )


class CompletionRequest(_Sampling):
    prompt: (
        NonEmptyStr
        | TokenIds
        | Annotated[list[NonEmptyStr], Field(min_length=1)]
        | Annotated[list[TokenIds], Field(min_length=1)]
    ) = Field(description="a prompt (text or token ids), or a batch of them (choice i * n + j: prompt i, sample j)")

    @field_validator("prompt", mode="before")
    @classmethod
    def _not_empty(cls, prompt: Any) -> Any:
        if prompt in ("", []) or (isinstance(prompt, list) and any(p in ("", []) for p in prompt)):
            raise ValueError("prompt is empty")
        return prompt

    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = 16
    logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = None
    echo: Annotated[bool, BeforeValidator(_bool)] = False
    """The prompt before the completion; with ``logprobs``, the prompt tokens' logprobs too (the first
    null), computed under the memento mask."""
    best_of: Annotated[int, Field(ge=1, le=128), INTEGRAL] | None = None
    suffix: None = None

    @model_validator(mode="after")
    def _best_of(self) -> CompletionRequest:
        if self.best_of is not None and self.best_of != self.n:
            raise ValueError("best_of is not supported (only best_of == n)")
        if self.echo and self.stream and self.logprobs is not None:
            raise ValueError("echo with logprobs is not supported when streaming (send stream=false)")
        return self

    def prompts(self) -> list[str | list[int]]:
        """The batch: one prompt or several, in order."""
        prompt = self.prompt
        if isinstance(prompt, str) or (prompt and not isinstance(prompt[0], str | list)):
            return [prompt]  # type: ignore[list-item]
        return list(prompt)  # type: ignore[arg-type]


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


RESERVED_TEMPLATE_KWARGS = frozenset({"conversation", "messages", "tokenize", "add_generation_prompt", "tools"})
"""``chat_template_kwargs`` keys that would override the server's own arguments to the template."""


def _no_tools(value: Any) -> Any:
    if value:
        raise ValueError("tools are not supported by this server (only an empty list)")
    return value


def _no_tool_choice(value: Any) -> Any:
    if value not in (None, "none", "auto"):
        raise ValueError('tool_choice is not supported by this server (only "none", or "auto" with no tools)')
    return value


class ChatCompletionRequest(_Sampling):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1), INTEGRAL] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_TOP_LOGPROBS), INTEGRAL] | None = None
    # vLLM's chat extras: the template's switches, passed to it
    add_generation_prompt: bool = True
    chat_template_kwargs: dict[str, Any] | None = None
    # neutral here: no tools, one reasoning mode
    tools: Annotated[list[dict[str, Any]], Field(max_length=0), BeforeValidator(_no_tools)] | None = None
    tool_choice: Annotated[Literal["none", "auto"], BeforeValidator(_no_tool_choice)] | None = None
    parallel_tool_calls: bool | None = None
    reasoning_effort: Annotated[None, _unsupported("reasoning_effort", "null: a memento model has one mode")] = None

    @model_validator(mode="after")
    def _logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs=true")
        reserved = RESERVED_TEMPLATE_KWARGS & set(self.chat_template_kwargs or {})
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {sorted(reserved)}: they are the request's own")
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
