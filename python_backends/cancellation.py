"""Cancellation that reaches the engine through an ensemble.

tritonserver 2.51 does not carry a client's cancellation into the steps of an ensemble: the engine's
`request.is_cancelled()` stays false and it generates to max_tokens for a client that is gone. The front model sees
its own client cancel, and it names the ensemble request it made (a random request id, which Triton gives every step
of that ensemble request). So the front posts that id to the engine's board, a datagram socket in Linux's abstract
namespace (no file to clean up; it vanishes with the engine's stub), named after the tritonserver process both
stubs are children of and the engine model's name. The engine drops the sequence at its next step.

Only server-side code posts to the board; a request id a client picks itself could only collide with a live one by
guessing 128 random bits.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import KeysView

MAX_ID_BYTES = 256
REMEMBERED_SECONDS = 60.0  # an id posted before the engine saw its request (still queued upstream) waits this long


def board_address(engine_model: str, server_pid: int | None = None) -> bytes:
    """The abstract socket name of `engine_model`'s board in the tritonserver process `server_pid` (default: the
    parent of this stub)."""
    return f"\0tritonllm-cancel/{server_pid or os.getppid()}/{engine_model}".encode()


def post_cancellation(engine_model: str, request_id: str, server_pid: int | None = None) -> bool:
    """Tell the engine that `request_id`'s client is gone; False when no engine board listens (nothing to stop)."""
    payload = request_id.encode("utf-8")[:MAX_ID_BYTES]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
        try:
            sender.sendto(payload, board_address(engine_model, server_pid))
        except OSError:  # no such board (another engine kind) or its buffer is full: the engine is gone or busy
            return False
    return True


class CancellationBoard:
    """The engine's side: ids posted since the last look, remembered for REMEMBERED_SECONDS."""

    def __init__(self, engine_model: str, clock=time.monotonic, server_pid: int | None = None) -> None:
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._socket.bind(board_address(engine_model, server_pid))
        except OSError as error:
            self._socket.close()
            raise RuntimeError(f"{engine_model}: another engine instance of this server holds the cancellation "
                               f"board ({error}); allowed: one instance of the engine model") from None
        self._socket.setblocking(False)
        self._clock = clock
        self._posted: dict[str, float] = {}

    def cancelled_ids(self) -> KeysView[str]:
        """Every id posted within REMEMBERED_SECONDS (reads what arrived since the last call; never blocks)."""
        now = self._clock()
        while True:
            try:
                payload = self._socket.recv(MAX_ID_BYTES)
            except BlockingIOError:
                break
            self._posted[payload.decode("utf-8", "replace")] = now
        if self._posted and now - min(self._posted.values()) > REMEMBERED_SECONDS:
            self._posted = {key: at for key, at in self._posted.items() if now - at <= REMEMBERED_SECONDS}
        return self._posted.keys()

    def forget(self, request_id: str) -> None:
        """The request ended: its id need not be remembered."""
        self._posted.pop(request_id, None)

    def close(self) -> None:
        self._socket.close()
