"""The HTTP bridge (`tekton gateway --http PORT`): for clients that do not speak NATS.

- JSON and SSE chat per specialist (or `@capability`), sessions, bulk, discovery: `/api/...`
- JSON-RPC 2.0 over a WebSocket at `/ws`, with `stream.chunk` / `stream.complete` notifications
- OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`
- MCP streamable HTTP at `/mcp`, A2A agents at `/a2a/NAME/`, Prometheus `/metrics`
- a small browser console at `/`, the OpenAPI document at `/openapi.json`

Every request is turned into the same bus calls aish makes; tokens go from the NATS stream to the
HTTP client with no per-token work beyond encoding.

This module wires the pieces together; each protocol is its own module (rest, openai, jsonrpc, a2a,
metrics), over the bus client and the one error map (bus/errors.py POLICY).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import anyio
from anyio.abc import TaskStatus
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Route

from bridge import jsonrpc, openai, rest
from bridge.a2a import A2ARouter
from bridge.edge import (
    LOCAL_HOSTS,
    EdgeGuard,
    Guard,
    PlainRoutes,
    bus_error_response,
    validation_error_response,
)
from bridge.mcp import McpEndpoint
from bridge.metrics import BusCollector, BusFigures
from bridge.rest import ChatBody, open_body
from bridge.tracing import TraceContext
from bus.client import Bus, connect_as
from bus.errors import (
    BadRequest,
    BusError,
    ErrorCode,
    NatsUnavailable,
)
from bus.failover import Opened
from bus.settings import TektonSettings


@dataclass
class Bridge:
    """What the protocol modules' routes need from the app."""

    settings: TektonSettings
    guard: Guard
    bus: Callable[..., Bus]
    admitted: Callable[..., Awaitable[str]]
    admit_scope: Callable[[dict[str, Any]], str]  # `admitted` for a plain ASGI route, from its scope
    open_stream: Callable[[ChatBody, str], Awaitable[Opened]]


# The framework's refusals by status: no such route, a route not taking this method.
_FRAMEWORK_CODES = {404: ErrorCode.NOT_FOUND, 405: ErrorCode.METHOD_NOT_ALLOWED}


