"""The gateway's gRPC connections to its Triton replicas, seen from the event loop.

Each replica gets one `grpc.aio` channel (one HTTP/2 connection), with tritonclient's generated stub on it, that all
its requests share: a request is one bidirectional stream on it (`tritonllm.client.api.AsyncStream`), with no thread
and no new connection per request. The channel reconnects by itself; its backoff is capped so that a replica that
restarts is reachable again about as soon as its readiness check says so.
"""

from __future__ import annotations

from tritonllm.client.api import AsyncStream, GenerationParams

MAX_RECONNECT_BACKOFF_MS = 1000
MAX_MESSAGE_BYTES = 2**31 - 1  # tritonclient's own default: answers are never cut by the channel


def _channel_options() -> list[tuple[str, int]]:
    from tritonclient.grpc import KeepAliveOptions

    keepalive = KeepAliveOptions()
    return [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.keepalive_time_ms", keepalive.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", keepalive.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", keepalive.keepalive_permit_without_calls),
            ("grpc.http2.max_pings_without_data", keepalive.http2_max_pings_without_data),
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS)]


class ReplicaChannels:
    """One `grpc.aio` channel and Triton stub per replica URL, made on first use inside the running event loop
    (grpc.aio channels belong to the loop that made them) and closed by `close()` before that loop ends."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        self._channels: list = []
        self._stubs: dict = {}  # url -> its GRPCInferenceServiceStub

    def open(self, url: str, model: str, prompt: str, params: GenerationParams, stream: bool) -> AsyncStream:
        stub = self._stubs.get(url)
        if stub is None:
            import grpc.aio
            from tritonclient.grpc import service_pb2_grpc

            channel = grpc.aio.insecure_channel(url, options=_channel_options())
            self._channels.append(channel)
            stub = self._stubs[url] = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return AsyncStream(stub, model, prompt, params, stream, self.timeout)

    async def close(self) -> None:
        channels, self._channels, self._stubs = self._channels, [], {}
        for channel in channels:
            await channel.close()
