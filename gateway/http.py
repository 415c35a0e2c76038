"""The HTTP bridge (`tekton gateway --http PORT`): for clients that do not speak NATS.

- JSON and SSE chat per specialist (or `@capability`), sessions, bulk, discovery: `/api/...`
- JSON-RPC 2.0 over a WebSocket at `/ws`, with `stream.chunk` / `stream.complete` notifications
- OpenAI-compatible `POST /v1/chat/completions` and `GET /v1/models`
- a small browser console at `/`, the OpenAPI document at `/openapi.json`

Every request is turned into the same bus calls aish makes; tokens go from the NATS stream to the
HTTP client with no per-token work beyond encoding.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, Literal
from urllib.parse import urlsplit

import anyio
from anyio.abc import TaskStatus
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from bus.bulk import BulkPlan, BulkStream
from bus.client import Bus, ChatStream, connect_as
from bus.errors import (
    RPC_INTERNAL,
    RPC_INVALID_PARAMS,
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_PARSE_ERROR,
    BadRequest,
    BusError,
    NatsUnavailable,
    RateLimited,
    Unauthorized,
)
from bus.failover import Opened, open_first
from bus.settings import TektonSettings
from bus.subjects import TARGET_PATTERN
from bus.wire import ChatMessage, ChatOptions

LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
NO_CACHE = {"Cache-Control": "no-cache"}


class ChatBody(BaseModel):
    """A chat request over HTTP: one ``message`` or the whole ``messages`` list."""

    specialist: str = Field(
        pattern=TARGET_PATTERN, description="a specialist name, `@capability`, or `@auto`"
    )
    message: str | None = None
    messages: list[ChatMessage] | None = None
    session: str | None = None
    options: ChatOptions = ChatOptions()

    def chat_messages(self) -> list[ChatMessage]:
        if self.messages:
            return self.messages
        if self.message is None:
            raise BadRequest("give `message` or `messages`")
        return [ChatMessage(role="user", content=self.message)]


class OpenAIMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class OpenAIChat(BaseModel):
    model: str = Field(pattern=TARGET_PATTERN, description="a specialist name, `@capability` or `@auto`")
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)


class SessionCreateBody(BaseModel):
    specialist: str | None = None
    name: str | None = None
    context_window: int = 10
    metadata: dict[str, str] = {}


class ForkBody(BaseModel):
    at: int | None = None
    name: str | None = None


class ClosingStream(StreamingResponse):
    """Server-sent events over an already open bus stream, which is closed however the response ends:
    also when the client leaves before the first byte (the body generator then never runs, and the
    specialist would go on answering nobody)."""

    def __init__(self, content: AsyncIterator[str], opened: ChatStream | BulkStream):
        super().__init__(content, media_type="text/event-stream", headers=NO_CACHE)
        self.opened = opened

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.opened.__aexit__(None, None, None)  # closing twice is harmless


def error_body(err: BusError) -> dict[str, Any]:
    return {"error": {"code": str(err.code), "message": err.message, "retryable": err.retryable}}


@dataclass
class Bucket:
    """A token bucket: ``rate`` requests a second, bursts up to ``burst``."""

    rate: float
    burst: float
    tokens: float = field(default=-1.0)
    at: float = field(default_factory=time.monotonic)

    def take(self) -> float:
        """0 when allowed, else the seconds to wait."""
        now = time.monotonic()
        if self.tokens < 0:
            self.tokens = self.burst
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


# Wrong tokens from one address: a few at once, then one a second (guessing tokens is slow).
FAILED_RATE_PER_S = 1.0
FAILED_BURST = 5.0


class Guard:
    """API tokens (required unless the bridge listens on localhost only) and a rate limit per caller.

    A token given as ``NAME=TOKEN`` acts as the bus user NAME: its sessions and bulk requests are
    NAME's, exactly as if NAME used aish (the bridge holds the gateway's credentials, which may use
    any user's name in gateway subjects). A bare token acts as the bridge's own identity.
    """

    def __init__(self, tokens: list[str], rate: float, burst: float):
        self.users: dict[str, str | None] = {}
        for entry in tokens:
            name, sep, token = entry.partition("=")
            self.users[token if sep else entry] = name if sep else None
        self.tokens = set(self.users)
        self.rate, self.burst = rate, burst
        self.buckets: dict[str, Bucket] = {}

    def caller(self, authorization: str | None, token_param: str | None, client: str) -> str:
        given = token_param
        if authorization and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if self.tokens:
            if given not in self.tokens:
                self.admit(f"failed:{client}", FAILED_RATE_PER_S, FAILED_BURST)
                raise Unauthorized("a valid API token is needed")
            return f"token:{given}"
        return f"client:{client}"

    def user(self, caller: str) -> str | None:
        """The bus user a caller acts as (None: the bridge's own)."""
        return self.users.get(caller.removeprefix("token:")) if caller.startswith("token:") else None

    def admit(self, caller: str, rate: float | None = None, burst: float | None = None) -> None:
        bucket = Bucket(rate or self.rate, burst or self.burst)
        wait = self.buckets.setdefault(caller, bucket).take()
        if wait:
            raise RateLimited(max(1, math.ceil(wait)))


def _hostname(netloc: str) -> str:
    """``host`` of ``host:port`` / ``[v6]:port``, lower case."""
    return (urlsplit(f"//{netloc}").hostname or "").lower()


class EdgeGuard:
    """Before any route: the Host header (DNS rebinding), the Origin of browser requests (another web
    page the user has open), and the request body's size. ASGI middleware, so it covers /ws too."""

    def __init__(self, app: Any, settings: TektonSettings, host: str):
        self.app = app
        self.max_body = settings.http_max_body_bytes
        self.origins = set(settings.http_allowed_origins or [])
        hosts = settings.http_allowed_hosts
        # On loopback only loopback names are this bridge; elsewhere API tokens guard it (see Guard).
        self.hosts = set(hosts) if hosts is not None else (LOCAL_HOSTS if host in LOCAL_HOSTS else None)

    def _refusal(self, headers: dict[str, str]) -> str | None:
        host = headers.get("host")
        if (
            host is not None
            and self.hosts is not None
            and "*" not in self.hosts
            and _hostname(host) not in self.hosts
        ):
            return f"host '{host[:100]}' is not this bridge's (set TEKTON_HTTP_ALLOWED_HOSTS)"
        origin = headers.get("origin")
        if origin is None or origin in self.origins or "*" in self.origins:
            return None  # not a browser's cross-site request, or an origin let in by name
        parts = urlsplit(origin)
        if parts.scheme in ("http", "https") and (
            (parts.hostname or "") in LOCAL_HOSTS or (host is not None and parts.netloc == host)
        ):
            return None  # a page of this bridge, or of another local server of the user's
        return f"origin '{origin[:100]}' is not allowed (set TEKTON_HTTP_ALLOWED_ORIGINS)"

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._refusal(headers)
        if scope["type"] == "websocket":
            if refusal is not None:
                await receive()  # websocket.connect
                await send({"type": "websocket.close", "code": 1008, "reason": refusal[:120]})
                return None
            return await self.app(scope, receive, send)
        if refusal is not None:
            return await _reply(send, 403, "forbidden", refusal)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _too_large(send, int(declared), self.max_body)
        # Read the body here, bounded (also when no length is declared), and hand it on in one piece.
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return None  # the client left
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body:
                return await _too_large(send, size, self.max_body)
            if not message.get("more_body"):
                break
        pending = [{"type": "http.request", "body": b"".join(chunks), "more_body": False}]

        async def replay() -> Any:
            return pending.pop() if pending else await receive()

        return await self.app(scope, replay, send)


async def _too_large(send: Any, size: int, limit: int) -> None:
    message = (
        f"request body is over {limit:,} bytes ({size:,} so far); send less (TEKTON_HTTP_MAX_BODY_BYTES)"
    )
    await _reply(send, 413, "payload_too_large", message)


async def _reply(send: Any, status: int, code: str, message: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message, "retryable": False}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


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
        async with anyio.create_task_group() as tg:
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
    app.add_middleware(EdgeGuard, settings=settings, host=host)

    def bus(caller: str | None = None) -> Bus:
        """The bus as the caller's user (one Bus, with its own inbox, per user, on one connection)."""
        user = guard.user(caller) if caller is not None else None
        if user is None:
            return state["bus"]
        if user not in state:
            state[user] = Bus(state["bus"].nc, settings, acting_for=user)
        return state[user]

    app.state.bus = bus  # the connection in use now (it is replaced when lost)

    async def admitted(request: Request) -> str:
        # ?token= only on /ws, where a browser cannot set a header: in a URL it ends up in logs.
        caller = guard.caller(
            request.headers.get("authorization"),
            None,
            request.client.host if request.client else "?",
        )
        guard.admit(caller)
        return caller

    @app.exception_handler(BusError)
    async def bus_error(_: Request, err: BusError) -> JSONResponse:
        return JSONResponse(
            error_body(err),
            status_code=err.http_status,
            headers={"Retry-After": str(err.retry_after)} if isinstance(err, RateLimited) else None,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        """A 422 that names the problems and never echoes the body back (it may be megabytes)."""
        problems = [{k: v for k, v in e.items() if k in ("type", "loc", "msg")} for e in err.errors()]
        message = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in problems[:3])
        body = {"error": {"code": "bad_request", "message": message[:500], "details": problems[:20]}}
        return JSONResponse(body, status_code=422)

    @app.exception_handler(ValidationError)
    async def invalid(_: Request, err: ValidationError) -> JSONResponse:
        """A value that passed the request schema but not a model built from it (a 422, not a 500)."""
        problems = err.errors(include_url=False, include_context=False, include_input=False)
        body = {
            "error": {
                "code": "bad_request",
                "message": f"{len(problems)} invalid value(s)",
                "details": problems,
            }
        }
        return JSONResponse(body, status_code=422)

    async def open_stream(body: ChatBody, caller: str) -> Opened:
        return await open_body(bus(caller), body)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def console() -> str:
        return (resources.files("gateway") / "console.html").read_text()

    @app.get("/api/capabilities", summary="Running specialists, their capabilities and health")
    async def capabilities(caller: str = Depends(admitted)) -> dict[str, Any]:
        reply = await bus(caller).gateway.discover()
        return {"specialists": [v.model_dump() for v in reply.specialists]}

    @app.get("/api/discover", summary="Rank specialists for a capability or a text")
    async def discover(
        capability: str | None = None, text: str | None = None, caller: str = Depends(admitted)
    ) -> dict[str, Any]:
        return (await bus(caller).gateway.discover(capability=capability, text=text)).model_dump()

    @app.post("/api/chat", summary="Ask a specialist; the whole answer as JSON")
    async def chat(body: ChatBody, caller: str = Depends(admitted)) -> dict[str, Any]:
        opened = await open_stream(body, caller)
        name, stream = opened.name, opened.stream
        async with stream:
            result = await stream.result()
        return {
            "specialist": name,
            "text": result.text,
            "usage": result.done.usage.model_dump(),
            "timings": result.done.timings.model_dump(),
            "finish_reason": result.done.finish_reason,
        }

    @app.post("/api/chat/stream", summary="Ask a specialist; the answer as server-sent events")
    async def chat_stream(body: ChatBody, caller: str = Depends(admitted)) -> StreamingResponse:
        opened = await open_stream(body, caller)
        name, stream = opened.name, opened.stream

        async def events() -> AsyncIterator[str]:
            async with stream:
                yield sse("start", {"specialist": name, "request_id": stream.request.id})
                try:
                    async for text in opened.texts:
                        yield sse("content", {"text": text})
                    result = await stream.result()
                except BusError as err:
                    yield sse("error", error_body(err)["error"])
                    return
                yield sse(
                    "done",
                    {"usage": result.done.usage.model_dump(), "timings": result.done.timings.model_dump()},
                )

        return ClosingStream(events(), stream)

    @app.get("/api/sessions", summary="Sessions, most recently changed first")
    async def list_sessions(specialist: str | None = None, caller: str = Depends(admitted)) -> dict[str, Any]:
        return {"sessions": [s.model_dump() for s in await bus(caller).gateway.list(specialist=specialist)]}

    @app.post("/api/sessions", summary="Start a session")
    async def create_session(body: SessionCreateBody, caller: str = Depends(admitted)) -> dict[str, Any]:
        created = await bus(caller).gateway.create(
            body.specialist, name=body.name, context_window=body.context_window, metadata=body.metadata
        )
        return created.model_dump()

    @app.get("/api/sessions/{ref}", summary="One session with its turns")
    async def get_session(ref: str, caller: str = Depends(admitted)) -> dict[str, Any]:
        return (await bus(caller).gateway.get(ref)).model_dump()

    @app.delete("/api/sessions/{ref}", summary="Delete a session")
    async def delete_session(ref: str, caller: str = Depends(admitted)) -> dict[str, Any]:
        return {"deleted": await bus(caller).gateway.delete(ref)}

    @app.post("/api/sessions/{ref}/fork", summary="A new session from the first turns of another")
    async def fork_session(ref: str, body: ForkBody, caller: str = Depends(admitted)) -> dict[str, Any]:
        return (await bus(caller).gateway.fork(ref, at=body.at, name=body.name)).model_dump()

    @app.post("/api/bulk", summary="Run a bulk plan; progress as server-sent events")
    async def bulk(plan: BulkPlan, caller: str = Depends(admitted)) -> StreamingResponse:
        run = bus(caller).bulk(plan)
        await run.__aenter__()

        async def events() -> AsyncIterator[str]:
            async with run:
                try:
                    async for event in run:
                        yield sse(event.type, event.model_dump())
                except BusError as err:
                    yield sse("error", error_body(err)["error"])

        return ClosingStream(events(), run)

    @app.get("/v1/models", summary="OpenAI-compatible: specialists and @capabilities as models")
    async def models(caller: str = Depends(admitted)) -> dict[str, Any]:
        views = (await bus(caller).gateway.discover()).specialists
        names = [v.name for v in views] + sorted({f"@{c}" for v in views for c in v.capabilities}) + ["@auto"]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tekton"} for n in names]}

    @app.post("/v1/chat/completions", summary="OpenAI-compatible chat completions (streaming or not)")
    async def completions(body: OpenAIChat, caller: str = Depends(admitted)) -> Any:
        chat_body = ChatBody(
            specialist=body.model,
            messages=[ChatMessage(role=m.role, content=m.content) for m in body.messages],
            options=ChatOptions(max_tokens=body.max_tokens, temperature=body.temperature),
        )
        opened = await open_stream(chat_body, caller)
        name, stream = opened.name, opened.stream
        created = int(time.time())
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        if not body.stream:
            async with stream:
                result = await stream.result()
            usage = result.done.usage
            return {
                "id": completion_id,
                "object": "chat.completion",
                "created": created,
                "model": name,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": result.text},
                        "finish_reason": result.done.finish_reason,
                    }
                ],
                "usage": {
                    "prompt_tokens": usage.prompt_tokens or 0,
                    "completion_tokens": usage.completion_tokens,
                    "total_tokens": (usage.prompt_tokens or 0) + usage.completion_tokens,
                },
            }

        def chunk(delta: dict[str, str], finish: str | None = None) -> str:
            data = {
                "id": completion_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": name,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
            }
            return f"data: {json.dumps(data)}\n\n"

        async def events() -> AsyncIterator[str]:
            async with stream:
                yield chunk({"role": "assistant"})
                try:
                    async for text in opened.texts:
                        yield chunk({"content": text})
                    result = await stream.result()
                except BusError as err:
                    yield f"data: {json.dumps(error_body(err))}\n\n"
                    return
                yield chunk({}, result.done.finish_reason)
                yield "data: [DONE]\n\n"

        return ClosingStream(events(), stream)

    @app.websocket("/ws")
    async def ws(socket: WebSocket) -> None:
        try:
            caller = guard.caller(
                socket.headers.get("authorization"),
                socket.query_params.get("token"),
                socket.client.host if socket.client else "?",
            )
        except Unauthorized as err:
            await socket.close(code=1008, reason=err.message)
            return
        await socket.accept()
        await JsonRpc(socket, bus(caller), guard, caller).serve()

    return app


