"""OpenAI requests into engine requests, and engine events back into OpenAI fields.

Kept apart from the routes so that the mapping (messages -> prompt, parameters -> sampling, tool and
``response_format`` handling, logprob shapes) reads in one place and the HTTP layer only moves bytes.
Everything here may raise :class:`~llama4.serve.errors.APIError`. The only network access is fetching
image URLs, and only on a server started with ``--allow-remote-images`` (remote_images.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from llama4.checkpoint.generation_config import GenerationDefaults
from llama4.inference.constrained import JsonConstraint, SchemaError
from llama4.inference.requests import ContextTooLong, GenerationRequest, PromptEvent, TokenEvent
from llama4.inference.sampling import SamplingParams
from llama4.inference.text import prepare_messages
from llama4.prompt import ImageError, Tokenizer, parse_assistant_output
from llama4.prompt.tool_parsing import new_call_id
from llama4.serve.errors import APIError, bad_request
from llama4.serve.limits import LimitExceeded, ServeLimits
from llama4.serve.remote_images import BUSY_TEXT, RemoteImageFetcher
from llama4.serve.schemas import (
    ChatCompletionRequest,
    ChoiceLogprobs,
    CompletionLogprobs,
    CompletionRequest,
    FunctionCall,
    TokenLogprob,
    ToolCall,
    TopLogprob,
)
from llama4.serve.tool_stream import cut_reply


@dataclass
class Plan:
    """Everything needed to submit a request's choices to the engine and to shape the replies."""

    prompts: list[list[int]]  # one per prompt (chat: exactly one)
    pixel_values: torch.Tensor | None = None
    tools: list[dict] | None = None  # rendered into the prompt and parsed back out of the reply
    constraint: JsonConstraint | None = None  # compiled once; each choice gets a copy
    echo_texts: list[str] = field(default_factory=list)

    def requests(self, req: ChatCompletionRequest | CompletionRequest, logprobs: int | None,
                 defaults: GenerationDefaults = GenerationDefaults()) -> list[GenerationRequest]:
        """One engine request per choice, prompt-major: choice index = prompt index * n + j. ``defaults``: the
        checkpoint's sampling settings, for the fields the request does not set."""
        temperature, top_p = (getattr(req, name) if name in req.model_fields_set or getattr(defaults, name) is None
                              else getattr(defaults, name) for name in ("temperature", "top_p"))
        out = []
        for prompt in self.prompts:
            for j in range(req.n):
                seed = None if req.seed is None else req.seed + j
                params = SamplingParams(temperature=temperature, top_p=top_p, seed=seed, logprobs=logprobs,
                                        frequency_penalty=req.frequency_penalty, presence_penalty=req.presence_penalty,
                                        logit_bias=req.bias_pairs)
                out.append(GenerationRequest(prompt, self.pixel_values, params, req.token_budget, req.stop_strings,
                                             constraint=self.constraint.copy() if self.constraint else None,
                                             prompt_logprobs=getattr(req, "prompt_logprobs", None)))
        return out


def _message_dicts(req: ChatCompletionRequest) -> list[dict]:
    messages = []
    for m in req.messages:
        d = m.model_dump(exclude_none=True)
        if d["role"] == "developer":  # OpenAI's newer name for the system role
            d["role"] = "system"
        messages.append(d)
    return messages


def plan_chat(req: ChatCompletionRequest, tokenizer: Tokenizer, has_vision: bool, limits: ServeLimits = ServeLimits(),
              fetcher: RemoteImageFetcher | None = None, max_context: int | None = None,
              checkpoint: Callable[[], None] | None = None) -> Plan:
    """Messages (images decoded, tools rendered) -> prompt ids and the constraint for the reply.

    The checks that cost little come first (limits, tools, the schema's size), then the schema is compiled,
    then images: counted, fetched (http(s) URLs, only with a ``fetcher``; otherwise refused, as are file
    paths), their headers read and the prompt they would make measured against ``max_context``, and only
    then decoded. ``checkpoint()`` is called between the costly steps; it raises to stop (client gone).
    """
    messages = _message_dicts(req)
    tools = _active_tools(req)
    constraint = _constraint_for(req, tools, tokenizer, limits)
    images = sum(1 for m in messages if isinstance(m.get("content"), list)
                 for part in m["content"] if isinstance(part, dict) and part.get("type") in ("image", "image_url"))
    if images and not has_vision:
        raise bad_request("this model has no vision encoder: it cannot take images", param="messages")
    if images > limits.max_images:
        raise APIError(400, f"the messages hold {images} images; this server takes at most {limits.max_images} per "
                            "request (its --max-images)", param="messages", code="limit_exceeded")

    def render(prepared: list[dict]) -> list[int]:
        try:
            prompt = tokenizer.apply_chat_template(prepared, add_generation_prompt=req.add_generation_prompt,
                                                   continue_final_message=req.continue_final_message, tools=tools)
        except ValueError as e:
            raise bad_request(f"cannot render the messages: {e}", param="messages") from None
        if max_context is not None and len(prompt) >= max_context:
            raise APIError(400, str(ContextTooLong(len(prompt), max_context)), param="messages",
                           code="context_length_exceeded")
        return prompt

    try:
        if fetcher is not None and images:
            messages = fetcher.inline(messages)
        if checkpoint is not None:
            checkpoint()
        prepared, pixel_values = prepare_messages(messages, max_pixels=limits.max_image_pixels,
                                                  before_decoding=render if images else None, checkpoint=checkpoint)
    except ImageError as e:
        if str(e) == BUSY_TEXT:
            raise APIError(503, BUSY_TEXT, "server_error", code="busy", headers={"Retry-After": "1"}) from None
        raise bad_request(f"bad image: {e}", param="messages", code="invalid_image") from None
    return Plan([render(prepared)], pixel_values, tools, constraint)


