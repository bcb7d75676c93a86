"""The bridge between the engine thread and the event loop: one request's choices as an async stream.

The engine calls each choice's sink from its own thread; the sink hands the event to the loop with
``call_soon_threadsafe`` (never blocking the engine, never a thread per waiting client). Whatever
ends the consumer - normal completion, an exception, a client that went away and got its task
cancelled - :meth:`Choices.cancel` runs and cancels the choices still generating, so their cache
rows are freed at the engine's next iteration.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from llama4.serve.engine import Engine, Handle
from llama4.serve.protocol import ContextTooLong, Event, FinishEvent, GenerationRequest, QueueFull
from llama4.serve.errors import APIError, bad_request, queue_full


class Choices:
    """Submits a request's choices; iterate :meth:`events` for ``(choice index, event)`` in arrival order."""

    def __init__(self, engine: Engine, requests: list[GenerationRequest]):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.handles: list[Handle] = []
        self.remaining = len(requests)
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

    def _sink(self, index: int):
        def put(event: Event) -> None:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
        return put

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        while self.remaining:
            index, event = await self.queue.get()
            if isinstance(event, FinishEvent):
                self.remaining -= 1
            yield index, event

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()


async def cancel_on_disconnect(receive, choices: Choices) -> None:
    """For non-streamed replies: wait for the client's disconnect message, then cancel its choices.

    Run as a task next to the response; the route cancels it once the reply is ready.
    """
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            choices.cancel()
            return