async def open_body(bus: Bus, body: ChatBody) -> Opened:
    """An open stream from ``body.specialist`` (for ``@capability``: the first candidate that starts,
    as aish falls back), before any HTTP response has begun."""
    messages = body.chat_messages()
    names, _ = await bus.gateway.pick(body.specialist, messages[-1].content)
    return await open_first(
        names, lambda name: bus.stream(name, messages, body.options, session=body.session)
    )


def sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


PARSE_ERROR, INVALID_REQUEST, METHOD_NOT_FOUND, INVALID_PARAMS, INTERNAL = (
    RPC_PARSE_ERROR,
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_INVALID_PARAMS,
    RPC_INTERNAL,
)


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Any = None):
        super().__init__(message)
        self.code, self.message, self.data = code, message, data


class JsonRpc:
    """One WebSocket's JSON-RPC session. Streams run as tasks; `cancel` or a disconnect stops them on
    their specialists."""

    def __init__(self, socket: WebSocket, bus: Bus, guard: Guard, caller: str):
        self.socket, self.bus, self.guard, self.caller = socket, bus, guard, caller
        self.streams: dict[str, anyio.CancelScope] = {}
        self.send_lock = anyio.Lock()
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "chat": self.chat,
            "stream": self.stream,
            "cancel": self.cancel,
            "discover": self.discover,
            "sessions.list": self.sessions_list,
            "sessions.get": self.sessions_get,
            "sessions.create": self.sessions_create,
            "sessions.delete": self.sessions_delete,
            "bulk": self.bulk,
        }

    async def send(self, message: dict[str, Any]) -> None:
        async with self.send_lock:
            await self.socket.send_text(json.dumps({"jsonrpc": "2.0", **message}))

    async def serve(self) -> None:
        async with anyio.create_task_group() as tg:
            self.tg = tg
            try:
                while True:
                    raw = await self.socket.receive_text()
                    tg.start_soon(self.handle, raw)
            except WebSocketDisconnect:
                pass
            finally:
                tg.cancel_scope.cancel()  # a client that left stops every stream it started

    async def handle(self, raw: str) -> None:
        request_id: Any = None
        try:
            try:
                message = json.loads(raw)
            except ValueError as err:
                raise RpcError(PARSE_ERROR, f"parse error: {err}") from err
            if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or "method" not in message:
                raise RpcError(INVALID_REQUEST, "invalid request: need jsonrpc '2.0' and a method")
            request_id = message.get("id")
            method = self.methods.get(message["method"])
            if method is None:
                raise RpcError(
                    METHOD_NOT_FOUND, f"method not found: {message['method']}", sorted(self.methods)
                )
            params = message.get("params") or {}
            if not isinstance(params, dict):
                raise RpcError(INVALID_PARAMS, "params must be an object")
            try:
                self.guard.admit(self.caller)
            except RateLimited as err:
                raise RpcError(err.rpc_code, "rate limited", {"retry_after": str(err.retry_after)}) from err
            result = await method(params)
        except RpcError as err:
            await self.reply_error(request_id, err.code, err.message, err.data)
            return
        except ValidationError as err:
            await self.reply_error(
                request_id,
                INVALID_PARAMS,
                f"invalid params: {err.error_count()} problem(s)",
                err.errors(include_url=False),
            )
            return
        except BusError as err:
            await self.reply_error(request_id, err.rpc_code, err.message, {"code": str(err.code)})
            return
        if request_id is not None:
            await self.send({"id": request_id, "result": result})

    async def reply_error(self, request_id: Any, code: int, message: str, data: Any = None) -> None:
        error: dict[str, Any] = {"code": code, "message": message}
        if data is not None:
            error["data"] = data
        await self.send({"id": request_id, "error": error})

    async def _open(self, params: dict[str, Any]) -> Opened:
        return await open_body(self.bus, ChatBody.model_validate(params))

    async def chat(self, params: dict[str, Any]) -> dict[str, Any]:
        opened = await self._open(params)
        name, stream = opened.name, opened.stream
        async with stream:
            result = await stream.result()
        return {"specialist": name, "text": result.text, "timings": result.done.timings.model_dump()}

    async def stream(self, params: dict[str, Any]) -> dict[str, Any]:
        opened = await self._open(params)
        name, stream = opened.name, opened.stream
        request_id = stream.request.id
        scope = anyio.CancelScope()
        self.streams[request_id] = scope

        async def pump() -> None:
            try:
                with scope:
                    async with stream:
                        try:
                            async for text in opened.texts:
                                await self.send(
                                    {
                                        "method": "stream.chunk",
                                        "params": {"request_id": request_id, "text": text},
                                    }
                                )
                            result = await stream.result()
                            await self.send(
                                {
                                    "method": "stream.complete",
                                    "params": {
                                        "request_id": request_id,
                                        "timings": result.done.timings.model_dump(),
                                    },
                                }
                            )
                        except BusError as err:
                            await self.send(
                                {
                                    "method": "stream.complete",
                                    "params": {"request_id": request_id, "error": error_body(err)["error"]},
                                }
                            )
                if scope.cancelled_caught:
                    with anyio.CancelScope(shield=True):
                        await self.send(
                            {
                                "method": "stream.complete",
                                "params": {"request_id": request_id, "cancelled": True},
                            }
                        )
            finally:
                self.streams.pop(request_id, None)

        self.tg.start_soon(pump)
        return {"request_id": request_id, "specialist": name}

    async def cancel(self, params: dict[str, Any]) -> dict[str, Any]:
        request_id = params.get("request_id")
        scope = self.streams.get(str(request_id))
        if scope is None:
            raise RpcError(INVALID_PARAMS, f"no running stream {request_id!r}")
        scope.cancel()
        return {"cancelled": request_id}

    async def discover(self, params: dict[str, Any]) -> dict[str, Any]:
        reply = await self.bus.gateway.discover(capability=params.get("capability"), text=params.get("text"))
        return reply.model_dump()

    async def sessions_list(self, params: dict[str, Any]) -> dict[str, Any]:
        return {
            "sessions": [
                s.model_dump() for s in await self.bus.gateway.list(specialist=params.get("specialist"))
            ]
        }

    async def sessions_get(self, params: dict[str, Any]) -> dict[str, Any]:
        return (await self.bus.gateway.get(str(params.get("session", "")))).model_dump()

    async def sessions_create(self, params: dict[str, Any]) -> dict[str, Any]:
        body = SessionCreateBody.model_validate(params)
        created = await self.bus.gateway.create(
            body.specialist, name=body.name, context_window=body.context_window
        )
        return created.model_dump()

    async def sessions_delete(self, params: dict[str, Any]) -> dict[str, Any]:
        return {"deleted": await self.bus.gateway.delete(str(params.get("session", "")))}

    async def bulk(self, params: dict[str, Any]) -> dict[str, Any]:
        plan = BulkPlan.model_validate(params)
        run = self.bus.bulk(plan)
        await run.__aenter__()

        async def pump() -> None:
            async with run:
                async for event in run:
                    await self.send({"method": "bulk.event", "params": {"id": run.id, **event.model_dump()}})

        self.tg.start_soon(pump)
        return {"id": run.id, "operations": len(plan.operations)}
