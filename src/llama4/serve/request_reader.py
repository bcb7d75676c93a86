"""How a request gets past the door: its API key, then its body, read by hand rather than by FastAPI's
body parameter, so that an oversized body is refused (413) as soon as its declared or streamed size
passes the limit, and malformed JSON is a 400 in the OpenAI error format.
"""

from __future__ import annotations

import hmac
import json
import re
from collections.abc import Callable, Collection

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ValidationError

from llama4.serve.errors import APIError, body_too_large, model_not_found, unauthorized, validation_error


class RequestReader:
    """Checks requests against the API key (none: every request passes) and reads their bodies, at most
    ``max_body_bytes``, as a request schema naming one of the served model ``names``, one of the LoRA adapters
    ``adapters()`` names (those loaded now), or none."""

    def __init__(self, names: list[str], api_key: str | None, max_body_bytes: int,
                 adapters: Callable[[], Collection[str]] = tuple):
        self.names, self.api_key, self.max_body_bytes, self.adapters = names, api_key, max_body_bytes, adapters

    def adapter_of(self, model: str | None) -> str | None:
        """The adapter a request's ``model`` names (None: the base model); 404 for a name served by neither."""
        if model is None or model in self.names:
            return None
        adapters = self.adapters()
        if model not in adapters:
            raise model_not_found(model, [*self.names, *adapters])
        return model

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
            raise unauthorized()

    async def read(self, request: Request, schema: type[BaseModel]):
        """The authorized request's body as ``schema``."""
        self.authorize(request)
        body = await self._body(request)
        data = _json_object(body) if len(body) <= IN_THREAD_BYTES else await run_in_threadpool(_json_object, body)
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        self.adapter_of(getattr(req, "model", None))
        return req

    async def _body(self, request: Request) -> bytearray:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            raise body_too_large(self.max_body_bytes)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > self.max_body_bytes:
                raise body_too_large(self.max_body_bytes)
        return body


MAX_DEPTH = 128  # JSON nesting: a chat request needs about 6 levels, plus those of a tool's or format's schema
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")
IN_THREAD_BYTES = 1 << 20  # bodies above this are parsed in the thread pool, not on the event loop


def _json_object(body: bytearray) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        data = None
    if data is None:
        raise _nested_too_deeply()
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    problem = _walk(data, surrogates=_SURROGATE_ESCAPE.search(body) is not None)
    if problem == "depth":
        raise _nested_too_deeply()
    if problem == "surrogate":
        raise APIError(400, "the request body has a string with a lone UTF-16 surrogate (a \\ud800-\\udfff escape "
                            "that is not half of a pair): it is not Unicode text", code="invalid_json")
    return data


def _nested_too_deeply() -> APIError:
    return APIError(400, f"the request body is nested more than {MAX_DEPTH} levels deep", code="invalid_json")


def _walk(data, surrogates: bool) -> str | None:
    """'depth' if the parsed JSON nests deeper than MAX_DEPTH, 'surrogate' if a string (or key) holds a lone
    surrogate (looked for only when the raw body has a surrogate escape: a valid pair decodes into one
    character), else None."""
    stack = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, str):
            if surrogates and _SURROGATE.search(value):
                return "surrogate"
        elif isinstance(value, (dict, list)):
            if depth > MAX_DEPTH:
                return "depth"
            items = value.items() if isinstance(value, dict) else ((None, v) for v in value)
            for key, item in items:
                if key is not None and surrogates and _SURROGATE.search(key):
                    return "surrogate"
                if isinstance(item, (str, dict, list)):
                    stack.append((item, depth + 1))
    return None
