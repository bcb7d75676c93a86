"""OpenAI's Responses API, ``POST /v1/responses``, as a mapping onto the chat path (no second pipeline).

A Responses request becomes a :class:`~llama4.serve.schemas.ChatCompletionRequest` (n=1):

* ``instructions`` -> a system message first; ``input`` (a string: one user message; or items) -> messages:
  message items (roles user / system / developer / assistant; content a string or ``input_text`` /
  ``input_image`` / ``output_text`` / ``refusal`` parts), ``function_call`` items -> the assistant's
  ``tool_calls`` (joined onto the assistant message just before them, as one turn), ``function_call_output``
  items -> tool messages;
* ``tools`` (flat function tools) -> chat tools; ``tool_choice`` (``{"type": "function", "name"}`` too);
  ``text.format`` -> ``response_format``; ``max_output_tokens`` -> ``max_completion_tokens``;
  ``temperature`` and ``top_p`` as they are.

It is planned with :func:`translate.plan_chat` and run with :class:`Choices`, as /v1/chat/completions does,
so the same prompt gives the same text on both routes. With tools, the reply is split into prose and function
calls by :class:`~llama4.serve.tool_stream.ToolReplyStream`, the split of /v1/chat/completions' streams, which
ends where :func:`translate.tool_calls_of` does; the output items follow the reply's order (prose, calls,
prose after them), and ``max_tool_calls`` and ``parallel_tool_calls: false`` keep the first calls only.
A non-streamed response is the one its stream would end with had the reply arrived at once, so the two
match. Errors from the chat path name the Responses field (``input``, ``text.format``).

``store`` is accepted, but nothing is ever stored (the response says ``"store": false``), so what needs
storage is refused with a 400 naming the field: ``previous_response_id``, ``conversation``, ``background``,
``prompt`` (stored templates), ``item_reference`` items. So are ``reasoning`` with an effort (the model does
not reason), ``include`` values that cannot be filled (all but ``reasoning.encrypted_content``: there are no
reasoning items to include), ``top_logprobs``, ``truncation: "auto"`` and tool types other than ``function``.
``text.verbosity`` is echoed and has no effect.

Streaming sends the Responses events (``event:`` and ``data:`` lines, ``sequence_number`` counting from 0):
``response.created``, ``response.in_progress``, then per output item ``response.output_item.added``, for a
message ``response.content_part.added``, ``response.output_text.delta``... , ``response.output_text.done``,
``response.content_part.done``, for a call ``response.function_call_arguments.delta``... ,
``response.function_call_arguments.done``, and ``response.output_item.done``; last ``response.completed``
(``response.incomplete`` when the token budget ran out) with the whole response. Text goes out as the engine
makes it; with tools, prose streams while it is certainly prose and calls as they are written
(tool_stream.py), each item closed before the next opens. A failure after the stream began is an ``error``
event, and the stream ends.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import Response, StreamingResponse
from pydantic import ValidationError

from llama4.checkpoint.generation_config import GenerationDefaults
from llama4.inference.requests import FinishEvent, TokenEvent
from llama4.serve import translate
from llama4.serve.errors import APIError, bad_request, logger, server_error, validation_error
from llama4.serve.limits import ServeLimits
from llama4.serve.responses_schemas import ResponsesRequest
from llama4.serve.schemas import ChatCompletionRequest, ToolCall
from llama4.serve.streams import Choices, failure_of, unless_disconnected, watch_disconnect
from llama4.serve.tool_stream import ToolReplyStream

if TYPE_CHECKING:
    from llama4.inference.engine import Engine
    from llama4.prompt import Tokenizer
    from llama4.serve.engine_process import EngineProcess
    from llama4.serve.remote_images import RemoteImageFetcher
    from llama4.serve.request_reader import RequestReader

FILLABLE_INCLUDES = ("reasoning.encrypted_content",)  # there are never reasoning items: nothing to add
MESSAGE_ROLES = ("user", "system", "developer", "assistant")


def add_responses_routes(app: FastAPI, engine: Engine | EngineProcess, tokenizer: Tokenizer, model_id: str,
                         reader: RequestReader, limits: ServeLimits, fetcher: RemoteImageFetcher | None,
                         defaults: GenerationDefaults = GenerationDefaults()) -> None:
    """/v1/responses, streamed or not; responses name the model ``model_id`` (arguments as app.py's
    ``_add_generation_routes``)."""
    @app.post("/v1/responses")
    async def responses(request: Request):
        req: ResponsesRequest = await reader.read(request, ResponsesRequest)
        adapter = reader.adapter_of(req.model)
        chat = chat_request(req)
        with responses_terms():
            async with watch_disconnect(request) as checkpoint:
                plan = await run_in_threadpool(translate.plan_chat, chat, tokenizer, engine.has_vision, limits,
                                               fetcher, engine.max_context, checkpoint)
            requests = plan.requests(chat, None, defaults)
            for r in requests:
                r.adapter = adapter
            choices = Choices(engine, requests)
        reply = ResponseReply(req, chat, plan, adapter or model_id, choices)
        if req.stream:
            return _sse(reply.stream())
        return _json(await unless_disconnected(request, choices, reply.collect()))


# -- the request ---------------------------------------------------------------------------------------


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The chat request that serves ``req`` (after refusing what cannot be served)."""
    refuse_unsupported(req)
    tools = chat_tools(req.tools)
    fields: dict[str, Any] = {"messages": chat_messages(req), "n": 1, "max_completion_tokens": req.max_output_tokens,
                              "tools": tools, "tool_choice": chat_tool_choice(req.tool_choice, bool(tools)),
                              "response_format": response_format(req)}
    if req.temperature is not None:
        fields["temperature"] = req.temperature
    if req.top_p is not None:
        fields["top_p"] = req.top_p
    try:
        return ChatCompletionRequest.model_validate(fields)
    except ValidationError as e:
        raise bad_request(f"the input does not make a chat: {validation_error(e).message}", param="input") from None