def _active_tools(req: ChatCompletionRequest) -> list[dict] | None:
    if not req.tools or req.tool_choice == "none":
        return None
    for k, tool in enumerate(req.tools):
        fn = tool.get("function")
        if tool.get("type", "function") != "function" or not isinstance(fn, dict) or not fn.get("name"):
            raise bad_request(f"tools[{k}] must be {{'type': 'function', 'function': {{'name': ..., ...}}}}",
                              param=f"tools[{k}]")
        if not isinstance(fn["name"], str):
            raise bad_request(f"tools[{k}].function.name must be a string, got {type(fn['name']).__name__}",
                              param=f"tools[{k}].function.name")
        if not isinstance(fn.get("parameters", {}), (dict, type(None))):
            raise bad_request(f"tools[{k}].function.parameters must be a JSON schema object",
                              param=f"tools[{k}].function.parameters")
    return list(req.tools)


def _forced_tool_schema(req: ChatCompletionRequest, tools: list[dict]) -> dict | None:
    """For tool_choice 'required' or a named function: the JSON shape the reply must take.

    The shape is the one the tool instructions in the prompt ask for, ``{"name": ..., "parameters": {...}}``,
    with each function's own parameter schema, so the reply always parses into a valid call.
    """
    choice = req.tool_choice
    if choice in (None, "auto"):
        return None
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if choice == "required":
        names = list(by_name)
    elif isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        name = choice["function"].get("name")
        if not isinstance(name, str) or name not in by_name:
            shown = f"'{name}'" if isinstance(name, str) else json.dumps(name)[:80]
            raise bad_request(f"tool_choice names {shown}, which is not among the tools "
                              f"{sorted(by_name)}", param="tool_choice")
        names = [name]
    else:
        raise bad_request("tool_choice must be 'none', 'auto', 'required' or "
                          "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    calls = [{"type": "object", "properties": {"name": {"const": name},
                                               "parameters": by_name[name].get("parameters") or {"type": "object"}},
              "required": ["name", "parameters"], "additionalProperties": False} for name in names]
    return calls[0] if len(calls) == 1 else {"anyOf": calls}


def _constraint_for(req: ChatCompletionRequest, tools: list[dict] | None, tokenizer: Tokenizer,
                    limits: ServeLimits) -> JsonConstraint | None:
    """The reply's JSON constraint, compiled (its choices get copies): a forced tool call, else
    ``response_format``, else None. A schema over the limits is refused before it is compiled."""
    schema = _forced_tool_schema(req, tools) if tools is not None else None
    param = "tools"
    if schema is None:
        fmt = req.response_format
        if fmt is None or fmt.type == "text":
            return None
        param = "response_format"
        if fmt.type == "json_schema":
            if fmt.json_schema is None or fmt.json_schema.schema_ is None:
                raise bad_request("response_format json_schema needs {'json_schema': {'name': ..., 'schema': {...}}}",
                                  param=param)
            schema = fmt.json_schema.schema_
    try:
        if schema is not None:
            limits.check_schema(schema, param)
        return JsonConstraint(tokenizer, schema)
    except LimitExceeded as e:
        raise APIError(400, str(e), param=e.param, code="limit_exceeded") from None
    except SchemaError as e:
        raise bad_request(f"unsupported JSON schema: {e}", param=param) from None


