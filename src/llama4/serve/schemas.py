"""OpenAI request and response shapes (pydantic only; no behaviour).

Requests accept what the OpenAI API accepts and ignore fields we do not implement (``user``,
``service_tier``, ...), as other OpenAI-compatible servers do, so that stock clients work. Values are
range-checked here, so a bad value is a 400 naming the field before anything reaches the engine.
Responses are built with these models and dumped with ``exclude_none`` where OpenAI omits fields.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


# -- requests ------------------------------------------------------------------------------------------


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "ipython"]
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class JsonSchemaFormat(_Lenient):
    name: str = "response"
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JsonSchemaFormat | None = None


MAX_STOPS, MAX_STOP_CHARS = 64, 1024


class _SamplingFields(_Lenient):
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)  # a signed 64-bit integer, as OpenAI's
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @field_validator("logit_bias")
    @classmethod
    def _token_biases(cls, value):
        """OpenAI: token ids (as JSON object keys) to a bias in [-100, 100] added to the token's logit."""
        if value is None:
            return value
        for key, bias in value.items():
            digits = key.strip()
            if not (digits.isascii() and digits.isdigit() and len(digits) <= 9):
                raise ValueError(f"logit_bias keys must be token ids (non-negative integers), got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"logit_bias values must be in [-100, 100], got {bias} for token {key}")
        return value

    @property
    def bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(k), float(v)) for k, v in (self.logit_bias or {}).items())

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, value):
        """OpenAI allows 4 stop sequences; clients written for vLLM (no limit) send more, e.g. lm-eval's
        task stops plus an end-of-turn string. The bound only keeps the per-token stop check cheap."""
        stops = [value] if isinstance(value, str) else value
        if stops is not None and len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
        if stops is not None and any(len(stop) > MAX_STOP_CHARS for stop in stops):
            raise ValueError(f"a stop sequence may have at most {MAX_STOP_CHARS} characters")
        return value

    @property
    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    # vLLM's extensions: a last message the model continues (e.g. a prefilled start of the reply)
    add_generation_prompt: bool = True
    continue_final_message: bool = False

    @model_validator(mode="after")
    def _continuation(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message continues the last message: send it with "
                             "add_generation_prompt: false")
        return self

    @property
    def token_budget(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=0)  # the OpenAI default for legacy completions
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _nothing_to_do(self):
        if self.max_tokens == 0 and not self.echo:
            raise ValueError("max_tokens 0 generates nothing: it needs echo (the prompt back, scored with logprobs)")
        return self

    @property
    def prompt_logprobs(self) -> int | None:
        """How many alternatives to give beside each prompt token's logprob (echo with logprobs, or scoring
        with max_tokens 0, as lm-eval's loglikelihood requests do); None: the prompt is not scored."""
        if self.echo and (self.logprobs is not None or self.max_tokens == 0):
            return self.logprobs or 0
        return None

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value):
        if value:
            raise ValueError("suffix (insertion) is not supported: this model only continues text")
        return value

    @field_validator("best_of")
    @classmethod
    def _best_of_is_n(cls, value, info):
        n = info.data.get("n", 1)
        if value is not None and value != n:
            raise ValueError(f"best_of other than n is not supported (got best_of {value}, n {n}): ask for n "
                             "choices and pick among them")
        return value

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Lenient):
    """vLLM's /tokenize: a prompt, or chat messages rendered with the chat template."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None  # prompt: begin-of-text first (default yes); messages: no effect
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    @field_validator("messages")
    @classmethod
    def _some_messages(cls, value):
        if value is not None and not value:
            raise ValueError("messages must not be empty")
        return value


class DetokenizeRequest(_Lenient):
    model: str | None = None
    tokens: list[int]


# -- responses -----------------------------------------------------------------------------------------


def _fingerprint() -> str:
    """OpenAI's system_fingerprint: names the serving code (this package's version), so a client can tell
    that the backend changed between two replies."""
    try:
        version = importlib.metadata.version("llama4")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return "fp_" + hashlib.sha256(f"llama4 {version}".encode()).hexdigest()[:10]


SYSTEM_FINGERPRINT = _fingerprint()


class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = []


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None = None


class FunctionCall(BaseModel):
    name: str | None = None
    arguments: str | None = None


class ToolCall(BaseModel):
    index: int | None = None  # only in stream deltas
    id: str | None = None
    type: Literal["function"] | None = "function"
    function: FunctionCall


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    choices: list[ChatChoice]
    usage: Usage


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    choices: list[ChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str] = []
    token_logprobs: list[float | None] = []  # an echoed prompt's first token: null
    top_logprobs: list[dict[str, float] | None] | None = None
    text_offset: list[int] = []


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    system_fingerprint: str | None = SYSTEM_FINGERPRINT
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "llama4"
    max_context: int | None = None
    root: str | None = None  # (vLLM's) a LoRA adapter's path
    parent: str | None = None  # (vLLM's) a LoRA adapter's base model


class LoadLoraAdapterRequest(_Lenient):
    """vLLM's POST /v1/load_lora_adapter."""

    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Lenient):
    """vLLM's POST /v1/unload_lora_adapter."""

    lora_name: str = Field(min_length=1)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody
