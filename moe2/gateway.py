"""``moe2 gateway``: the OpenAI API over HTTP, answered by the fusion agents on the bus.

``GET /v1/models``, ``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed as
server-sent events or not (docs/gateway.md). FastAPI on uvicorn; one NATS connection; one model
per subject prefix served. A client that goes away cancels its session on the bus.

``GET /`` is the dashboard (``moe2/dashboard.html``): ``GET /status`` gives it what
``moe2 status`` shows, and its chat box streams through ``/v1/chat/completions``.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import anyio
import structlog
import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from nats.aio.client import Client as NATS
from prometheus_client import CollectorRegistry
from sse_starlette import EventSourceResponse
from starlette.exceptions import HTTPException
from starlette.routing import Route

from moe2.gateway_bodies import ChatBody, CompletionBody, QuestionDefaults, RequestBody
from moe2.gateway_errors import ApiError
from moe2.gateway_replies import Reply
from moe2.runtime import wire
from moe2.runtime.auth import NatsAuth
from moe2.runtime.client import Answer, Client
from moe2.runtime.connection import nats_connection
from moe2.runtime.errors import ErrorCode, Moe2Error
from moe2.runtime.metrics import CountedHttp, HttpMetrics, MetricsApp, serve_metrics
from moe2.runtime.subjects import DEFAULT_PREFIX
from moe2.status import PoolWatch

log = structlog.get_logger("moe2.gateway")
DASHBOARD: Final = Path(__file__).with_name("dashboard.html")
GRACEFUL_SHUTDOWN_S: Final = 3  # open answers get this long to end when the gateway stops
CLIENT_GONE: Final = 499  # nginx's status for a request whose client closed the connection


@dataclass(frozen=True)
class GatewaySettings:
    nats_url: str = "nats://127.0.0.1:4222"
    host: str = "127.0.0.1"
    port: int = 8000  # 0: any free port (``serve_gateway`` reports it)
    prefixes: tuple[str, ...] = (DEFAULT_PREFIX,)  # each one is a model of /v1/models
    defaults: QuestionDefaults = field(default_factory=QuestionDefaults)
    metrics_port: int | None = None  # /metrics on a port of its own too (it is always at /metrics)
    # credentials of a second connection for the pool view (/status, the dashboard, /v1/models'
    # ``moe2``): a user that may read the pool, e.g. the ``admin`` role of docs/security.md. None:
    # the gateway's own connection (whose ``client`` role may not read it under per-role users)
    status_auth: NatsAuth | None = None


class Gateway:
    """What the routes share: a client per served prefix on one NATS connection."""

    def __init__(self, nc: NATS, settings: GatewaySettings, watching: NATS | None = None) -> None:
        self.settings = settings
        self.clients = {p: Client(nc, prefix=p) for p in settings.prefixes}
        self.registry = CollectorRegistry()  # this gateway's metrics (docs/metrics.md)
        # each pool as ``moe2 status`` sees it (on ``watching``, default ``nc``): for
        # /v1/models, /status and the dashboard
        source = settings.nats_url
        self.pools = {p: PoolWatch(watching or nc, p, f"{source} ({p})") for p in self.clients}
        self.started = int(time.time())

    async def start(self) -> None:
        for pool in self.pools.values():
            await pool.start()

    async def models(self) -> dict[str, Any]:
        """One model per served prefix, with the pool behind it in ``moe2``."""
        data = []
        for prefix, pool in self.pools.items():
            await pool.refresh()
            view, now = pool.view, time.monotonic()
            experts = sorted(e for e, seen in view.experts.items() if seen.live(now))
            model = {"id": prefix, "object": "model", "created": self.started, "owned_by": "moe2"}
            pool_now = {"experts": experts, "fusion_agents": sorted(view.fusion)}
            data.append({**model, "moe2": pool_now})
        return {"object": "list", "data": data}

    async def status(self, model: str | None) -> dict[str, Any]:
        """What ``moe2 status`` shows of the pool ``model`` (the first served by default)."""
        prefix = model or next(iter(self.pools))
        self._client(prefix)  # a 404 for a pool not served
        pool = self.pools[prefix]
        await pool.refresh()
        return {"model": prefix, "models": list(self.pools), **pool.snapshot().to_json()}

    async def respond(self, body: RequestBody, request: Request, *, chat: bool) -> Response:
        client = self._client(body.model)
        answer = body.question(self.settings.defaults).ask(client)
        chunks = aiter(answer)
        reply = Reply(chat=chat, model=body.model, include_usage=body.include_usage)
        first = await _unless_disconnected(request, lambda: anext(chunks, None))
        if first is _GONE:
            return Response(status_code=CLIENT_GONE)
        if body.stream:
            return EventSourceResponse(_events(reply, answer, chunks, first), sep="\n")
        if await _unless_disconnected(request, lambda: _drain(chunks)) is _GONE:
            return Response(status_code=CLIENT_GONE)
        assert answer.final is not None, "a stream read to its end has its final message"
        reply.named(answer.final.session)
        _log_done(reply, answer.final, stream=False)
        return JSONResponse(reply.complete(answer.final))

    def _client(self, model: str) -> Client:
        client = self.clients.get(model)
        if client is None:
            served = ", ".join(self.clients)
            message = f"the model {model!r} does not exist; this gateway serves: {served}"
            raise ApiError(404, message, param="model", code="model_not_found")
        return client


_GONE: Final = object()


async def _events(
    reply: Reply,
    answer: Answer,
    chunks: AsyncIterator[wire.Chunk],
    first: wire.Chunk | None,
) -> AsyncIterator[dict[str, str]]:
    """The answer as server-sent events; an error after the first chunk is an error event."""
    try:
        if first is not None:
            reply.named(first.session)
            yield _event(reply.delta(first, first=True))
        async for chunk in chunks:
            yield _event(reply.delta(chunk, first=False))
        final = answer.final
        assert final is not None, "a stream read to its end has its final message"
        reply.named(final.session)
        yield _event(reply.last(final, first=first is None))
        if reply.include_usage:
            yield _event(reply.usage_chunk(final))
        yield {"data": "[DONE]"}
        _log_done(reply, final, stream=True)
    except Moe2Error as exc:
        log.info("answer_failed", id=reply.id, code=str(exc.code), error=exc.message)
        yield _event(ApiError.of(exc).body())
    finally:
        await _close(chunks)


async def _unless_disconnected(request: Request, work: Callable[[], Awaitable[Any]]) -> Any:
    """``await work()``, unless the client disconnects first: then it is cancelled (and with it
    the answer's session on the bus) and ``_GONE`` is returned."""
    result: list[Any] = []
    failed: list[BaseException] = []

    async def run(scope: anyio.CancelScope) -> None:
        try:
            result.append(await work())
        except Exception as exc:  # re-raised below, outside the task group
            failed.append(exc)
        scope.cancel()

    async def watch(scope: anyio.CancelScope) -> None:
        while (await request.receive())["type"] != "http.disconnect":
            continue
        log.info("client_gone", path=request.url.path)
        scope.cancel()

    async with anyio.create_task_group() as tg:
        tg.start_soon(run, tg.cancel_scope)
        tg.start_soon(watch, tg.cancel_scope)
    if failed:
        raise failed[0]
    return result[0] if result else _GONE


async def _drain(chunks: AsyncIterator[wire.Chunk]) -> None:
    async for _ in chunks:
        pass


async def _close(chunks: AsyncIterator[wire.Chunk]) -> None:
    """Close the answer's stream: a session still running on the bus is cancelled."""
    if isinstance(chunks, AsyncGenerator):
        await chunks.aclose()


def _event(body: dict[str, Any]) -> dict[str, str]:
    return {"data": json.dumps(body, separators=(",", ":"))}


def _log_done(reply: Reply, final: wire.Final, *, stream: bool) -> None:
    log.info(
        "answer_done",
        id=reply.id,
        model=reply.model,
        stream=stream,
        tokens=final.usage.completion_tokens,
        experts=final.experts,
        finish=final.finish_reason,
    )


def create_app(gateway: Gateway) -> FastAPI:
    app = FastAPI(title="moe2 gateway", docs_url=None, redoc_url=None, openapi_url=None)
    _answer_errors_in_openai_shape(app)
    routes = ("/", "/status", "/v1/models", "/v1/chat/completions", "/v1/completions", "/metrics")
    app.add_middleware(CountedHttp, metrics=HttpMetrics(gateway.registry, routes))
    app.router.routes.append(Route("/metrics", MetricsApp(gateway.registry), methods=["GET"]))

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return await gateway.models()

    @app.get("/status")
    async def status(model: str | None = None) -> dict[str, Any]:
        return await gateway.status(model)

    page = DASHBOARD.read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse)
    async def dashboard() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody, request: Request) -> Response:
        return await gateway.respond(body, request, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request) -> Response:
        return await gateway.respond(body, request, chat=False)

    return app


