"""Errors in the OpenAI format: ``{"error": {"message", "type", "param", "code"}}`` with the right status.

Every failure a client can cause is raised as an :class:`APIError` (or mapped to one here) so that a
stock OpenAI client turns it into its matching exception (``BadRequestError``, ``NotFoundError``,
``AuthenticationError``, ``RateLimitError``, ...) with our message.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llama4.serve.schemas import ErrorBody, ErrorResponse


class APIError(Exception):
    """An error to report to the client; ``headers`` are added to the response (e.g. Retry-After)."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param,
                                             code=self.code)).model_dump()

    def response(self) -> Response:
        """The error as JSON; non-ASCII characters escaped, so that no text (a lone surrogate from a client's
        JSON escape, say) can make the error itself fail to encode."""
        return Response(json.dumps(self.body()), status_code=self.status, headers=self.headers,
                        media_type="application/json")


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def unauthorized() -> APIError:
    return APIError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", "authentication_error",
                    code="invalid_api_key")


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(404, f"the model '{name}' does not exist; this server serves "
                         f"{', '.join(repr(n) for n in served)}", param="model", code="model_not_found")


def server_error(message: str = "internal error: the server could not handle this request (it has been logged)"
                 ) -> APIError:
    return APIError(500, message, "server_error")


def body_too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than the limit of {limit:,} bytes", code="request_too_large")


def queue_full(queued: int, retry_after: int) -> APIError:
    return APIError(429, f"the server is busy ({queued} requests already waiting); retry in {retry_after} s",
                    "rate_limit_error", code="queue_full", headers={"Retry-After": str(retry_after)})


def validation_error(exc: RequestValidationError | ValidationError) -> APIError:
    """A 400 for the first pydantic problem, naming the offending parameter's dotted path."""
    errors = exc.errors()
    if not errors:
        return bad_request("invalid request")
    first = errors[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
    return bad_request(f"invalid value for '{param}': {first.get('msg')}" if param else str(first.get("msg")), param)


def install_handlers(app: FastAPI) -> None:
    """Route every error, including FastAPI's own 404/405 and validation errors, through the OpenAI format."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return APIError(exc.status_code, str(exc.detail), kind).response()


class CatchAll:
    """ASGI middleware: an exception no route turned into an :class:`APIError` becomes a 500 in the OpenAI
    format, logged with its traceback. Without it Starlette answers in plain text and uvicorn closes the
    connection, so a client's next request on the same keep-alive connection fails too. A response that had
    already started (a stream) is ended cleanly instead: the streams write their own error event first."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = {"started": False, "ended": False}

        async def watch(message):
            if message["type"] == "http.response.start":
                state["started"] = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                state["ended"] = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            logger.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            if not state["started"]:
                await server_error().response()(scope, receive, send)
            elif not state["ended"]:
                await send({"type": "http.response.body", "body": b"", "more_body": False})


logger = logging.getLogger("llama4.serve")
