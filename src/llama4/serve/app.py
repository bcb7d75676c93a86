"""The HTTP side: FastAPI routes over one engine - an :class:`~llama4.inference.engine.Engine` thread in this
process, or (``llama4 serve``'s default) an :class:`~llama4.serve.engine_process.EngineProcess` -
that runs for the app's lifetime.

Bodies are read by hand, with a size limit (request_reader.py). Image decoding and chat rendering run in
the thread pool; the event loop only moves events between the engine and the sockets.

LoRA adapters (an engine with ``max_loras``): a request's ``model`` names the base (any served name) or a
loaded adapter, whose name its response then carries; /v1/models lists the adapters with their ``parent``;
with ``runtime_lora``, vLLM's /v1/load_lora_adapter and /v1/unload_lora_adapter load and unload them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, PlainTextResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel

from llama4.checkpoint.generation_config import GenerationDefaults
from llama4.inference.engine import Engine, EngineConfig
from llama4.inference.requests import AdapterInUse, EngineError, FinishEvent, GenerationRequest, PromptEvent, TokenEvent
from llama4.lora.multi import AdapterError, UnknownAdapter
from llama4.prompt import Tokenizer
from llama4.serve import translate
from llama4.serve.browser_guard import BrowserGuard, GuardPolicy
from llama4.serve.engine_process import EngineProcess
from llama4.serve.errors import APIError, CatchAll, bad_request, install_handlers, logger, model_not_found, server_error
from llama4.serve.limits import DEFAULT_STALL_TIMEOUT, ServeLimits
from llama4.serve.metrics import ServeMetrics
from llama4.serve.monitoring import CountRequests, StallWatch, add_monitoring_routes, watch_for_stalls
from llama4.serve.remote_images import RemoteImageFetcher, RemoteImagePolicy
from llama4.serve.request_reader import RequestReader
from llama4.serve.responses import add_responses_routes
from llama4.serve.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChunkChoice,
    CompletionChoice,
    CompletionRequest,
    Delta,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    PromptTokensDetails,
    TextCompletion,
    UnloadLoraAdapterRequest,
    Usage,
)
from llama4.serve.streams import Choices, failure_of, unless_disconnected, watch_disconnect
from llama4.serve.tokenizer_routes import add_tokenizer_routes
from llama4.serve.tool_stream import ToolReplyStream

if TYPE_CHECKING:
    from llama4 import Llama4Model

STATIC_DIR = Path(__file__).parent / "static"


def create_app(model: Llama4Model, tokenizer: Tokenizer, *, model_id: str = "llama4",
               engine_config: EngineConfig = EngineConfig(), **options) -> FastAPI:
    """An OpenAI-compatible app serving ``model`` as ``model_id`` from an engine thread in this process;
    ``options`` as :func:`create_engine_app`'s."""
    return create_engine_app(Engine(model, tokenizer, engine_config), tokenizer, model_id=model_id, **options)


