"""The engine's cancellation board: what the front posts reaches the engine of the same server only."""

from __future__ import annotations

import os

import pytest

from tritonllm.python_backends.cancellation import REMEMBERED_SECONDS, CancellationBoard, post_cancellation


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def server_pid() -> int:
    return os.getpid()  # stands in for the tritonserver process both stubs are children of


def test_a_posted_id_is_seen_until_forgotten(server_pid):
    board = CancellationBoard("engine", server_pid=server_pid)
    try:
        assert not board.cancelled_ids()
        assert post_cancellation("engine", "a1", server_pid)
        assert "a1" in board.cancelled_ids() and "a2" not in board.cancelled_ids()
        board.forget("a1")
        assert "a1" not in board.cancelled_ids()
    finally:
        board.close()


def test_an_id_never_claimed_is_dropped_after_a_while(server_pid):
    clock = Clock()
    board = CancellationBoard("engine", clock, server_pid)
    try:
        post_cancellation("engine", "early", server_pid)
        assert "early" in board.cancelled_ids()
        clock.now += REMEMBERED_SECONDS + 1
        post_cancellation("engine", "late", server_pid)
        assert set(board.cancelled_ids()) == {"late"}
    finally:
        board.close()


def test_boards_are_per_server_and_per_engine_model(server_pid):
    board = CancellationBoard("engine", server_pid=server_pid)
    try:
        assert not post_cancellation("engine", "x", server_pid + 1)  # another server: nobody listens there
        assert not post_cancellation("tensorrt_llm", "x", server_pid)  # an engine without a board
        assert "x" not in board.cancelled_ids()
        with pytest.raises(RuntimeError, match="allowed: one instance of the engine model"):
            CancellationBoard("engine", server_pid=server_pid)
    finally:
        board.close()