def create_app(
    settings: TektonSettings, *, host: str = "127.0.0.1", ready: anyio.Event | None = None, tls: bool = False
) -> FastAPI:
    """The bridge's app; ``ready`` is set once it is connected to NATS and can serve."""
    tokens = settings.http_tokens or []
    if host not in LOCAL_HOSTS and not (tokens and tls):
        raise BadRequest(
            f"the HTTP bridge on {host} needs API tokens (TEKTON_HTTP_TOKENS) and TLS (--tls); without "
            "them it only listens on localhost"
        )
    guard = Guard(tokens, settings.http_rate_per_s, settings.http_burst)
    state: dict[str, Bus] = {}

    async def keep_connected(*, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """The bridge's connection; a new one whenever nats-py closes it for good (a server -ERR)."""
        first = True
        while True:
            lost = anyio.Event()
            try:
                # The gateway's identity: it may put any caller's user name in gateway subjects.
                nc = await connect_as(settings, name="tekton-http", identity="gateway", closed=lost)
            except NatsUnavailable:
                if first:
                    raise
                await anyio.sleep(1.0)  # a retry's backoff: the server is away
                continue
            state.clear()  # the per-user buses of a lost connection go with it
            state["bus"] = Bus(nc, settings)
            if first:
                first = False
                task_status.started()
            try:
                await lost.wait()
            finally:
                with anyio.CancelScope(shield=True):
                    if not nc.is_closed:
                        await nc.drain()

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        async with anyio.create_task_group() as tg, mcp.running():
            await tg.start(keep_connected)
            if ready is not None:
                ready.set()
            try:
                yield
            finally:
                tg.cancel_scope.cancel()

    app = FastAPI(
        title="Tekton",
        version="0.1.0",
        description="Talk to Tekton's AI specialists over HTTP: JSON, SSE, JSON-RPC over WebSocket, "
        "and an OpenAI-compatible API.",
        lifespan=lifespan,
    )

    def bus(caller: str | None = None) -> Bus:
        """The bus as the caller's user (one Bus, with its own inbox, per user, on one connection)."""
        user = guard.user(caller) if caller is not None else None
        if user is None:
            return state["bus"]
        if user not in state:
            state[user] = Bus(state["bus"].nc, settings, acting_for=user)
        return state[user]

    app.state.bus = bus  # the connection in use now (it is replaced when lost)

    def admit(authorization: str | None, client: str) -> str:
        """The caller of a request with these credentials, admitted (or BusError: who may not)."""
        # ?token= only on /ws, where a browser cannot set a header: in a URL it ends up in logs.
        caller = guard.caller(authorization, None, client)
        guard.admit(caller)
        return caller

    async def admitted(request: Request) -> str:
        return admit(request.headers.get("authorization"), request.client.host if request.client else "?")

    def admit_scope(scope: dict[str, Any]) -> str:
        authorization = next((v for k, v in scope["headers"] if k.lower() == b"authorization"), None)
        client = scope.get("client") or ("?", 0)
        return admit(authorization.decode("latin-1") if authorization is not None else None, client[0])

    def a2a_bus(scope: dict[str, Any]) -> Bus:
        return bus(admit_scope(scope))

    app.mount("/a2a", A2ARouter(a2a_bus, bearer=bool(tokens)))  # docs/interop.md

    def mcp_bus(ctx: Any) -> Bus:
        """An MCP request's bus: its API token's user (admitted already by the endpoint)."""
        request = ctx.request
        client = request.client.host if request is not None and request.client else "?"
        authorization = request.headers.get("authorization") if request is not None else None
        return bus(guard.caller(authorization, None, client))

    mcp = McpEndpoint(mcp_bus, a2a_bus)  # MCP streamable HTTP, docs/interop.md
    app.router.routes.append(Route("/mcp", mcp, methods=["GET", "POST", "DELETE"], include_in_schema=False))

    @app.get("/metrics", summary="Prometheus metrics of every specialist on the bus", include_in_schema=False)
    async def metrics(caller: str = Depends(admitted)) -> Response:
        figures = BusFigures()
        await figures.refresh(bus(caller), window=0.2)
        registry = CollectorRegistry()
        registry.register(BusCollector(figures))
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(BusError)
    async def bus_error(_: Request, err: BusError) -> JSONResponse:
        return bus_error_response(err)

    @app.exception_handler(StarletteHTTPException)
    async def framework_refusal(_: Request, err: StarletteHTTPException) -> JSONResponse:
        """The framework's own refusals (no such route, a method not allowed, a body that is not JSON)
        in the bridge's error body, like every other error."""
        code = _FRAMEWORK_CODES.get(err.status_code, ErrorCode.BAD_REQUEST)
        body = {"error": {"code": str(code), "message": str(err.detail)[:500], "retryable": False}}
        return JSONResponse(body, status_code=err.status_code, headers=err.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        """A 422 that names the problems and never echoes the body back (it may be megabytes)."""
        problems = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in err.errors()]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems[:3])
        body = {"error": {"code": "bad_request", "message": message[:500], "details": problems[:20]}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, err: ValidationError) -> JSONResponse:
        return validation_error_response(err)

    async def open_stream(body: ChatBody, caller: str) -> Opened:
        return await open_body(bus(caller), body)

    ctx = Bridge(settings, guard, bus, admitted, admit_scope, open_stream)
    for protocol in (rest, openai, jsonrpc):
        protocol.add_routes(app, ctx)
    # In front of the routes a request meets, in this order: trace context, the edge's checks (which
    # read the body), the hot routes as plain ASGI (edge.PlainRoutes: SSE chat, OpenAI streaming).
    # (Starlette puts the middleware added last outermost.)
    app.add_middleware(PlainRoutes, routes={**rest.plain_routes(ctx), **openai.plain_routes(ctx)})
    app.add_middleware(EdgeGuard, settings=settings, host=host)
    app.add_middleware(TraceContext)
    return app