def _refused(param: str, why: str) -> APIError:
    return bad_request(f"'{param}' is not supported: {why}", param=param, code="unsupported_parameter")


def refuse_unsupported(req: ResponsesRequest) -> None:
    """A 400 naming the first field asked for that this server cannot honour (never silently ignored)."""
    whole = "send the whole conversation as input"
    if req.previous_response_id is not None:
        raise _refused("previous_response_id", f"this server stores no responses; {whole}")
    if req.conversation is not None:
        raise _refused("conversation", f"this server stores no conversations; {whole}")
    if req.background not in (None, False):
        raise _refused("background", "background responses need storage, which this server does not have")
    if req.prompt is not None:
        raise _refused("prompt", "this server stores no prompt templates; send instructions and input")
    _refuse_reasoning(req.reasoning)
    _refuse_includes(req.include)
    if req.truncation not in (None, "disabled"):
        raise _refused("truncation", "input is never truncated; a conversation longer than the context is refused")
    if req.top_logprobs not in (None, 0):
        raise _refused("top_logprobs", "logprobs are served on /v1/chat/completions, not here")


def _refuse_reasoning(reasoning) -> None:
    if reasoning is None:
        return
    effort = reasoning.get("effort") if isinstance(reasoning, dict) else reasoning
    if effort not in (None, "none"):
        raise _refused("reasoning", f"this model does not reason, so it takes no reasoning effort ({effort!r})")


def _refuse_includes(include) -> None:
    if include is None:
        return
    if not isinstance(include, list) or not all(isinstance(v, str) for v in include):
        raise bad_request("include must be a list of strings", param="include")
    unfilled = [v for v in include if v not in FILLABLE_INCLUDES]
    if unfilled:
        raise _refused("include", f"this server cannot include {', '.join(repr(v) for v in unfilled)}")


