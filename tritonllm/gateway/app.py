"""The gateway's HTTP routes (FastAPI): OpenAI chat/completions/models, health and Prometheus metrics.

A request is checked in this order, each step answering in OpenAI's error shape: API key (401), rate limit (429 with
Retry-After), body size and nesting (413/400, before parsing), every field (400 naming it). Only then is it sent to a
Triton replica, with the tenant of its key (a client cannot name one). A request that fails before its first piece
because a replica cannot be reached is retried on another; a client that goes away cancels its Triton stream.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from tritonllm.client.api import AsyncStream, GenerationError, GenerationParams, StreamCancelled, StreamEvent
from tritonllm.contract import GATEWAY_AUTO_MODELS, GatewaySettings
from tritonllm.gateway.auth import OPEN_ACCESS, ApiKey, KeyRing, RateLimited, RateLimiter
from tritonllm.gateway.openai_api import (SSE_DONE, APIError, GenerationRequest, Guide, Kind, ResponseWriter, Usage,
                                          parse_body, parse_request, sse)
from tritonllm.gateway.replicas import HealthWatch, Replica, ReplicaPool, grpc_ready_model
from tritonllm.gateway.tokens import PromptTokens
from tritonllm.gateway.upstream import ReplicaChannels

log = logging.getLogger("tritonllm.gateway")

READY_TIMEOUT_SECONDS = 2.0
# Triton statuses of a request that never reached a model: another replica may serve it.
RETRYABLE_STATUSES = frozenset({"UNAVAILABLE"})
ENDPOINT_PATHS: dict[Kind, str] = {"chat": "/v1/chat/completions", "completion": "/v1/completions"}


class ClientGone(Exception):
    """The HTTP client disconnected; its Triton stream has been cancelled."""


class GatewayMetrics:
    def __init__(self, pool: ReplicaPool) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tritonllm_gateway_requests", "Requests answered, by endpoint and HTTP status",
                                ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("tritonllm_gateway_request_seconds", "Time from request to the end of its answer",
                                 ["endpoint"], registry=self.registry,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
        self.first_piece = Histogram("tritonllm_gateway_time_to_first_token_seconds",
                                     "Time from request to the first piece of the answer", registry=self.registry,
                                     buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.active_streams = Gauge("tritonllm_gateway_active_streams", "Triton streams open now",
                                    registry=self.registry)
        self.tokens = Counter("tritonllm_gateway_tokens", "Tokens served, by tenant and kind (prompt, completion)",
                              ["tenant", "kind"], registry=self.registry)
        self.cancelled = Counter("tritonllm_gateway_client_disconnects", "Requests whose client went away before "
                                 "the answer ended (their Triton stream was cancelled)", registry=self.registry)
        in_flight = Gauge("tritonllm_gateway_replica_in_flight", "Requests in flight per replica", ["replica"],
                          registry=self.registry)
        ready = Gauge("tritonllm_gateway_replica_ready", "1 while a replica is in rotation", ["replica"],
                      registry=self.registry)
        for replica in pool.replicas:
            in_flight.labels(replica.url).set_function(lambda replica=replica: replica.in_flight)
            ready.labels(replica.url).set_function(lambda replica=replica: float(replica.ready))

    def answered(self, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(time.perf_counter() - started)


@dataclass
class OpenStream:
    """A Triton stream that produced its first response (or ended without one)."""

    upstream: AsyncStream
    replica: Replica
    first: StreamEvent | None


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _triton_error(error: GenerationError, guide: Guide | None = None) -> APIError:
    if error.status == "DEADLINE_EXCEEDED":
        return APIError(504, f"Triton did not answer in time: {error.message}", error_type="server_error",
                        code="timeout")
    if error.status in RETRYABLE_STATUSES:
        return APIError(503, f"no Triton replica could take the request: {error.message}",
                        error_type="server_error", code="unavailable")
    # Errors inside a Triton stream carry no status code; the models raise them for requests they refuse. A refused
    # constraint names its ensemble input; the client knows it by the field it sent.
    if guide is not None and f"input {guide.input}" in error.message:
        return APIError(400, f"{guide.param} was refused by the model: {error.message}", param=guide.param,
                        code="invalid_value")
    return APIError(400, f"the model refused the request: {error.message}", code="invalid_request")


class ClientWatch:
    """Watches one HTTP client's connection from its own task and cancels the request's Triton stream the moment
    the client goes away (uvicorn keeps accepting a gone client's chunks, so writing would never tell)."""

    def __init__(self, request: Request) -> None:
        self.stream: AsyncStream | None = None
        self._task = asyncio.ensure_future(self._watch(request))

    async def _watch(self, request: Request) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if self.stream is not None:
            self.stream.cancel()

    def stop(self) -> None:
        self._task.cancel()


class EventStream(StreamingResponse):
    """An SSE answer sent straight from its iterator. Starlette's StreamingResponse would also start a task group
    with a second disconnect listener per request (uvicorn speaks ASGI 2.3), before the first chunk; ClientWatch
    already is that listener. The chunk that ends with `[DONE]` also ends the HTTP body (one write instead of two)."""

    def __init__(self, content: AsyncIterator[bytes]) -> None:
        super().__init__(content, media_type="text/event-stream")

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        done = False
        async for chunk in self.body_iterator:
            done = chunk.endswith(SSE_DONE)
            await send({"type": "http.response.body", "body": chunk, "more_body": not done})
        if not done:  # the client went away before the end
            await send({"type": "http.response.body", "body": b"", "more_body": False})


class Gateway:
    def __init__(self, settings: GatewaySettings, keys: tuple[ApiKey, ...], tokens: PromptTokens) -> None:
        settings.validate()
        self.settings, self.tokens = settings, tokens
        self.keyring = KeyRing(keys)
        self.limiter = RateLimiter(keys or (OPEN_ACCESS,))
        candidates = GATEWAY_AUTO_MODELS if settings.model == "auto" else (settings.model,)
        self.pool = ReplicaPool(settings.triton_grpc_urls, candidates[-1], functools.partial(
            grpc_ready_model, candidates=candidates, timeout=READY_TIMEOUT_SECONDS))
        self.metrics = GatewayMetrics(self.pool)
        self.channels = ReplicaChannels(settings.request_timeout_seconds)
        if not keys:
            log.warning("no API keys configured: the gateway serves anyone who reaches it, as tenant ''")

    # -- checks before Triton --------------------------------------------------------------------------------------
    def authenticate(self, authorization: str | None) -> ApiKey:
        if not self.keyring.required:
            return OPEN_ACCESS
        key = self.keyring.lookup(authorization)
        if key is None:
            raise APIError(401, "missing or unknown API key; send it as `Authorization: Bearer <key>`",
                           error_type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})
        return key

    def _admit(self, key: ApiKey) -> None:
        try:
            self.limiter.admit(key)
        except RateLimited as limited:
            raise APIError(429, f"rate limit of this API key reached: {limited.limit}; retry after "
                                f"{limited.retry_after_seconds} s", error_type="rate_limit_error",
                           code="rate_limit_exceeded",
                           headers={"Retry-After": str(limited.retry_after_seconds)}) from None

    async def _read_body(self, request: Request) -> bytes:
        """The body, refused (413) as soon as it grows past the limit, before it is all read."""
        limit = self.settings.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body is {declared} bytes; allowed: at most {limit}",
                           code="request_too_large")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise APIError(413, f"request body is over {limit} bytes; allowed: at most {limit}",
                               code="request_too_large")
            chunks.append(chunk)
        return b"".join(chunks)

    # -- Triton ----------------------------------------------------------------------------------------------------
    @staticmethod
    async def _next(upstream: AsyncStream) -> StreamEvent | None:
        """The next response of `upstream`, None at its end; ClientGone when the client's watch cancelled it."""
        try:
            return await upstream.__anext__()
        except StopAsyncIteration:
            return None
        except StreamCancelled:
            raise ClientGone from None

    async def _open(self, request: GenerationRequest, prompt: str, params: GenerationParams,
                    watch: ClientWatch) -> OpenStream:
        """A stream on the least loaded replica; one that cannot be reached before the first response is left out
        of rotation and the request goes to the next."""
        tried: set[str] = set()
        last: GenerationError | None = None
        for _ in range(self.settings.max_attempts):
            replica = self.pool.choose(tried)
            if replica is None:
                break
            tried.add(replica.url)
            upstream = watch.stream = self.channels.open(replica.url, replica.model, prompt, params, request.stream)
            try:
                return OpenStream(upstream, replica, await self._next(upstream))
            except GenerationError as error:
                self.pool.release(replica)
                if error.status not in RETRYABLE_STATUSES:
                    raise _triton_error(error, request.guide) from None
                log.warning("replica %s failed before the first token (%s); out of rotation", replica.url, error)
                self.pool.mark_unready(replica)
                last = error
            except BaseException:
                upstream.cancel()
                self.pool.release(replica)
                raise
        raise _triton_error(last or GenerationError("UNAVAILABLE", "every replica was tried"))

    def _params(self, request: GenerationRequest, key: ApiKey) -> GenerationParams:
        return GenerationParams(max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
                                seed=request.seed, min_tokens=request.min_tokens,
                                stop_words=list(request.stop) if request.stop else None,
                                tenant=key.tenant, **({request.guide.input: request.guide.text} if request.guide
                                                      else {}))

    def _usage(self, key: ApiKey, prompt: str, answer: str) -> Usage:
        usage = Usage(self.tokens.count_prompt(prompt), self.tokens.count_completion(answer))
        self.limiter.charge_tokens(key, usage.prompt_tokens + usage.completion_tokens)
        self.metrics.tokens.labels(key.tenant, "prompt").inc(usage.prompt_tokens)
        self.metrics.tokens.labels(key.tenant, "completion").inc(usage.completion_tokens)
        return usage

    # -- endpoints -------------------------------------------------------------------------------------------------
    async def generate(self, request: Request, kind: Kind) -> Response:
        started, endpoint = time.perf_counter(), ENDPOINT_PATHS[kind]
        watch = None
        try:
            key = self.authenticate(request.headers.get("authorization"))
            self._admit(key)
            parsed = parse_request(parse_body(await self._read_body(request), self.settings), kind, self.settings)
            prompt = self.tokens.prompt_text(parsed)
            watch = ClientWatch(request)
            opened = await self._open(parsed, prompt, self._params(parsed, key), watch)
        except APIError as error:
            if watch is not None:
                watch.stop()
            self.metrics.answered(endpoint, error.status, started)
            return error_response(error)
        except ClientGone:
            watch.stop()
            self.metrics.cancelled.inc()
            self.metrics.answered(endpoint, 499, started)  # nginx's "client closed request"
            return Response(status_code=499)
        self.metrics.first_piece.observe(time.perf_counter() - started)
        writer = ResponseWriter(parsed, self.settings.served_model_name)
        answer = self._answer(opened, watch, writer, key, prompt, endpoint, started)
        if parsed.stream:
            return EventStream(answer)
        try:
            return JSONResponse([body async for body in answer][-1])
        except APIError as error:
            return error_response(error)
        except ClientGone:
            return Response(status_code=499)

    async def _answer(self, opened: OpenStream, watch: ClientWatch, writer: ResponseWriter, key: ApiKey,
                      prompt: str, endpoint: str, started: float) -> AsyncIterator:
        """Stream: SSE chunks as bytes. Whole answer: one body (a dict) at the end. Either way the Triton stream
        ends, or is cancelled, before this returns."""
        stream = writer.request.stream
        pieces: list[str] = []
        status = 200
        self.metrics.active_streams.inc()
        try:
            # The opening chunk goes out with the first piece, and the closing chunks with [DONE]: one write each
            # instead of several on the way to the first token and at the end.
            opening = sse(writer.first_chunk()) if stream else b""
            event = opened.first
            while event is not None:
                pieces.append(event.text)
                if stream and event.text:
                    yield opening + sse(writer.piece(event.text))
                    opening = b""
                event = await self._next(opened.upstream)
            usage = self._usage(key, prompt, "".join(pieces))
            if stream:
                yield opening + b"".join(sse(chunk) for chunk in writer.last_chunks(usage)) + SSE_DONE
            else:
                yield writer.whole("".join(pieces), usage)
        except (ClientGone, asyncio.CancelledError) as gone:  # ours, or Starlette's when it saw the disconnect first
            status = 499
            self.metrics.cancelled.inc()
            if isinstance(gone, asyncio.CancelledError) or not stream:
                raise
        except GenerationError as error:  # after the first piece: the status line is sent, the error goes in-band
            failure = _triton_error(error, writer.request.guide)
            status = failure.status
            if not stream:
                raise failure from None
            yield sse(failure.body()) + SSE_DONE
        finally:
            opened.upstream.cancel()
            watch.stop()
            self.pool.release(opened.replica)
            self.metrics.active_streams.dec()
            self.metrics.answered(endpoint, status, started)

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.settings.served_model_name, "object": "model",
                                            "created": 0, "owned_by": "tritonllm"}]}

    def health(self) -> JSONResponse:
        ready = self.pool.ready_count()
        return JSONResponse({"status": "ok" if ready else "unavailable", "replicas_ready": ready,
                             "replicas": len(self.pool.replicas)}, status_code=200 if ready else 503)

    def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(gateway: Gateway) -> FastAPI:
    """The ASGI app; its lifespan runs the replicas' readiness checks."""
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        watch = HealthWatch(gateway.pool, gateway.settings.health_interval_seconds)
        watch.start()
        try:
            yield
        finally:
            watch.stop()
            await gateway.channels.close()

    app = FastAPI(title="tritonllm OpenAI-compatible gateway", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)

    async def chat_completions(request: Request) -> Response:
        return await gateway.generate(request, "chat")

    async def completions(request: Request) -> Response:
        return await gateway.generate(request, "completion")

    # Plain Starlette routes: the gateway reads and checks the body itself, so FastAPI's per-request dependency
    # solving and exit stack would only add CPU to every generation request.
    app.add_route(ENDPOINT_PATHS["chat"], chat_completions, methods=["POST"])
    app.add_route(ENDPOINT_PATHS["completion"], completions, methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> Response:
        try:
            gateway.authenticate(request.headers.get("authorization"))
        except APIError as error:
            return error_response(error)
        return JSONResponse(gateway.models())

    @app.get("/health")
    async def health() -> Response:
        return gateway.health()

    @app.get("/metrics")
    async def metrics() -> Response:
        return gateway.metrics_text()

    return app
