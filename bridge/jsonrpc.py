"""JSON-RPC 2.0 over a WebSocket at `/ws`: chat, streams with `stream.chunk` / `stream.complete`
notifications, cancel, sessions, bulk and discovery (docs/http.md); error codes from bus/errors.py."""

from __future__ import annotations

import json
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from pydantic import ValidationError

from bridge.edge import Guard, error_body, strict_json
from bridge.rest import ChatBody, SessionCreateBody, open_body
from bus.bulk import BulkPlan, BulkStream
from bus.client import Bus, ChatStream
from bus.errors import (
    RPC_INTERNAL,
    RPC_INVALID_PARAMS,
    RPC_INVALID_REQUEST,
    RPC_METHOD_NOT_FOUND,
    RPC_PARSE_ERROR,
    BusError,
    RateLimited,
    Unauthorized,
)
from bus.failover import Opened

if TYPE_CHECKING:
    from bridge.app import Bridge

log = structlog.get_logger("tekton.bridge")


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
        self.opened: dict[str, ChatStream] = {}
        self.bulks: dict[str, BulkStream] = {}
        self.send_lock = anyio.Lock()
        self.methods: dict[str, Callable[[dict[str, Any]], Awaitable[Any]]] = {
            "chat": self.chat,
            "stream": self.stream,
            "stream.resume": self.resume,
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
                    frame = await self.socket.receive()
                    if frame["type"] == "websocket.disconnect":
                        break
                    # A binary frame is read as UTF-8 text, like a text one (or is a parse error).
                    text = frame.get("text")
                    tg.start_soon(self.handle, text if text is not None else frame.get("bytes") or b"")
            except WebSocketDisconnect:
                pass
            finally:
                # A client that left stops every stream it started, but durable runs go on for their
                # resume window (stream.resume from a new connection).
                leaving: list[ChatStream | BulkStream] = [*self.opened.values(), *self.bulks.values()]
                for stream in leaving:
                    _client_left(stream)
                tg.cancel_scope.cancel()

    async def handle(self, raw: str | bytes) -> None:
        # The client may leave before its reply (a reload): the read loop ends the session, and its
        # durable runs go on. Raised here, it ended the session's task group, whose streams then
        # cancelled their runs before the read loop could leave them.
        try:
            await self._handle(raw)
        except WebSocketDisconnect:
            pass
        except Exception as err:  # even its reply failing must not end the connection's other streams
            log.error("json-rpc reply failed", error=f"{type(err).__name__}: {str(err)[:200]}")

    async def _handle(self, raw: str | bytes) -> None:
        request_id: Any = None
        message: Any = {}
        try:
            try:
                message = strict_json(raw)
            except (ValueError, RecursionError) as err:  # also bytes not UTF-8; nesting too deep
                raise RpcError(PARSE_ERROR, f"parse error: {str(err)[:200]}") from None
            if (
                not isinstance(message, dict)
                or message.get("jsonrpc") != "2.0"
                or not isinstance(message.get("method"), str)
            ):
                raise RpcError(INVALID_REQUEST, "invalid request: need jsonrpc '2.0' and a method name")
            rid = message.get("id")
            if (
                isinstance(rid, bool)
                or not isinstance(rid, str | int | float | None)
                or (isinstance(rid, float) and not math.isfinite(rid))  # 1e400: no JSON to answer with
            ):
                raise RpcError(INVALID_REQUEST, "invalid request: an id is a string, a number or null")
            request_id = rid
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
                # Not the exception a validator raised (no JSON for it), nor the input (megabytes).
                err.errors(include_url=False, include_context=False, include_input=False),
            )
            return
        except BusError as err:
            await self.reply_error(request_id, err.rpc_code, err.message, {"code": str(err.code)})
            return
        except Exception:  # one request's bug must not end the connection and its other streams
            method_name = message.get("method") if isinstance(message, dict) else None
            log.exception("json-rpc request failed", method=str(method_name)[:64])
            await self.reply_error(request_id, INTERNAL, "internal error (the bridge's log has it)")
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
        self._pump(opened.stream, opened.texts)
        return {"request_id": opened.stream.request.id, "specialist": opened.name}

    async def resume(self, params: dict[str, Any]) -> dict[str, Any]:
        """``stream.resume``: a run's chunks after ``after`` (the last ``seq`` seen), then the rest live,
        as the same ``stream.chunk`` / ``stream.complete`` notifications."""
        request_id, after = params.get("request_id"), params.get("after", -1)
        if not isinstance(request_id, str) or type(after) is not int or after < -1:
            raise RpcError(INVALID_PARAMS, "stream.resume needs request_id (a run id) and after (a seq)")
        if request_id in self.streams:
            raise RpcError(INVALID_PARAMS, f"stream {request_id!r} is already running here")
        try:
            if await self.bus.run_kind(request_id) == "bulk":  # its events as bulk.event notifications
                run = self.bus.attach_bulk(request_id, after=after)
                await run.__aenter__()
                if run.nothing_after:
                    await run.__aexit__(None, None, None)
                    return {
                        "request_id": request_id,
                        "after": after,
                        "kind": "bulk",
                        "ended_at": run.ended_at,
                    }
                self._pump_bulk(run)
                return {"request_id": request_id, "after": after, "kind": "bulk"}
            stream = self.bus.attach(request_id, after=after)
        except ValueError as err:
            raise RpcError(INVALID_PARAMS, str(err)) from err
        await stream.__aenter__()
        if stream.nothing_after:  # the run ended at or before ``after``: no notifications will come
            await stream.__aexit__(None, None, None)
            return {"request_id": request_id, "after": after, "ended_at": stream.ended_at}
        self._pump(stream, aiter(stream))
        return {"request_id": request_id, "after": after}

    async def _relay(self, stream: ChatStream, texts: AsyncIterator[str]) -> None:
        """A stream's chunks as ``stream.chunk`` notifications, then ``stream.complete`` (its usage, or
        its error)."""
        request_id = stream.request.id
        try:
            async for text in texts:
                await self.send(
                    {
                        "method": "stream.chunk",
                        "params": {"request_id": request_id, "text": text, "seq": stream.last_seq},
                    }
                )
            result = await stream.result()
            await self.send(
                {
                    "method": "stream.complete",
                    "params": {
                        "request_id": request_id,
                        "usage": result.done.usage.model_dump(),
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

    def _pump(self, stream: ChatStream, texts: AsyncIterator[str]) -> None:
        request_id = stream.request.id
        scope = anyio.CancelScope()
        self.streams[request_id] = scope
        self.opened[request_id] = stream

        async def pump() -> None:
            try:
                with scope:
                    async with stream:
                        try:
                            await self._relay(stream, texts)
                        except WebSocketDisconnect:
                            _client_left(stream)
                if scope.cancelled_caught:
                    with anyio.CancelScope(shield=True), suppress(WebSocketDisconnect):
                        await self.send(
                            {
                                "method": "stream.complete",
                                "params": {"request_id": request_id, "cancelled": True},
                            }
                        )
            finally:
                self.streams.pop(request_id, None)
                self.opened.pop(request_id, None)

        self.tg.start_soon(pump)

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
        self._pump_bulk(run)
        return {"id": run.id, "operations": len(plan.operations)}

    def _pump_bulk(self, run: BulkStream) -> None:
        """A bulk run's events as ``bulk.event`` notifications (each with its ``seq``: what
        ``stream.resume`` takes as ``after`` on a new connection)."""
        self.bulks[run.id] = run

        async def pump() -> None:
            try:
                async with run:
                    try:
                        async for event in run:
                            params = {"id": run.id, **event.model_dump()}
                            await self.send({"method": "bulk.event", "params": params})
                    except WebSocketDisconnect:
                        _client_left(run)
            finally:
                self.bulks.pop(run.id, None)

        self.tg.start_soon(pump)


def _client_left(stream: ChatStream | BulkStream) -> None:
    """The client's socket closed (a page reload, say): a durable run goes on for its resume window
    (``stream.resume`` from a new connection); any other stream stops as its block ends. Said by the
    read loop when it hears the close first, and by a stream whose send hit the closed socket first
    (which, on a loaded machine, came first and cancelled the run a reload was to continue)."""
    if stream.run_id is not None:
        stream.leave()


def add_routes(app: FastAPI, ctx: Bridge) -> None:
    bus, guard = ctx.bus, ctx.guard

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