def chat_messages(req: ResponsesRequest) -> list[dict]:
    """``instructions`` and ``input`` as chat messages."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions is not None else []
    if isinstance(req.input, str):
        messages.append({"role": "user", "content": req.input})
    else:
        for k, item in enumerate(req.input or []):
            _add_item(messages, item, f"input[{k}]")
    if not messages:
        raise bad_request("the request has no input (and no instructions)", param="input")
    return messages


def _add_item(messages: list[dict], item, where: str) -> None:
    if not isinstance(item, dict):
        raise bad_request(f"{where} must be an object: a message, function_call or function_call_output item",
                          param=where)
    kind = item.get("type", "message")
    if kind == "message":
        messages.append(_message(item, where))
    elif kind == "function_call":
        _add_call(messages, item, where)
    elif kind == "function_call_output":
        messages.append(_tool_result(item, where))
    elif kind == "item_reference":
        raise _refused(f"{where}.type", "this server stores no items to refer to; send the item itself")
    else:
        raise bad_request(f"{where} is a {kind!r} item; this server takes message, function_call and "
                          "function_call_output items", param=f"{where}.type")


def _string(item: dict, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise bad_request(f"{where}.{key} must be a string", param=f"{where}.{key}")
    return value


def _message(item: dict, where: str) -> dict:
    role = item.get("role")
    if role not in MESSAGE_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(MESSAGE_ROLES)}, got {role!r}",
                          param=f"{where}.role")
    content = item.get("content")
    if isinstance(content, str):
        return {"role": role, "content": content}
    if not isinstance(content, list):
        raise bad_request(f"{where}.content must be a string or a list of content parts", param=f"{where}.content")
    return {"role": role, "content": [_part(part, f"{where}.content[{j}]") for j, part in enumerate(content)]}


def _part(part, where: str) -> dict:
    """A Responses content part as a chat one (text parts; images as image_url parts)."""
    kind = part.get("type") if isinstance(part, dict) else None
    if kind in ("input_text", "output_text", "text"):
        return {"type": "text", "text": _string(part, "text", where)}
    if kind == "refusal":
        return {"type": "text", "text": _string(part, "refusal", where)}
    if kind == "input_image":
        if part.get("image_url") is None and part.get("file_id") is not None:
            raise bad_request(f"{where}: this server stores no files; send the image as image_url (a data: URL)",
                              param=f"{where}.file_id")
        return {"type": "image_url", "image_url": {"url": _string(part, "image_url", where)}}
    raise bad_request(f"{where} has type {kind!r}; this server takes input_text, input_image and output_text parts",
                      param=f"{where}.type")


def _add_call(messages: list[dict], item: dict, where: str) -> None:
    """A function_call item as a tool call of the assistant turn it belongs to: the assistant message just
    before it (its text, or the calls before it), else a new one."""
    call = {"id": _string(item, "call_id", where), "type": "function",
            "function": {"name": _string(item, "name", where), "arguments": _string(item, "arguments", where)}}
    if messages and messages[-1]["role"] == "assistant":
        messages[-1].setdefault("tool_calls", []).append(call)
    else:
        messages.append({"role": "assistant", "content": None, "tool_calls": [call]})


def _tool_result(item: dict, where: str) -> dict:
    output = item.get("output")
    if isinstance(output, list):
        parts = [_part(part, f"{where}.output[{j}]") for j, part in enumerate(output)]
        if any(part["type"] != "text" for part in parts):
            raise bad_request(f"{where}.output: a tool result is text here; send images in a user message",
                              param=f"{where}.output")
        output = "".join(part["text"] for part in parts)
    if not isinstance(output, str):
        raise bad_request(f"{where}.output must be a string or a list of input_text parts", param=f"{where}.output")
    return {"role": "tool", "tool_call_id": _string(item, "call_id", where), "content": output}


def chat_tools(tools: list | None) -> list[dict] | None:
    """Flat Responses function tools as chat tools; any other tool type is a 400 naming them all."""
    if tools is None:
        return None
    out, others = [], []
    for k, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise bad_request(f"tools[{k}] must be an object", param=f"tools[{k}]")
        if tool.get("type") != "function":
            others.append((k, tool.get("type")))
            continue
        if not isinstance(tool.get("name"), str) or not tool["name"]:
            raise bad_request(f"tools[{k}].name must be a non-empty string", param=f"tools[{k}].name")
        out.append({"type": "function", "function": {key: tool[key] for key in
                                                     ("name", "description", "parameters", "strict")
                                                     if tool.get(key) is not None}})
    if others:
        names = ", ".join(repr(kind) for _, kind in others)
        raise bad_request(f"tool type {names} is not supported: this server offers only function tools "
                          "(type 'function'), which the client runs", param=f"tools[{others[0][0]}].type",
                          code="unsupported_tool_type")
    return out


def chat_tool_choice(choice: str | dict | None, has_tools: bool) -> str | dict | None:
    if choice in (None, "auto", "none"):
        return choice
    forced = choice == "required" or (isinstance(choice, dict) and choice.get("type") == "function")
    if forced and not has_tools:
        raise bad_request("tool_choice forces a function call, but the request has no function tools",
                          param="tool_choice")
    if choice == "required":
        return choice
    if forced:
        name = choice.get("name")
        if not isinstance(name, str):
            raise bad_request("tool_choice {'type': 'function'} needs a 'name'", param="tool_choice.name")
        return {"type": "function", "function": {"name": name}}
    shown = repr(choice.get("type")) if isinstance(choice, dict) else repr(choice)
    raise bad_request(f"tool_choice {shown} is not supported: use 'auto', 'none', 'required' or "
                      "{'type': 'function', 'name': ...}", param="tool_choice")


def response_format(req: ResponsesRequest) -> dict | None:
    """``text.format`` as the chat ``response_format``."""
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if fmt.schema_ is None:
        raise bad_request("text.format of type json_schema needs a 'schema' (and a 'name')",
                          param="text.format.schema")
    return {"type": "json_schema", "json_schema": {"name": fmt.name or "response", "schema": fmt.schema_,
                                                   "strict": fmt.strict}}


def responses_param(param: str | None) -> str | None:
    """A chat request's field name as the Responses field it came from."""
    if param is None:
        return None
    if param.startswith("messages"):
        return "input"
    if param.startswith("response_format"):
        return "text.format"
    if param.startswith("tools[") and ".function" in param:
        return param.replace(".function", "", 1)
    return param


