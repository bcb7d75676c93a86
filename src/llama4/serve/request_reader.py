"""How a request gets past the door: its API key, then its body, read by hand rather than by FastAPI's
body parameter, so that an oversized body is refused (413) as soon as its declared or streamed size
passes the limit, and malformed JSON is a 400 in the OpenAI error format.
"""

from __future__ import annotations

import hmac
import json

from fastapi import Request
from pydantic import BaseModel, ValidationError

from llama4.serve.errors import APIError, body_too_large, model_not_found, unauthorized, validation_error


class RequestReader:
    """Checks requests against the API key (none: every request passes) and reads their bodies, at most
    ``max_body_bytes``, as a request schema naming one of the served model ``names`` (or none)."""

    def __init__(self, names: list[str], api_key: str | None, max_body_bytes: int):
        self.names, self.api_key, self.max_body_bytes = names, api_key, max_body_bytes

    def authorize(self, request: Request) -> None:
        if self.api_key is None:
            return
        given = request.headers.get("authorization", "")
        if not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].encode(), self.api_key.encode())):
            raise unauthorized()

    async def read(self, request: Request, schema: type[BaseModel]):
        """The authorized request's body as ``schema``."""
        self.authorize(request)
        data = _json_object(await self._body(request))
        try:
            req = schema.model_validate(data)
        except ValidationError as e:
            raise validation_error(e) from None
        if req.model is not None and req.model not in self.names:
            raise model_not_found(req.model, self.names)
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


def _json_object(body: bytearray) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return data
