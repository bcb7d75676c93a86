"""Tool calling: tool definitions into the prompt, and the model's output back into OpenAI tool calls.

Prompt side (parity target: the chat template embedded in transformers 5.23's processing_llama4.py):
the tool definitions are dumped as JSON (indent 4), each followed by a blank line, after a fixed
instruction paragraph. The paragraphs below are that template's literal text, including the
sentences joined without a space ("...its value}.Do not use variables."; in the system variant also
"...function call.Respond in the format..."), so that prompts match the template exactly.

Output side: :func:`parse_assistant_output` / :func:`parse_tool_calls` recognise the shapes Llama 4
instruct models (and fine-tunes) actually emit; see tool_parsing.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from .tool_parsing import AssistantOutput, new_call_id, parse_assistant_output, parse_tool_calls

__all__ = [
    "AssistantOutput",
    "TOOLS_IN_SYSTEM_INSTRUCTIONS",
    "TOOLS_IN_USER_INSTRUCTIONS",
    "new_call_id",
    "parse_assistant_output",
    "parse_tool_calls",
    "render_tool_definitions",
    "render_tool_call",
]

_RESPOND_FORMAT = (
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
)

TOOLS_IN_USER_INSTRUCTIONS = (
    "Given the following functions, please respond with a JSON for a function call "
    "with its proper arguments that best answers the given prompt.\n\n"
    + _RESPOND_FORMAT
    + "Do not use variables.\n\n"
)
"""Opening of the first user turn when tools are given (``tools_in_user_message=True``, the default)."""

TOOLS_IN_SYSTEM_INSTRUCTIONS = (
    "You have access to the following functions. To call a function, please respond with JSON for a "
    "function call." + _RESPOND_FORMAT + "Do not use variables.\n\n"
)
"""Paragraph put in the system turn when ``tools_in_user_message=False``."""

ENVIRONMENT_LINE = "Environment: ipython\n"
"""First line of the system turn whenever tools are given and a system message exists."""


def render_tool_definitions(tools: Sequence[dict]) -> str:
    """Each tool schema as 4-space-indented JSON followed by a blank line (non-ASCII kept as is)."""
    out = []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise ValueError(
                f"tools[{k}] is a {type(tool).__name__}; each tool must be a JSON-schema dict such as "
                '{"type": "function", "function": {"name": ..., "description": ..., "parameters": {...}}}'
            )
        out.append(json.dumps(tool, ensure_ascii=False, indent=4) + "\n\n")
    return "".join(out)


def render_tool_call(call: dict, index: int = 0) -> str:
    """One assistant tool call as ``{"name": "<fn>", "parameters": <arguments as JSON>}``.

    Accepts the OpenAI shape ``{"type": "function", "function": {"name", "arguments"}}`` (or the
    inner dict alone); ``arguments`` may be a dict or a JSON string, which is decoded first so the
    model sees an object, not a quoted string.
    """
    fn = call.get("function", call) if isinstance(call, dict) else None
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str) or not name:
        raise ValueError(
            f"tool_calls[{index}] must look like "
            '{"type": "function", "function": {"name": str, "arguments": dict or JSON string}}; '
            f"got {call!r}"
        )
    args = fn.get("arguments", fn.get("parameters", {}))
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError as e:
            raise ValueError(f"tool_calls[{index}] ({name}): arguments is not valid JSON: {e}") from None
    return '{"name": "' + name + '", "parameters": ' + json.dumps(args, ensure_ascii=False) + "}"