@contextmanager
def responses_terms() -> Iterator[None]:
    """Errors of the chat path, their ``param`` renamed to the Responses field."""
    try:
        yield
    except APIError as e:
        e.param = responses_param(e.param)
        raise


# -- the response --------------------------------------------------------------------------------------


def message_item(text: str, status: str = "completed") -> dict:
    return {"id": "msg_" + uuid.uuid4().hex, "type": "message", "role": "assistant", "status": status,
            "content": [_text_part(text)]}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def call_item(call_id: str, name: str, arguments: str, status: str = "completed") -> dict:
    return {"id": "fc_" + uuid.uuid4().hex, "type": "function_call", "call_id": call_id, "name": name,
            "arguments": arguments, "status": status}


def _usage(prompt_tokens: int, finish: FinishEvent) -> dict:
    """Token counts; ``cache_write_tokens`` is 0, as the engine's prefix cache keeps no account of writes."""
    return {"input_tokens": prompt_tokens,
            "input_tokens_details": {"cached_tokens": finish.cached_tokens, "cache_write_tokens": 0},
            "output_tokens": finish.completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + finish.completion_tokens}


class ResponseReply:
    """Shapes one request's engine events as a Response object, or as the stream of Responses events."""

    def __init__(self, req: ResponsesRequest, chat: ChatCompletionRequest, plan: translate.Plan, model_id: str,
                 choices: Choices):
        self.req, self.chat, self.plan, self.model_id, self.choices = req, chat, plan, model_id, choices
        self.id = "resp_" + uuid.uuid4().hex
        self.created_at = int(time.time())
        limits = [n for n in (req.max_tool_calls, 1 if req.parallel_tool_calls is False else None) if n is not None]
        self.call_limit = min(limits) if limits else None

    def response(self, output: list[dict], finish: FinishEvent | None) -> dict:
        """The Response object: in progress (``finish`` None), completed, or incomplete (the budget ran out)."""
        req = self.req
        cut = finish is not None and finish.reason == "length"
        status = "in_progress" if finish is None else "incomplete" if cut else "completed"
        return {
            "id": self.id, "object": "response", "created_at": self.created_at, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None, "background": False,
            "error": None, "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "instructions": req.instructions, "max_output_tokens": req.max_output_tokens,
            "max_tool_calls": req.max_tool_calls, "model": self.model_id, "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False, "previous_response_id": None,
            "reasoning": None, "store": False, "temperature": self.chat.temperature, "top_p": self.chat.top_p,
            "text": self._text_config(), "tool_choice": req.tool_choice or "auto", "tools": req.tools or [],
            "truncation": "disabled", "usage": _usage(len(self.plan.prompts[0]), finish) if finish else None,
            "user": req.user, "metadata": req.metadata or {},
        }

    def _text_config(self) -> dict:
        text = self.req.text
        fmt = text.format if text is not None and text.format is not None else None
        out = {"format": fmt.model_dump(by_alias=True, exclude_none=True) if fmt else {"type": "text"}}
        if fmt is not None and fmt.type == "json_schema":
            out["format"].setdefault("name", "response")
        if text is not None and text.verbosity:
            out["verbosity"] = text.verbosity
        return out

    async def collect(self) -> dict:
        """The response to the whole reply: where the stream of the reply arriving at once would end, so that
        streamed and non-streamed responses have the same output items (prose and calls in the reply's
        order; their text and calls are what ``translate.tool_calls_of`` makes of the reply)."""
        text, finish = "", None
        async for _, event in self.choices.events():
            if isinstance(event, FinishEvent):
                finish = event
            else:
                text += event.text
        if finish.reason == "error":
            raise failure_of(finish)
        events = _EventStream(self)
        events.whole(text, finish)
        return events.final or self.response(events.items, None)

    async def stream(self) -> AsyncIterator[str]:
        """The SSE text of the events (one string per batch of engine events)."""
        events = _EventStream(self)
        try:
            yield events.emit("response.created", response=self.response([], None))
            yield events.emit("response.in_progress", response=self.response([], None))
            async for batch in self.choices.batches():
                yield "".join(events.on_batch(batch))
        except Exception:  # after the 200: an error event ends the stream
            logger.exception("a responses stream failed")
            yield events.error(server_error("the stream failed on the server (the error has been logged)"))
        finally:
            self.choices.cancel()


