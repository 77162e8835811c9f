"""One request to one Triton replica, seen from the event loop.

The project's own client (`tritonllm.client.api.LLMClient`, gRPC streaming) runs on a thread of its own per request
(a stream holds its thread for its whole length, so a shared pool would cap concurrency); its responses are handed to
the event loop as they come. `close()` is the one thing done when the HTTP client goes away: it cancels the Triton
gRPC stream.
"""

from __future__ import annotations

import asyncio
import threading

from tritonllm.client.api import GenerationParams, LLMClient, StreamCancel, StreamEvent

_END = object()


class TritonStream:
    def __init__(self, url: str, model: str, prompt: str, params: GenerationParams, stream: bool,
                 timeout: float) -> None:
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._cancel = StreamCancel()
        client = LLMClient(url, "grpc", model, timeout)
        self._thread = threading.Thread(target=self._pump, args=(client, prompt, params, stream), daemon=True,
                                        name="gateway-stream")
        self._thread.start()

    def _pump(self, client: LLMClient, prompt: str, params: GenerationParams, stream: bool) -> None:
        try:
            for event in client.events(prompt, params, stream, cancel=self._cancel):
                self._hand_over(event)
            self._hand_over(_END)
        except Exception as error:  # raised on the event loop by next()
            self._hand_over(error)

    def _hand_over(self, item: object) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed (gateway shutting down): nobody is waiting any more
            self._cancel.cancel()

    async def next(self) -> StreamEvent | None:
        """The next response, None at the end of the stream; a failed request raises its error here."""
        item = await self._queue.get()
        if item is _END:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Cancels the Triton stream (a no-op once it has ended)."""
        self._cancel.cancel()
