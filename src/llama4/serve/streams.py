"""The bridge between the engine thread and the event loop: one request's choices as an async stream.

The engine calls each choice's sink from its own thread; the sink hands the event to the loop through
one :class:`LoopBridge` per event loop (never blocking the engine, never a thread per waiting client):
events pile up in the bridge and the loop is woken once per batch of them (``call_soon_threadsafe``
writes to the loop's self-pipe; once per token per stream would wake the loop, and take the GIL,
hundreds of times a second under load). Consumers take whatever has arrived at once
(:meth:`Choices.batches`), so a stream that fell behind catches up in one socket write. Whatever
ends the consumer - normal completion, an exception, a client that went away and got its task
cancelled - :meth:`Choices.cancel` runs and cancels the choices still generating, so their cache
rows are freed at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from llama4.inference.requests import ContextTooLong, EngineError, Event, FinishEvent, GenerationRequest, QueueFull
from llama4.serve.errors import APIError, bad_request, queue_full, server_error


class LoopBridge:
    """Carries (queue, item) pairs from any thread into one event loop, one wake-up per batch."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self._pending: deque[tuple[asyncio.Queue, object]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()

    def put(self, queue: asyncio.Queue, item) -> None:
        """Deliver ``item`` into ``queue`` on the loop soon; raises RuntimeError once the loop is closed."""
        with self._lock:
            self._pending.append((queue, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:
            with self._lock:
                self._scheduled = False
            raise

    def _deliver(self) -> None:
        with self._lock:
            items, self._pending = self._pending, deque()
            self._scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


_bridges: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopBridge] = weakref.WeakKeyDictionary()


def bridge_for(loop: asyncio.AbstractEventLoop) -> LoopBridge:
    bridge = _bridges.get(loop)
    if bridge is None:
        bridge = _bridges[loop] = LoopBridge(loop)
    return bridge


class Choices:
    """Submits a request's choices; iterate :meth:`events` for ``(choice index, event)`` in arrival order."""

    def __init__(self, engine, requests: list[GenerationRequest]):
        """``engine``: an :class:`~llama4.inference.engine.Engine` or an
        :class:`~llama4.serve.engine_process.EngineProcess` (the same caller-side interface)."""
        self.bridge = bridge_for(asyncio.get_running_loop())
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles = []
        self.remaining = len(requests)
        if len(requests) > engine.config.max_queue:
            raise APIError(400, f"this request asks for {len(requests)} completions (prompts x n); the server queues "
                                f"at most {engine.config.max_queue} (its --max-queue), so it could never be served",
                           param="n", code="limit_exceeded")
        try:
            for i, request in enumerate(requests):
                self.handles.append(engine.submit(request, self._sink(i)))
        except QueueFull as e:
            self.cancel()
            retry = 1 + e.queued // max(engine.config.max_batch, 1)
            raise queue_full(e.queued, retry) from None
        except ContextTooLong as e:
            self.cancel()
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except ValueError as e:
            self.cancel()
            raise bad_request(str(e)) from None
        except EngineError as e:  # the engine process has ended or the server is stopping
            self.cancel()
            raise APIError(503, str(e), "server_error") from None

    def _sink(self, index: int):
        bridge, queue = self.bridge, self.queue

        def put(event: Event) -> None:
            bridge.put(queue, (index, event))
        return put

    async def batches(self) -> AsyncIterator[list[tuple[int, Event]]]:
        """Every ``(choice index, event)`` that has arrived, in arrival order, as soon as there is one."""
        while self.remaining:
            batch = [await self.queue.get()]
            while not self.queue.empty():
                batch.append(self.queue.get_nowait())
            self.remaining -= sum(1 for _, event in batch if isinstance(event, FinishEvent))
            yield batch

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        async for batch in self.batches():
            for item in batch:
                yield item

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


def failure_of(event: FinishEvent) -> APIError:
    """A finish with reason "error" as the error the client gets: 400 when the request caused it."""
    if event.bad_request:
        return APIError(400, event.error or "the request cannot be served")
    return server_error(event.error or "generation failed")


async def unless_disconnected(request, choices: Choices, reply):
    """Await a non-streamed reply while watching for the client going away (which cancels it)."""
    watcher = asyncio.create_task(cancel_on_disconnect(request.receive, choices))
    try:
        return await reply
    finally:
        watcher.cancel()
        choices.cancel()


async def cancel_on_disconnect(receive, choices: Choices) -> None:
    """For non-streamed replies: wait for the client's disconnect message, then cancel its choices.

    Run as a task next to the response; the route cancels it once the reply is ready.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            choices.cancel()
            return


class ClientGone(APIError):
    """The client went away while its request was being prepared (nobody reads this answer)."""

    def __init__(self):
        super().__init__(499, "the client closed the connection", code="client_closed_request")


@asynccontextmanager
async def watch_disconnect(request) -> AsyncIterator[Callable[[], None]]:
    """While the block runs, watch for the client going away; yields a ``checkpoint()`` that raises
    :class:`ClientGone` once it has (for work in the thread pool to call between its costly steps)."""
    gone = threading.Event()

    async def watch():
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    def checkpoint() -> None:
        if gone.is_set():
            raise ClientGone()

    watcher = asyncio.create_task(watch())
    try:
        yield checkpoint
    finally:
        watcher.cancel()
