"""The request shape of OpenAI's Responses API (``POST /v1/responses``; pydantic only, no behaviour).

Only the fields the server acts on are typed; the ones it refuses (``previous_response_id``, ``background``,
``include``, ``reasoning``, ``conversation``, ...) are read loosely here and refused, naming them, in
responses.py, so the client learns which field it was rather than meeting a pydantic type error. Fields
that change nothing for a server without storage or service tiers (``service_tier``, ``prompt_cache_key``,
``safety_identifier``, ``stream_options``) are ignored, as schemas.py ignores ``user`` and the like.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class TextFormat(_Lenient):
    """``text.format``: plain text, any JSON object, or JSON that matches ``schema``."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class TextConfig(_Lenient):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # echoed; the model has no such control


MAX_METADATA_PAIRS, MAX_METADATA_KEY, MAX_METADATA_VALUE = 16, 64, 512  # OpenAI's limits


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: str | list[Any] | None = None
    instructions: str | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    max_tool_calls: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    store: bool | None = None  # accepted; nothing is ever stored
    parallel_tool_calls: bool | None = None
    # refused (responses.py says why), read loosely so that the refusal names the field:
    previous_response_id: Any = None
    background: Any = None
    include: Any = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    truncation: Any = None
    top_logprobs: Any = None

    @field_validator("metadata")
    @classmethod
    def _bounded_metadata(cls, value):
        if value is None:
            return value
        if len(value) > MAX_METADATA_PAIRS:
            raise ValueError(f"at most {MAX_METADATA_PAIRS} metadata pairs are allowed, got {len(value)}")
        for key, item in value.items():
            if len(key) > MAX_METADATA_KEY or len(item) > MAX_METADATA_VALUE:
                raise ValueError(f"metadata keys may have at most {MAX_METADATA_KEY} characters and values "
                                 f"{MAX_METADATA_VALUE}")
        return value
