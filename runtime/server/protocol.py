"""Request and response models of the OpenAI-compatible API (SGLang's native ``/generate``: ``native_protocol.py``).

Field policy, so clients get a precise 400 instead of silently different output:

- every field OpenAI documents is known; those that only carry metadata (``user``, ``store``,
  ``metadata``, ``service_tier``…) are accepted and ignored;
- those that would change the output in a way this server cannot honour (``functions``, ``logit_bias``,
  ``audio``, ``suffix``…) are rejected with 400 naming the field;
- anything else is an unknown field: 400 ``Unrecognized request argument supplied: <field>``.

Types are strict (``"max_tokens": "5"`` or ``true`` is a 400, not a coercion) and floats must be finite.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from sglite.runtime.prompts import prompt_batch
from sglite.runtime.sampling_params import LIMITS

INT64_MAX = 2**63 - 1
TokenId = Annotated[int, Field(ge=0, le=2**31 - 1)]
Count = Annotated[int, Field(ge=0, le=2**31 - 1)]

# A generic JSON object: what response_format {"type": "json_object"} constrains the output to.
JSON_OBJECT_SCHEMA: dict[str, Any] = {"type": "object"}


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, populate_by_name=True)


class StreamOptions(_StrictModel):
    include_usage: bool | None = None
    """Send a last chunk with ``usage`` (and empty ``choices``) before ``[DONE]``."""


class SamplingRequest(_StrictModel):
    """Fields shared by /v1/chat/completions and /v1/completions."""

    model: str | None = None
    """Accepted and echoed as the served model's name: one engine serves one model."""
    max_tokens: Count | None = None
    temperature: float | None = Field(None, **LIMITS["temperature"].field_bounds())
    top_p: float | None = Field(None, ge=0.0, le=LIMITS["top_p"].high)  # 0 is OpenAI's "most likely token": top_k=1
    n: int = Field(1, ge=1, le=128)
    stop: str | list[Annotated[str, Field(min_length=1)]] | None = Field(None, max_length=16)
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    frequency_penalty: float | None = Field(None, **LIMITS["frequency_penalty"].field_bounds())
    presence_penalty: float | None = Field(None, **LIMITS["presence_penalty"].field_bounds())
    stream: bool = False
    stream_options: StreamOptions | None = None
    # Metadata-only OpenAI fields: accepted, no effect here.
    user: str | None = None
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    # OpenAI fields this server cannot honour (rejected by the validator below when set).
    logit_bias: dict[str, float] | None = None
    # SGLang/vLLM extensions, sent by the openai SDK through ``extra_body``.
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    min_p: float | None = Field(None, **LIMITS["min_p"].field_bounds())
    repetition_penalty: float | None = Field(None, **LIMITS["repetition_penalty"].field_bounds())
    min_tokens: Count | None = None
    regex: str | None = None
    ebnf: str | None = None
    stop_token_ids: list[TokenId] | None = Field(None, max_length=256)
    ignore_eos: bool | None = None
    skip_special_tokens: bool | None = None

    @field_validator("logit_bias")
    @classmethod
    def _reject_unsupported(cls, value: Any, info: Any) -> Any:
        return _reject_if_set(value, info.field_name)

    def sampling_params(self, max_new_tokens: int | None) -> dict[str, Any]:
        """The engine's (SGLang-named) sampling parameters; None values are left to the engine's defaults."""
        params: dict[str, Any] = {
            "max_new_tokens": max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "frequency_penalty": self.frequency_penalty,
            "presence_penalty": self.presence_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_new_tokens": self.min_tokens,
            "stop": [self.stop] if isinstance(self.stop, str) else self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "skip_special_tokens": self.skip_special_tokens,
            "regex": self.regex,
            "ebnf": self.ebnf,
        }
        if self.top_p == 0.0:
            # OpenAI allows top_p=0 ("only the most likely token"); the engine needs top_p > 0.
            params["top_p"], params["top_k"] = None, 1
        if self.seed is not None:
            params["seed"] = self.seed % (INT64_MAX + 1)  # OpenAI seeds are any int64; ours are >= 0
        return {k: v for k, v in params.items() if v is not None}

    @property
    def include_usage_chunk(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def _reject_if_set(value: Any, field: str) -> Any:
    if value not in (None, [], {}, ""):
        raise ValueError(f"'{field}' is not supported by this server; remove it from the request")
    return value


# --------------------------------------------------------------------------- chat


class TextContentPart(_StrictModel):
    type: Literal["text"]
    text: str


class FunctionCall(_StrictModel):
    name: str = Field(min_length=1, max_length=256)
    arguments: str
    """The arguments as a JSON text (OpenAI's shape)."""


class ToolCall(_StrictModel):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(_StrictModel):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema; a call's arguments are generated under it."""
    strict: bool | None = None
    """Accepted; calls are always constrained to the schema."""


class Tool(_StrictModel):
    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoiceFunction(_StrictModel):
    name: str


class NamedToolChoice(_StrictModel):
    type: Literal["function"]
    function: NamedToolChoiceFunction


class ChatMessage(_StrictModel):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    """``developer`` is OpenAI's newer name for ``system`` and is templated as one."""
    content: str | list[TextContentPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[ToolCall] | None = None
    """An assistant turn's earlier calls (sent back by the client with their results)."""
    tool_call_id: str | None = None
    """A ``tool`` turn's answer to this call id."""

    @model_validator(mode="after")
    def _content_required(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"content is required for a {self.role} message")
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs tool_call_id")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def for_template(self) -> dict[str, Any]:
        """The message as chat templates read it (``developer`` templated as ``system``)."""
        message: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [call.model_dump() for call in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        return message


class JsonSchemaFormat(_StrictModel):
    name: str = Field(min_length=1, max_length=256)
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None
    """``true``: refuse (400, as OpenAI does) a schema with a keyword the grammar cannot enforce exactly.
    Otherwise such a keyword is relaxed and the choice reports ``schema_valid`` (and ``schema_error``)."""
    description: str | None = None


class ResponseFormat(_StrictModel):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Count | None = None
    """OpenAI's newer name for ``max_tokens``; wins when both are given."""
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    """Functions the model may call; a call is generated under its ``parameters`` schema."""
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """Default ``auto`` with tools; ``required`` and a named function force a call."""
    parallel_tool_calls: bool | None = None
    """Accepted; at most one call is made per choice."""
    reasoning_effort: str | None = None
    verbosity: str | None = None
    modalities: list[Literal["text"]] | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    prediction: Any = None
    web_search_options: Any = None

    @field_validator("functions", "function_call", "audio", "prediction", "web_search_options")
    @classmethod
    def _reject_unsupported_chat(cls, value: Any, info: Any) -> Any:
        return _reject_if_set(value, info.field_name)

    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def constraint(self) -> dict[str, Any]:
        """``{"json_schema": ...}`` for a JSON ``response_format``, else ``{}``."""
        fmt = self.response_format
        if fmt is None or fmt.type == "text":
            return {}
        if fmt.type == "json_object":
            return {"json_schema": JSON_OBJECT_SCHEMA}
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise ValueError("response_format of type 'json_schema' needs json_schema.schema")
        strict = {"strict": True} if fmt.json_schema.strict else {}
        return {"json_schema": fmt.json_schema.schema_, **strict}


# --------------------------------------------------------------------------- completions


class CompletionRequest(SamplingRequest):
    """POST /v1/completions."""

    prompt: (
        Annotated[str, Field(min_length=1)]
        | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1)]
        | Annotated[list[TokenId], Field(min_length=1)]
        | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]], Field(min_length=1)]
    )
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)
    """Legacy format: how many alternatives per position in ``top_logprobs``."""
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None

    @field_validator("suffix")
    @classmethod
    def _reject_suffix(cls, value: Any, info: Any) -> Any:
        return _reject_if_set(value, info.field_name)

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value: int | None, info: Any) -> int | None:
        if value is not None and value != info.data.get("n", 1):
            raise ValueError("'best_of' other than n is not supported (no server-side reranking); drop it")
        return value

    def prompts(self) -> list[str] | list[list[int]]:
        """The batch of prompts, whichever of the four OpenAI forms was sent."""
        prompts, _ = prompt_batch(self.prompt)
        return [p if isinstance(p, str) else list(p) for p in prompts]


# --------------------------------------------------------------------------- native /generate


# --------------------------------------------------------------------------- responses


class _Response(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="null")


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int] | None
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Response):
    content: list[ChatTokenLogprob] | None
    refusal: list[ChatTokenLogprob] | None = None


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    refusal: str | None = None
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str | None
    schema_valid: bool | None = Field(None, exclude_if=lambda v: v is None)
    """``json_schema`` response format only: the output validates against the full schema."""
    schema_error: str | None = Field(None, exclude_if=lambda v: v is None)
    """When ``schema_valid`` is false: the failing keyword, its JSON pointer in the schema, and why."""


def _now() -> int:
    return int(time.time())


class ChatCompletionResponse(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    """Only the keys that changed are sent, as OpenAI does (``{}`` on the finishing chunk)."""

    role: Literal["assistant"] | None = Field(None, exclude_if=lambda v: v is None)
    content: str | None = Field(None, exclude_if=lambda v: v is None)
    tool_calls: list[dict[str, Any]] | None = Field(None, exclude_if=lambda v: v is None)


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    schema_valid: bool | None = Field(None, exclude_if=lambda v: v is None)
    """On the finishing chunk of a ``json_schema`` response format (see ``ChatChoice``)."""
    schema_error: str | None = Field(None, exclude_if=lambda v: v is None)


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class CompletionResponse(_Response):
    """Both the whole response and each streamed chunk (OpenAI uses one shape for both)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=_now)
    model: str
    system_fingerprint: str | None = None
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=_now)
    owned_by: str = "sglite"
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