def _answer_errors_in_openai_shape(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        log.info("request_refused", status=exc.status, code=exc.code, error=exc.message)
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers())

    async def moe2_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, Moe2Error)
        return await api_error(request, ApiError.of(exc))

    async def invalid_body(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        first = exc.errors()[0]
        if first["type"] == "json_invalid":
            message = f"the body is not JSON: {first.get('ctx', {}).get('error', first['msg'])}"
            return await api_error(request, ApiError(400, message, code=str(ErrorCode.MALFORMED)))
        param = ".".join(str(p) for p in first["loc"] if p != "body") or None
        message = f"{param}: {first['msg']}" if param else str(first["msg"])
        return await api_error(request, ApiError.invalid(message, param))

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        refused = ApiError(exc.status_code, str(exc.detail))
        return JSONResponse(refused.body(), status_code=exc.status_code, headers=exc.headers)

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(Moe2Error, moe2_error)
    app.add_exception_handler(RequestValidationError, invalid_body)
    app.add_exception_handler(HTTPException, http_error)


def listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections wait here until uvicorn accepts them
    except OSError as exc:
        sock.close()
        raise Moe2Error(
            ErrorCode.INVALID_FIELD, f"cannot listen on {host}:{port}: {exc.strerror}"
        ) from None
    return sock


async def serve_gateway(
    settings: GatewaySettings,
    *,
    task_status: anyio.abc.TaskStatus[int] = anyio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until cancelled, or until uvicorn's own SIGTERM/SIGINT handlers stop it (they are
    installed while it serves; the signal is raised again for the caller's handlers after). Either
    way, open streams end within a second (sse-starlette watches the server), which cancels their
    sessions; other requests get ``GRACEFUL_SHUTDOWN_S``.

    ``await tg.start(serve_gateway, settings)`` gives the port once connections are accepted."""
    sock = listening_socket(settings.host, settings.port)
    async with (
        nats_connection(settings.nats_url, name="moe2-gateway") as nc,
        _status_connection(settings) as watching,
    ):
        gateway = Gateway(nc, settings, watching)
        await gateway.start()
        config = uvicorn.Config(
            create_app(gateway),
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = uvicorn.Server(config)
        async with (
            serve_metrics(gateway.registry, settings.metrics_port, settings.host),
            anyio.create_task_group() as tg,
        ):
            tg.start_soon(_serve_shielded, server, sock, tg.cancel_scope)
            port = int(sock.getsockname()[1])
            log.info(
                "gateway_ready", url=f"http://{settings.host}:{port}/v1", models=settings.prefixes
            )
            task_status.started(port)
            try:
                await anyio.sleep_forever()
            finally:
                server.should_exit = True  # uvicorn's graceful shutdown, bounded


@asynccontextmanager
async def _status_connection(settings: GatewaySettings) -> AsyncIterator[NATS | None]:
    """The pool view's own connection when ``status_auth`` is given, else None."""
    if settings.status_auth is None:
        yield None
        return
    auth = settings.status_auth
    async with nats_connection(settings.nats_url, name="moe2-gateway-status", auth=auth) as nc:
        yield nc


async def _serve_shielded(
    server: uvicorn.Server, sock: socket.socket, scope: anyio.CancelScope
) -> None:
    with anyio.CancelScope(shield=True):
        await server.serve(sockets=[sock])
    scope.cancel()  # uvicorn stopped by itself (a signal): stop waiting for it
