"""Stopping ``llama4 serve`` in bounded time.

On SIGTERM or Ctrl-C uvicorn stops accepting connections and waits for the open ones to finish, which
for a 30,000-token stream can be minutes. :class:`DrainingServer` gives them ``drain_seconds``; then it
ends every reply still being generated with an error (``abort``: the engine finishes them with reason
"error"), so each open stream sends an error event and ``[DONE]`` and its connection closes, and the
server exits. A second signal does the same at once. uvicorn's own graceful-shutdown timeout is the
backstop behind it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable

import uvicorn

FLUSH_SECONDS = 2.0  # after a second signal: time for the error events to reach the clients


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain_seconds: float, abort: Callable[[], None]):
        if drain_seconds < 0:
            raise ValueError(f"drain_seconds must be >= 0, got {drain_seconds}")
        config.timeout_graceful_shutdown = drain_seconds + 10
        super().__init__(config)
        self.drain_seconds, self.abort = drain_seconds, abort
        self._aborted = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    async def shutdown(self, sockets=None) -> None:
        timer = asyncio.get_running_loop().call_later(self.drain_seconds, self._abort_in_thread)
        try:
            await super().shutdown(sockets)
        finally:
            timer.cancel()

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit or self._loop is None:
            super().handle_exit(sig, frame)
            return
        self._loop.call_soon_threadsafe(self._abort_in_thread)  # a second signal: now
        self._loop.call_soon_threadsafe(self._loop.call_later, FLUSH_SECONDS, self._force_exit)

    def _force_exit(self) -> None:
        self.force_exit = True

    def _abort_in_thread(self) -> None:
        """Run ``abort`` once, off the event loop (stopping an engine joins its thread or process)."""
        if not self._aborted.is_set():
            self._aborted.set()
            threading.Thread(target=self.abort, name="llama4-abort", daemon=True).start()
