"""What every protocol edge of the HTTP bridge shares: the access guard (API tokens, rate limits), the
Host/Origin/body-size checks in front of every route, the JSON error body (codes and statuses from the
one map, bus/errors.py POLICY), and an SSE response that closes its bus stream however it ends."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

import anyio
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ValidationError

from bus.bulk import BulkStream
from bus.client import ChatStream
from bus.errors import (
    BusError,
    RateLimited,
    Unauthorized,
)
from bus.settings import TektonSettings

if TYPE_CHECKING:
    from bridge.app import Bridge
    from bridge.rest import ChatBody
    from bus.failover import Opened

M = TypeVar("M", bound=BaseModel)


def strict_json(raw: str | bytes) -> Any:
    """A JSON body as the edges take it: no NaN or Infinity (no JSON to answer with). Raises ValueError
    (also for bytes that are not text, or an int of 4,300 digits) or RecursionError (nesting)."""
    return json.loads(raw, parse_constant=_no_constant)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}
# How long a request's body may take to arrive, from its headers.
BODY_TIMEOUT_S = 30
NO_CACHE = {"Cache-Control": "no-cache"}


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
            await close_opened(self.opened)


async def close_opened(opened: ChatStream | BulkStream) -> None:
    """Close the bus stream under a response that ended, however it ended."""
    if opened.run_id is not None:
        # A durable run outlives its connection for the resume window (Last-Event-ID).
        opened.leave()
    await opened.__aexit__(None, None, None)  # (shielded from a cancel; closing twice is harmless)


# A ClosingStream's response headers, as Starlette makes them (a test holds the two the same).
SSE_HEADERS = [(b"cache-control", b"no-cache"), (b"content-type", b"text/event-stream; charset=utf-8")]


async def send_events(
    receive: Any, send: Any, content: AsyncIterator[str], opened: ChatStream | BulkStream
) -> None:
    """What a :class:`ClosingStream` does, as plain ASGI calls: the events as they come, the bus stream
    closed however the response ends, and the response stopped when the client leaves (uvicorn's
    ``send`` drops what a gone client is sent without a word, so only ``receive`` tells).

    Starlette's response watches ``receive`` in a task group of its own (a cancel scope, two anyio
    tasks); here one plain asyncio task watches and cancels the response's scope (an anyio one, so the
    bus stream's shielded close is not cut short). The request body must have been received already."""
    scope = anyio.CancelScope()

    async def watch() -> None:
        # (after the last event uvicorn's receive says "disconnect" too: the scope is left by then)
        with contextlib.suppress(Exception):  # a receive that fails: the client is gone all the same
            while (await receive())["type"] != "http.disconnect":
                pass
        scope.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        with scope:
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            async for event in content:
                await send({"type": "http.response.body", "body": event.encode(), "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
    finally:
        watcher.cancel()
        await close_opened(opened)
        await asyncio.wait([watcher])  # the watcher ends with its response, never left behind


async def serve_events(
    ctx: Bridge,
    scope: Any,
    receive: Any,
    send: Any,
    body: Callable[[], ChatBody],
    events: Callable[[Opened], AsyncIterator[str]],
) -> None:
    """A plain route's answer (:class:`PlainRoutes`), as its FastAPI route gives it: the
    caller admitted, then ``body()`` asked of the bus, then ``events`` of the open stream; an error
    before the first event in the bridge's error body."""
    try:
        caller = ctx.admit_scope(scope)
        opened = await ctx.open_stream(body(), caller)
    except BusError as err:
        return await bus_error_response(err)(scope, receive, send)
    except ValidationError as err:
        return await validation_error_response(err)(scope, receive, send)
    await send_events(receive, send, events(opened), opened.stream)


# A hot route served as plain ASGI (:class:`PlainRoutes`): given the request's scope, its whole body
# (the ASGI message) and receive/send, it answers and returns True, or returns False having sent
# nothing, and FastAPI's route for the same path answers instead.
PlainHandler = Callable[[Any, dict[str, Any], Any, Any], Awaitable[bool]]


class PlainRoutes:
    """The bridge's hot routes (an SSE chat, an OpenAI streaming completion) served as plain ASGI in
    front of FastAPI, inside :class:`EdgeGuard` (which has read the whole body).

    FastAPI's layers (its middleware, routing and dependency injection) and Starlette's streaming
    response (a task group, a cancel scope and two tasks per response) were ~45 % of the gateway's
    CPU per SSE request (bench/results/hot_path-profiles.md, round 8). A handler takes a request that
    FastAPI would serve the same way (a JSON body that validates as the route's model; for an OpenAI
    completion, one asked to stream), and answers it with the same calls, events and errors
    (:func:`serve_events`); anything else goes on to the FastAPI route, which answers it as it always
    did and documents it in the OpenAPI."""

    def __init__(self, app: Any, routes: dict[str, PlainHandler]):
        self.app, self.routes = app, routes

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        handler = (
            self.routes.get(scope["path"]) if scope["type"] == "http" and scope["method"] == "POST" else None
        )
        if handler is None:
            return await self.app(scope, receive, send)
        message = await receive()
        if not await handler(scope, message, receive, send):
            await self.pass_on(scope, message, receive, send)

    async def pass_on(self, scope: Any, message: dict[str, Any], receive: Any, send: Any) -> None:
        """To FastAPI's route, with the body as it came."""
        await self.app(scope, replaying(message, receive), send)


def json_body(scope: Any, message: dict[str, Any], model: type[M]) -> M | None:
    """The request's body as ``model`` if it is JSON (``Content-Type: application/json``, read as
    FastAPI reads it) that validates; else None."""
    if message["type"] != "http.request" or message.get("more_body"):
        return None
    content_type = next((v for k, v in scope["headers"] if k.lower() == b"content-type"), b"")
    if content_type.partition(b";")[0].strip().lower() != b"application/json":
        return None
    try:
        return model.model_validate(json.loads(message["body"]))
    except (ValueError, RecursionError):  # (pydantic's ValidationError is a ValueError)
        return None


def error_body(err: BusError) -> dict[str, Any]:
    return {"error": {"code": str(err.code), "message": err.message, "retryable": err.retryable}}


def bus_error_response(err: BusError) -> JSONResponse:
    headers = None
    if isinstance(err, RateLimited):
        headers = {"Retry-After": str(err.retry_after)}
    elif isinstance(err, Unauthorized):  # (RFC 6750: how to authenticate, for a client told 401)
        headers = {"WWW-Authenticate": "Bearer"}
    return JSONResponse(error_body(err), status_code=err.http_status, headers=headers)


def validation_error_response(err: ValidationError) -> JSONResponse:
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
    """``host`` of ``host:port`` / ``[v6]:port``, lower case ("" when it is no host at all)."""
    try:
        return (urlsplit(f"//{netloc}").hostname or "").lower()
    except ValueError:  # "[::1", "[zz]:1"
        return ""


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
        try:
            parts = urlsplit(origin)
        except ValueError:  # "http://[zz"
            return f"origin '{origin[:100]}' is not a URL"
        if parts.scheme in ("http", "https") and (
            _hostname(parts.netloc) in LOCAL_HOSTS or (host is not None and parts.netloc == host)
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
        # Read the body here, bounded in size (also when no length is declared) and in time (a client
        # that sends it a byte at a time holds a connection), and hand it on in one piece.
        chunks: list[bytes] = []
        size = 0
        try:
            # (asyncio's timeout: 4.4 us in a microbenchmark, anyio's cancel scope 7; on every request)
            async with asyncio.timeout(BODY_TIMEOUT_S):
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
        except TimeoutError:
            return await _reply(
                send, 408, "bad_request", f"the request body did not arrive within {BODY_TIMEOUT_S} s"
            )
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        return await self.app(scope, replaying(whole, receive), send)


def replaying(message: dict[str, Any], receive: Any) -> Any:
    """An ASGI ``receive`` that gives ``message`` first, then what ``receive`` gives."""
    pending = [message]

    async def replay() -> Any:
        return pending.pop() if pending else await receive()

    return replay


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