def create_engine_app(engine: Engine | EngineProcess, tokenizer: Tokenizer, *, model_id: str | list[str] = "llama4",
                      api_key: str | None = None, limits: ServeLimits = ServeLimits(),
                      allow_remote_images: bool | RemoteImagePolicy = False, guard: GuardPolicy | None = None,
                      metrics_need_key: bool = False, stall_timeout: float = DEFAULT_STALL_TIMEOUT,
                      generation_defaults: GenerationDefaults = GenerationDefaults(),
                      max_body_bytes: int | None = None, runtime_lora: bool = False) -> FastAPI:
    """The app over ``engine`` (a thread in this process, or a process of its own, see
    engine_process.py), which starts and stops with the app. ``model_id``: the name, or names, that
    requests may send as ``model``; responses carry the first (as vLLM's --served-model-name).

    ``limits``: what one request may ask (limits.py; ``max_body_bytes`` overrides its body limit).
    ``allow_remote_images``: fetch the http(s) image URLs clients send (True: under the default
    :class:`RemoteImagePolicy`, which refuses private and loopback addresses). ``guard``: the browser-facing
    checks (Host allow-list, CORS, content type, security headers; browser_guard.py), none if None.
    ``metrics_need_key``: /metrics asks for the API key too (for servers bound beyond loopback).
    ``stall_timeout``: seconds without an engine iteration, while work waits, after which the engine counts
    as stuck (monitoring.py; 0: never). ``generation_defaults``: the checkpoint's sampling settings
    (generation_config.json), for requests that set no temperature or top_p. ``runtime_lora``: clients may load
    and unload LoRA adapters (an engine configured with ``max_loras``; ``llama4 serve --enable-lora``)."""
    if max_body_bytes is not None:
        limits = dataclasses.replace(limits, max_body_bytes=max_body_bytes)
    names = _served_names(model_id)
    reader = RequestReader(names, api_key, limits.max_body_bytes, engine.loaded_adapters)
    policy = RemoteImagePolicy() if allow_remote_images is True else allow_remote_images or None
    fetcher = RemoteImageFetcher(policy) if policy is not None else None
    watch = StallWatch(engine, stall_timeout)
    app = _engine_app(engine, guard, watch)
    add_monitoring_routes(app, engine, app.state.http_metrics, watch, reader if metrics_need_key else None)
    _add_model_routes(app, engine, names, reader)
    _add_lora_routes(app, engine, names, reader, runtime_lora)
    add_tokenizer_routes(app, engine, tokenizer, reader)
    _add_generation_routes(app, engine, tokenizer, names[0], reader, limits, fetcher, generation_defaults)
    add_responses_routes(app, engine, tokenizer, names[0], reader, limits, fetcher, generation_defaults)
    _add_web_ui(app)
    return app


def _served_names(model_id: str | list[str]) -> list[str]:
    names = [model_id] if isinstance(model_id, str) else list(model_id)
    if not names or not all(isinstance(n, str) and n for n in names):
        raise ValueError(f"model_id must be a non-empty name or list of names, got {model_id!r}")
    return names