class _EventStream:
    """The Responses events of one streamed reply: output items opened, filled and closed in order (one open
    at a time), each event serialised as it is made (the items change after)."""

    def __init__(self, reply: ResponseReply):
        self.reply = reply
        self.sequence = 0
        self.items: list[dict] = []
        self.open: dict | None = None
        self.calls: dict[int, dict] = {}  # tool-call index -> its item
        self.text = ""
        self.tools = ToolReplyStream(reply.plan.tools) if reply.plan.tools is not None else None
        self.final: dict | None = None  # the last event's response

    def whole(self, text: str, finish: FinishEvent) -> None:
        """Take the whole reply at once (its events are not kept; :attr:`final` is the response)."""
        self._on_text(text)
        self._on_finish(finish)

    def emit(self, kind: str, **fields) -> str:
        data = json.dumps({"type": kind, "sequence_number": self.sequence, **fields})
        self.sequence += 1
        return f"event: {kind}\ndata: {data}\n\n"

    def error(self, error: APIError) -> str:
        return self.emit("error", code=error.code or error.type, message=error.message, param=error.param)

    def on_batch(self, batch: list) -> list[str]:
        """The events of engine events that arrived together: their tokens' text as one delta."""
        out, text = [], ""
        for _, event in batch:
            if isinstance(event, TokenEvent):
                text += event.text
                continue
            out += self._on_text(text) + self._on_finish(event)
            text = ""
        return out + self._on_text(text)

    def _on_text(self, text: str) -> list[str]:
        if not text:
            return []
        self.text += text
        if self.tools is None:
            return self._content(text)
        content, deltas = self.tools.feed(self.text)
        return self._content(content) + [e for delta in deltas for e in self._call_delta(delta)]

    def _on_finish(self, event: FinishEvent) -> list[str]:
        if event.reason == "error":
            return [self.error(failure_of(event))]
        if event.reason == "cancelled":
            return []
        cut = event.reason == "length"
        self.text += event.text
        if self.tools is None:
            out = self._content(event.text)
        else:
            end = self.tools.finish(self.text, cut)
            out = [e for delta in end.deltas for e in self._call_delta(delta)] + self._content(end.content)
        if not self.items:  # an empty reply: an empty message, as the non-streamed response has
            out += self._opened(message_item("", "in_progress"))
        out += self._close("incomplete" if cut else "completed")
        self.final = self.reply.response(self.items, event)
        return out + [self.emit("response.incomplete" if cut else "response.completed", response=self.final)]

    def _index(self, item: dict) -> int:
        return next(k for k, other in enumerate(self.items) if other is item)

    def _opened(self, item: dict) -> list[str]:
        out = self._close("completed")
        self.items.append(item)
        self.open = item
        index = len(self.items) - 1
        out.append(self.emit("response.output_item.added", output_index=index, item=item))
        if item["type"] == "message":
            out.append(self.emit("response.content_part.added", item_id=item["id"], output_index=index,
                                 content_index=0, part=_text_part("")))
        return out

    def _close(self, status: str) -> list[str]:
        item, self.open = self.open, None
        if item is None:
            return []
        item["status"] = status
        index = self._index(item)
        if item["type"] == "message":
            part = item["content"][0]
            out = [self.emit("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                             text=part["text"], logprobs=[]),
                   self.emit("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                             part=part)]
        else:
            out = [self.emit("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                             arguments=item["arguments"])]
        return out + [self.emit("response.output_item.done", output_index=index, item=item)]

    def _content(self, text: str) -> list[str]:
        if not text:
            return []
        writing = self.open is not None and self.open["type"] == "message"
        out = [] if writing else self._opened(message_item("", "in_progress"))
        item = self.open
        item["content"][0]["text"] += text
        return out + [self.emit("response.output_text.delta", item_id=item["id"], output_index=self._index(item),
                                content_index=0, delta=text, logprobs=[])]

    def _call_delta(self, delta: ToolCall) -> list[str]:
        """A tool-call delta: the first of a call opens its item (closing the one before), the rest add
        arguments. Calls past ``max_tool_calls`` (or the first, without ``parallel_tool_calls``) are dropped."""
        limit = self.reply.call_limit
        if limit is not None and delta.index >= limit:
            return []
        out = []
        if delta.id is not None:
            out = self._opened(call_item(delta.id, delta.function.name, "", "in_progress"))
            self.calls[delta.index] = self.open
        item, piece = self.calls.get(delta.index), delta.function.arguments
        if not piece or item is None:
            return out
        if item is not self.open:  # (tool_stream.py closes a call before the next one opens)
            logger.warning("a tool-call delta arrived for a closed call item; dropped")
            return out
        item["arguments"] += piece
        return out + [self.emit("response.function_call_arguments.delta", item_id=item["id"],
                                output_index=self._index(item), delta=piece)]


# -- the HTTP side -------------------------------------------------------------------------------------


def _json(body: dict) -> Response:
    return Response(json.dumps(body), media_type="application/json")


def _sse(texts: AsyncIterator[str]) -> StreamingResponse:
    async def nonempty():
        async for text in texts:
            if text:
                yield text
    return StreamingResponse(nonempty(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