def plan_completion(req: CompletionRequest, tokenizer: Tokenizer) -> Plan:
    prompt = req.prompt
    if isinstance(prompt, str):
        prompts = [prompt]
    elif prompt and all(isinstance(p, int) for p in prompt):
        prompts = [list(prompt)]
    else:
        prompts = list(prompt)
    if not prompts:
        raise bad_request("prompt is empty", param="prompt")
    for k, p in enumerate(prompts):
        bad = next((t for t in p if not 0 <= t < tokenizer.vocab_size), None) if not isinstance(p, str) else None
        if bad is not None:
            raise bad_request(f"prompt token id {bad} is outside the vocabulary [0, {tokenizer.vocab_size})",
                              param="prompt" if len(prompts) == 1 else f"prompt[{k}]")
    ids = [tokenizer.encode(p, bos=True) if isinstance(p, str) else list(p) for p in prompts]
    echo = [p if isinstance(p, str) else tokenizer.decode(p, skip_special=True) for p in prompts] if req.echo else []
    return Plan(ids, echo_texts=echo)


_IDENTIFIER = re.compile(r"[A-Za-z_][\w.-]*")


def may_be_tool_call(text: str) -> bool | None:
    """Whether a reply that begins with ``text`` may begin with a tool call (None: cannot tell yet).

    Calls open with ``[``, ``{``, a code fence, ``<function=`` or ``name(`` (names may be dotted or
    hyphenated); a reply that opens any other way opens with prose, though calls may follow it (see
    ``tool_stream.prose_prefix_length`` for how much of a reply is certainly prose).
    """
    head = text.lstrip()
    if not head:
        return None
    if head[0] in "[{`<":
        return True
    name = _IDENTIFIER.match(head)
    if name is None:
        return False
    rest = head[name.end():].lstrip()
    return None if not rest else rest[0] == "("


def tool_calls_of(text: str, tools: list[dict] | None, cut_short: bool = False
                  ) -> tuple[str | None, list[ToolCall] | None]:
    """The reply's prose and its parsed tool calls (None when the reply is not a call). ``cut_short`` (the
    token budget ran out): a reply that stops inside a call gives the calls up to it, that one with the
    arguments written so far, and the prose before them (tool_stream.cut_reply)."""
    if tools is None:
        return text, None
    cut = cut_reply(text, tools) if cut_short else None
    if cut:
        calls, prose = cut
        return prose, [ToolCall(index=k, id=new_call_id(), function=FunctionCall(
            name=name, arguments=json.dumps(args, ensure_ascii=False))) for k, (name, args) in enumerate(calls)]
    parsed = parse_assistant_output(text, tools=tools)
    if not parsed.tool_calls:
        return text, None
    calls = [ToolCall(index=k, id=c["id"], function=FunctionCall(**c["function"]))
             for k, c in enumerate(parsed.tool_calls)]
    return parsed.content, calls


def chat_logprobs(tokenizer: Tokenizer, events: Sequence[TokenEvent]) -> ChoiceLogprobs:
    def entry(token: int, logprob: float) -> dict:
        return {"token": tokenizer.decode([token]), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}

    return ChoiceLogprobs(content=[
        TokenLogprob(**entry(e.token, e.logprob), top_logprobs=[TopLogprob(**entry(t, lp)) for t, lp in e.top or []])
        for e in events if e.logprob is not None
    ])


def completion_logprobs(tokenizer: Tokenizer, events: Sequence[TokenEvent], offset: int,
                        prompt: tuple[Sequence[int], PromptEvent] | None = None) -> CompletionLogprobs:
    """The legacy completions' logprobs of ``events`` whose text starts at character ``offset``; with
    ``prompt`` (its ids and their PromptEvent) the prompt's tokens first, from offset 0 (echo): the first
    token's logprob and alternatives are null, as in vLLM; special tokens take no characters of the text."""
    out = CompletionLogprobs(top_logprobs=[])
    if prompt is not None:
        ids, scored = prompt
        at = 0
        for j, (token, logprob, top) in enumerate(zip(ids, scored.logprobs, scored.top)):
            out.tokens.append(tokenizer.decode([token]))
            out.token_logprobs.append(logprob)
            if j == 0:
                out.top_logprobs.append(None)
            else:
                alternatives = {tokenizer.decode([t]): lp for t, lp in top or []}
                alternatives.setdefault(out.tokens[-1], logprob)
                out.top_logprobs.append(alternatives)
            out.text_offset.append(at)
            at += len(tokenizer.decode([token], skip_special=True))
    for e in events:
        if e.logprob is None:
            continue
        out.tokens.append(tokenizer.decode([e.token]))
        out.token_logprobs.append(e.logprob)
        top = {tokenizer.decode([t]): lp for t, lp in e.top or []}
        top.setdefault(out.tokens[-1], e.logprob)  # the chosen token too, as vLLM (logprobs 0: it alone)
        out.top_logprobs.append(top)
        out.text_offset.append(offset)
        offset += len(e.text)
    return out