def _engine_app(engine: Engine | EngineProcess, guard: GuardPolicy | None, watch: StallWatch) -> FastAPI:
    """An app with no routes yet: its lifespan is the engine's, its errors (unexpected ones included) are
    in the OpenAI format, every response is counted (for /metrics), and browsers are kept in bounds."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        watcher = asyncio.create_task(watch_for_stalls(engine, watch))
        try:
            yield
        finally:
            watcher.cancel()
            engine.stop()

    app = FastAPI(title="llama4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.metrics, app.state.http_metrics = engine, engine.metrics, ServeMetrics()
    app.add_middleware(CatchAll)
    if guard is not None:
        app.add_middleware(BrowserGuard, policy=guard)
    app.add_middleware(CountRequests, metrics=app.state.http_metrics)
    install_handlers(app)
    return app


def _add_model_routes(app: FastAPI, engine: Engine | EngineProcess, names: list[str], reader: RequestReader) -> None:
    created = int(time.time())

    def cards() -> list[ModelCard]:
        base = [ModelCard(id=name, created=created, max_context=engine.max_context) for name in names]
        return base + [ModelCard(id=name, created=created, max_context=engine.max_context, root=path, parent=names[0])
                       for name, path in engine.loaded_adapters().items()]

    @app.get("/v1/models")
    async def models(request: Request):
        reader.authorize(request)
        return ModelList(data=cards())

    @app.get("/v1/models/{name:path}")
    async def model(name: str, request: Request):
        reader.authorize(request)
        found = {card.id: card for card in cards()}
        if name not in found:
            raise model_not_found(name, list(found))
        return found[name]


def _add_lora_routes(app: FastAPI, engine: Engine | EngineProcess, names: list[str], reader: RequestReader,
                     enabled: bool) -> None:
    """vLLM's run-time adapter routes: a 200 with a line of text, or an OpenAI error (400: bad files, rank or
    targets, a name taken, no free slot, or loading off; 404: unknown name; 409: in use, refused not deferred)."""
    def check_enabled() -> None:
        if not enabled or not engine.config.max_loras:
            raise bad_request("loading and unloading LoRA adapters at run time is off: start the server with "
                              "--enable-lora", code="lora_disabled")

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(request: Request):
        req: LoadLoraAdapterRequest = await reader.read(request, LoadLoraAdapterRequest)
        check_enabled()
        if req.lora_name in names:
            raise bad_request(f"{req.lora_name!r} is the base model's name", param="lora_name")
        try:
            await run_in_threadpool(engine.load_adapter, req.lora_name, req.lora_path)
        except AdapterError as e:
            raise bad_request(str(e), param="lora_path", code="invalid_adapter") from None
        except EngineError as e:
            raise APIError(503, str(e), "server_error") from None
        logger.info("loaded LoRA adapter %r from %s", req.lora_name, req.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(request: Request):
        req: UnloadLoraAdapterRequest = await reader.read(request, UnloadLoraAdapterRequest)
        check_enabled()
        try:
            await run_in_threadpool(engine.unload_adapter, req.lora_name)
        except UnknownAdapter:
            raise model_not_found(req.lora_name, list(engine.loaded_adapters())) from None
        except AdapterInUse as e:
            raise APIError(409, str(e), param="lora_name", code="adapter_in_use") from None
        except EngineError as e:
            raise APIError(503, str(e), "server_error") from None
        logger.info("unloaded LoRA adapter %r", req.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{req.lora_name}' removed successfully.")


def on_adapter(requests: list[GenerationRequest], adapter: str | None) -> list[GenerationRequest]:
    """The engine requests of one API request, on its adapter (None: the base)."""
    for r in requests:
        r.adapter = adapter
    return requests


def _add_generation_routes(app: FastAPI, engine: Engine | EngineProcess, tokenizer: Tokenizer, model_id: str,
                           reader: RequestReader, limits: ServeLimits, fetcher: RemoteImageFetcher | None,
                           defaults: GenerationDefaults) -> None:
    """/v1/chat/completions and /v1/completions, streamed or not; responses name the model ``model_id``."""
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        req: ChatCompletionRequest = await reader.read(request, ChatCompletionRequest)
        adapter = reader.adapter_of(req.model)
        async with watch_disconnect(request) as checkpoint:
            plan = await run_in_threadpool(translate.plan_chat, req, tokenizer, engine.has_vision, limits, fetcher,
                                           engine.max_context, checkpoint)
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        choices = Choices(engine, on_adapter(plan.requests(req, logprobs, defaults), adapter))
        reply = _ChatReply(req, plan, tokenizer, adapter or model_id, choices)
        if req.stream:
            return _sse(reply.stream(), offload=req.logprobs)
        return await _json(await unless_disconnected(request, choices, reply.collect()))

    @app.post("/v1/completions")
    async def completions(request: Request):
        req: CompletionRequest = await reader.read(request, CompletionRequest)
        adapter = reader.adapter_of(req.model)
        plan = await run_in_threadpool(translate.plan_completion, req, tokenizer)
        choices = Choices(engine, on_adapter(plan.requests(req, req.logprobs, defaults), adapter))
        reply = _CompletionReply(req, plan, tokenizer, adapter or model_id, choices)
        if req.stream:
            return _sse(reply.stream(), offload=req.logprobs is not None)
        return await _json(await unless_disconnected(request, choices, reply.collect()))


def _add_web_ui(app: FastAPI) -> None:
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC_DIR / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")


def _sse_events(chunks: list[BaseModel | dict | str]) -> str:
    return "".join(_sse_event(c) for c in chunks)


def _sse_event(chunk: BaseModel | dict | str) -> str:
    if isinstance(chunk, BaseModel):
        chunk = chunk.model_dump_json(exclude_none=True)
    elif isinstance(chunk, dict):
        chunk = json.dumps(chunk)
    return f"data: {chunk}\n\n"


async def _json(reply: BaseModel) -> Response:
    """A reply as JSON, serialised in the thread pool: with logprobs (an echoed prompt's, say) it may be
    megabytes, which would hold up every other connection on the event loop."""
    return Response(await run_in_threadpool(reply.model_dump_json), media_type="application/json")


def _sse(chunks: AsyncIterator[BaseModel | dict | str | list], offload: bool = False) -> StreamingResponse:
    """Server-sent events, one per chunk; a list of chunks (what arrived together) goes out in one write.
    ``offload``: serialise in the thread pool (chunks with logprobs may be large, see :func:`_json`)."""
    async def lines():
        try:
            async for chunk in chunks:
                if isinstance(chunk, list):
                    if chunk:
                        yield (await run_in_threadpool(_sse_events, chunk)) if offload else _sse_events(chunk)
                else:
                    yield _sse_event(chunk)
        except Exception:  # after the 200: the stream still ends in the OpenAI way, and the connection lives
            logger.exception("a stream failed")
            yield _sse_event(server_error("the stream failed on the server (the error has been logged)").body())
            yield _sse_event("[DONE]")
    return StreamingResponse(lines(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _coalesced(batch: list[tuple[int, TokenEvent | FinishEvent]], chunks_of, run_chunk, plain) -> list:
    """The chunks of events that arrived together: consecutive token events of one choice (when ``plain(i)``)
    become one chunk (``run_chunk``), others their own (``chunks_of``). A client that keeps up gets a chunk
    per token; one that falls behind (many streams, a slow reader) gets fewer, larger ones instead of a
    backlog of tiny ones. Each choice's events keep their order."""
    by_choice: dict[int, list] = {}
    for i, event in batch:
        by_choice.setdefault(i, []).append(event)
    out = []
    for i, events in by_choice.items():
        run = []
        for event in events:
            if isinstance(event, TokenEvent) and plain(i):
                run.append(event)
                continue
            if run:
                out += run_chunk(i, run)
                run = []
            out += chunks_of(i, event)
        if run:
            out += run_chunk(i, run)
    return out


def _usage(prompt_lengths: list[int], finishes: list[FinishEvent | None], n: int) -> Usage:
    """Prompts count once however many choices (``n``) each has; cached tokens are those of choice 0."""
    prompt = sum(prompt_lengths)
    generated = sum(f.completion_tokens for f in finishes if f is not None)
    cached = sum(f.cached_tokens for f in finishes[::n] if f is not None)
    return Usage(prompt_tokens=prompt, completion_tokens=generated, total_tokens=prompt + generated,
                 prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


def _error_chunk(event: FinishEvent) -> dict:
    return failure_of(event).body()


async def _gather(reply) -> None:
    """Wait for every choice of a non-streamed reply, filling its texts, token events and finishes;
    a choice that failed fails the whole reply (HTTP 500)."""
    async for i, event in reply.choices.events():
        if isinstance(event, PromptEvent):  # (completions that score their prompt)
            reply.scored[i] = event
            continue
        reply.texts[i] += event.text
        if isinstance(event, TokenEvent):
            reply.events[i].append(event)
        else:
            reply.finishes[i] = event
    failed = [f for f in reply.finishes if f.reason == "error"]
    if failed:
        raise failure_of(failed[0])


class _ChatReply:
    """Shapes one chat request's engine events as a ChatCompletion or as a stream of chunks."""

    def __init__(self, req: ChatCompletionRequest, plan: translate.Plan, tokenizer: Tokenizer, model_id: str,
                 choices: Choices):
        self.req, self.plan, self.tokenizer, self.model_id, self.choices = req, plan, tokenizer, model_id, choices
        self.id = "chatcmpl-" + uuid.uuid4().hex
        self.n = len(choices.handles)
        self.texts, self.events = [""] * self.n, [[] for _ in range(self.n)]
        self.finishes: list[FinishEvent | None] = [None] * self.n
        self.replies = [ToolReplyStream(plan.tools) if plan.tools is not None else None for _ in range(self.n)]
        self.logged = [(0, 0)] * self.n  # streaming with tools: (token events, characters) whose logprobs went out

    def usage(self) -> Usage:
        return _usage([len(self.plan.prompts[0])], self.finishes, self.n)

    def _logprobs(self, events):
        return translate.chat_logprobs(self.tokenizer, events) if self.req.logprobs else None

    async def collect(self) -> ChatCompletion:
        await _gather(self)
        return await run_in_threadpool(self._completion)  # (logprobs may be large: off the event loop)

    def _completion(self) -> ChatCompletion:
        out = []
        for i, finish in enumerate(self.finishes):
            content, calls = translate.tool_calls_of(self.texts[i], self.plan.tools, finish.reason == "length")
            reason = "length" if finish.reason == "length" else "tool_calls" if calls else "stop"
            out.append(ChatChoice(index=i, message=AssistantMessage(content=content, tool_calls=calls),
                                  logprobs=self._logprobs(self.events[i]), finish_reason=reason))
        return ChatCompletion(id=self.id, model=self.model_id, choices=out, usage=self.usage())

    def _chunk(self, index: int, delta: Delta, logprobs=None, finish_reason: str | None = None) -> ChatCompletionChunk:
        return ChatCompletionChunk(id=self.id, model=self.model_id, choices=[
            ChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)])

    async def stream(self) -> AsyncIterator[BaseModel | dict | str | list]:
        """Content deltas as they come (a list: the chunks of the events that arrived together). With
        tools, a reply streams as content while it is certainly prose, and from where a call may begin as
        tool-call deltas while the calls are written (name first, then the arguments; see tool_stream.py);
        the rest of the content and of the calls goes out at its end, so that the stream ends with the
        calls, content and finish_reason of the non-streamed reply."""
        try:
            for i in range(self.n):
                yield self._chunk(i, Delta(role="assistant", content=""))
            async for batch in self.choices.batches():
                yield _coalesced(batch, self._chunks_of, self._run_chunk, lambda i: self.replies[i] is None)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield ChatCompletionChunk(id=self.id, model=self.model_id, choices=[], usage=self.usage())
            yield "[DONE]"
        finally:
            self.choices.cancel()

    def _run_chunk(self, i: int, run: list[TokenEvent]) -> list[BaseModel | dict]:
        """One content chunk for consecutive token events of choice i (a request without tools)."""
        text = "".join(event.text for event in run)
        self.texts[i] += text
        self.events[i] += run
        return [self._chunk(i, Delta(content=text), self._logprobs(run))] if text or self.req.logprobs else []

    def _chunks_of(self, i: int, event: TokenEvent | FinishEvent) -> list[BaseModel | dict]:
        """The chunks one event of choice i produces."""
        if isinstance(event, TokenEvent):
            if self.replies[i] is None:
                return self._run_chunk(i, [event])
            return self._tool_reply_chunks(i, event)
        self.finishes[i] = event
        if event.reason == "error":
            return [_error_chunk(event)]
        return self._final_chunks(i, event)

    def _tool_reply_chunks(self, i: int, event: TokenEvent) -> list[ChatCompletionChunk]:
        """The chunks of one token of a reply with tools: the prose it makes certain, as content, and the
        tool-call deltas it adds (none while the text from where a call may begin is held)."""
        self.texts[i] += event.text
        self.events[i].append(event)
        reply = self.replies[i]
        content, deltas = reply.feed(self.texts[i])
        chunks = [self._chunk(i, Delta(content=content), self._logprobs_until(i, reply.sent))] if content else []
        return chunks + [self._chunk(i, Delta(tool_calls=[delta])) for delta in deltas]

    def _logprobs_until(self, i: int, end: int | None = None):
        """The logprobs of choice i's tokens not given yet whose text ends within the reply's first ``end``
        characters (the content sent; all of them when None): each token's go out once, with its content."""
        if not self.req.logprobs:
            return None
        events, (first, at) = self.events[i], self.logged[i]
        last = first
        while last < len(events) and (end is None or at + len(events[last].text) <= end):
            at += len(events[last].text)
            last += 1
        self.logged[i] = (last, at)
        return self._logprobs(events[first:last])

    def _final_chunks(self, i: int, event: FinishEvent) -> list[ChatCompletionChunk]:
        """The last chunks of choice i: with tools, the rest of the calls and of the content (the prose
        around the calls, or the whole reply's text when it holds none) with the logprobs not sent yet (as
        the non-streamed reply, which has them all; none for a reply that is only calls), then the finish
        chunk."""
        chunks = []
        reason = "length" if event.reason == "length" else "stop"
        reply = self.replies[i]
        if reply is None:
            if event.text:
                chunks.append(self._chunk(i, Delta(content=event.text)))
        else:
            end = reply.finish(self.texts[i] + event.text, event.reason == "length")
            if end.is_calls and event.reason != "length":
                reason = "tool_calls"
            chunks += [self._chunk(i, Delta(tool_calls=[delta])) for delta in end.deltas]
            logprobs = self._logprobs_until(i) if end.content or reply.sent else None
            if end.content or (logprobs is not None and logprobs.content):
                chunks.append(self._chunk(i, Delta(content=end.content), logprobs))
        chunks.append(self._chunk(i, Delta(), finish_reason=reason))
        return chunks


class _CompletionReply:
    """Shapes a legacy completions request's events (choice index = prompt index * n + j)."""

    def __init__(self, req: CompletionRequest, plan: translate.Plan, tokenizer: Tokenizer, model_id: str,
                 choices: Choices):
        self.req, self.plan, self.tokenizer, self.model_id, self.choices = req, plan, tokenizer, model_id, choices
        self.id = "cmpl-" + uuid.uuid4().hex
        k = len(choices.handles)
        self.texts = [self._echo(i) for i in range(k)]
        self.events = [[] for _ in range(k)]
        self.finishes: list[FinishEvent | None] = [None] * k
        self.streamed = [len(text) for text in self.texts]  # characters of each choice sent so far (text_offset)
        self.scored: list[PromptEvent | None] = [None] * k  # each choice's prompt logprobs, when asked

    def _echo(self, i: int) -> str:
        return self.plan.echo_texts[i // self.req.n] if self.plan.echo_texts else ""

    def usage(self) -> Usage:
        return _usage([len(p) for p in self.plan.prompts], self.finishes, self.req.n)

    def _logprobs(self, i: int, events, offset: int | None = None, with_prompt: bool = True):
        if self.req.logprobs is None:
            return None
        scored = self.scored[i] if with_prompt else None
        prompt = (self.plan.prompts[i // self.req.n], scored) if scored is not None else None
        return translate.completion_logprobs(self.tokenizer, events, len(self._echo(i)) if offset is None else offset,
                                             prompt)

    async def collect(self) -> TextCompletion:
        await _gather(self)
        return await run_in_threadpool(self._completion)

    def _completion(self) -> TextCompletion:
        out = [CompletionChoice(index=i, text=self.texts[i], logprobs=self._logprobs(i, self.events[i]),
                                finish_reason="length" if f.reason == "length" else "stop")
               for i, f in enumerate(self.finishes)]
        return TextCompletion(id=self.id, model=self.model_id, choices=out, usage=self.usage())

    def _chunk(self, i: int, text: str, logprobs=None, finish_reason=None) -> TextCompletion:
        return TextCompletion(id=self.id, model=self.model_id, choices=[
            CompletionChoice(index=i, text=text, logprobs=logprobs, finish_reason=finish_reason)])

    def _run_chunk(self, i: int, run: list[TokenEvent]) -> list[BaseModel | dict]:
        """One chunk for consecutive token events of choice i; text_offset counts on from the chunks before."""
        text = "".join(event.text for event in run)
        logprobs = self._logprobs(i, run, self.streamed[i], with_prompt=False)
        self.streamed[i] += len(text)
        return [self._chunk(i, text, logprobs)] if text or self.req.logprobs is not None else []

    def _chunks_of(self, i: int, event: TokenEvent | PromptEvent | FinishEvent) -> list[BaseModel | dict]:
        if isinstance(event, TokenEvent):
            return self._run_chunk(i, [event])
        if isinstance(event, PromptEvent):  # the echoed prompt, scored: its own chunk, before the tokens
            self.scored[i] = event
            return [self._chunk(i, self._echo(i), self._logprobs(i, []))]
        self.finishes[i] = event
        if event.reason == "error":
            return [_error_chunk(event)]
        return [self._chunk(i, event.text, finish_reason="length" if event.reason == "length" else "stop")]

    async def stream(self) -> AsyncIterator[BaseModel | dict | str | list]:
        try:
            for i, echo in enumerate(self.texts):
                if echo and self.req.prompt_logprobs is None:  # (a scored prompt comes with its PromptEvent)
                    yield self._chunk(i, echo)
            async for batch in self.choices.batches():
                args = (batch, self._chunks_of, self._run_chunk, lambda i: True)
                yield await run_in_threadpool(_coalesced, *args) if self.req.logprobs is not None else _coalesced(*args)
            if self.req.stream_options is not None and self.req.stream_options.include_usage:
                yield TextCompletion(id=self.id, model=self.model_id, choices=[], usage=self.usage())
            yield "[DONE]"
        finally:
            self.choices.cancel()
