"""JSON and server-sent events over HTTP: chat per specialist (or `@capability`), sessions, bulk,
discovery (`/api/...`), and the small browser console at `/`."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Header, Query
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from bridge.edge import ClosingStream, PlainHandler, error_body, json_body, serve_events
from bus.bulk import BulkPlan, BulkStream
from bus.client import Bus, ChatStream
from bus.errors import (
    BadRequest,
    BusError,
)
from bus.failover import Opened, open_first
from bus.sessions import FORK_AT_MAX, DoubleText
from bus.subjects import TARGET_PATTERN
from bus.wire import ChatMessage, ChatOptions

if TYPE_CHECKING:
    from bridge.app import Bridge


class ChatBody(BaseModel):
    """A chat request over HTTP: one ``message`` or the whole ``messages`` list."""

    specialist: str = Field(
        pattern=TARGET_PATTERN, description="a specialist name, `@capability`, or `@auto`"
    )
    message: str | None = None
    messages: list[ChatMessage] | None = None
    session: str | None = None
    # With a session whose answer is still streaming: reject, queue, interrupt or rollback.
    double_text: DoubleText | None = None
    options: ChatOptions = ChatOptions()

    def chat_messages(self) -> list[ChatMessage]:
        if self.messages:
            return self.messages
        if self.message is None:
            raise BadRequest("give `message` or `messages`")
        return [ChatMessage(role="user", content=self.message)]


class SessionCreateBody(BaseModel):
    specialist: str | None = None
    name: str | None = None
    context_window: int = 10
    metadata: dict[str, str] = {}


class ForkBody(BaseModel):
    at: int | None = Field(default=None, ge=0, le=FORK_AT_MAX)
    name: str | None = None


async def open_body(bus: Bus, body: ChatBody) -> Opened:
    """An open stream from ``body.specialist`` (for ``@capability``: the first candidate that starts,
    as aish falls back), before any HTTP response has begun."""
    messages = body.chat_messages()
    names, _ = await bus.gateway.pick(body.specialist, messages[-1].content)
    return await open_first(
        names,
        lambda name: bus.stream(
            name, messages, body.options, session=body.session, double_text=body.double_text
        ),
    )


def sse(event: str, data: dict[str, Any], seq: int | None = None) -> str:
    """One server-sent event; ``seq`` becomes its id, which a reconnecting client sends back as
    ``Last-Event-ID`` to resume after it."""
    head = f"id: {seq}\n" if seq is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


def _event_id(value: str | None) -> int:
    """The seq a Last-Event-ID names (-1: none, from the start)."""
    if value is None or not value.strip():
        return -1
    try:
        seq = int(value)
    except ValueError:
        raise BadRequest(f"Last-Event-ID must be an event id this bridge sent, not {value!r}") from None
    if seq < -1:
        raise BadRequest("Last-Event-ID must be -1 or more")
    return seq


def chat_events(stream: ChatStream, name: str, texts: AsyncIterator[str]) -> AsyncIterator[str]:
    """A chat's server-sent events: start (with the run id), content with ids, then done or error."""

    async def events() -> AsyncIterator[str]:
        # Events whose frames had already arrived go out together: one socket write, not one each
        # (the first is never held back: it goes as soon as nothing more is waiting).
        out = [sse("start", {"specialist": name, "request_id": stream.request.id})]
        async with stream:
            try:
                async for text in texts:
                    out.append(sse("content", {"text": text}, stream.last_seq))
                    if not stream.waiting():
                        yield "".join(out)
                        out.clear()
                result = await stream.result()
            except BusError as err:
                out.append(sse("error", error_body(err)["error"], stream.last_seq))
                yield "".join(out)
                return
            except BaseException:  # the client went away: a durable run waits for it to come back
                if stream.run_id is not None:
                    stream.leave()
                raise
            out.append(
                sse(
                    "done",
                    {"usage": result.done.usage.model_dump(), "timings": result.done.timings.model_dump()},
                    stream.last_seq,
                )
            )
            yield "".join(out)

    return events()


def bulk_events(run: BulkStream) -> AsyncIterator[str]:
    """A bulk run's server-sent events, each with its ``seq`` as id (a reconnecting client resumes with
    ``Last-Event-ID`` at ``/api/runs/{id}/events``); the run id is in every event (``id``)."""

    async def events() -> AsyncIterator[str]:
        async with run:
            try:
                async for event in run:
                    yield sse(event.type, {"id": run.id, **event.model_dump()}, event.seq)
            except BusError as err:
                yield sse("error", error_body(err)["error"], run.last_seq)
            except BaseException:  # the client went away: the bulk run goes on for it to come back
                if run.run_id is not None:
                    run.leave()
                raise

    return events()


CHAT_STREAM_PATH = "/api/chat/stream"


def plain_routes(ctx: Bridge) -> dict[str, PlainHandler]:
    async def chat_stream(scope: Any, message: dict[str, Any], receive: Any, send: Any) -> bool:
        body = json_body(scope, message, ChatBody)
        if body is None:
            return False
        await serve_events(ctx, scope, receive, send, lambda: body, chat_stream_events)
        return True

    return {CHAT_STREAM_PATH: chat_stream}


def chat_stream_events(opened: Opened) -> AsyncIterator[str]:
    return chat_events(opened.stream, opened.name, opened.texts)


def add_routes(app: FastAPI, ctx: Bridge) -> None:
    bus, admitted, open_stream = ctx.bus, ctx.admitted, ctx.open_stream

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def console() -> str:
        return (resources.files("bridge") / "console.html").read_text()

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

    @app.post(CHAT_STREAM_PATH, summary="Ask a specialist; the answer as server-sent events")
    async def chat_stream(body: ChatBody, caller: str = Depends(admitted)) -> StreamingResponse:
        opened = await open_stream(body, caller)
        return ClosingStream(chat_stream_events(opened), opened.stream)

    @app.get("/api/runs/{run_id}/events", summary="Resume a run: its events after Last-Event-ID, then live")
    async def run_events(
        run_id: str,
        after: int | None = Query(default=None, ge=-1),
        last_event_id: str | None = Header(default=None),
        caller: str = Depends(admitted),
    ) -> Response:
        start = after if after is not None else _event_id(last_event_id)
        caller_bus = bus(caller)
        try:
            if await caller_bus.run_kind(run_id) == "bulk":
                run = caller_bus.attach_bulk(run_id, after=start)
                await run.__aenter__()
                if run.nothing_after:  # ended at or before the client's last event: see below
                    await run.__aexit__(None, None, None)
                    return Response(status_code=204)
                return ClosingStream(bulk_events(run), run)
            stream = caller_bus.attach(run_id, after=start)
        except ValueError as err:
            raise BadRequest(str(err)) from err
        await stream.__aenter__()
        if stream.nothing_after:
            # The run ended at or before the event the client has (an EventSource reconnecting after
            # `done`): 204 tells it to stop reconnecting (the SSE standard).
            await stream.__aexit__(None, None, None)
            return Response(status_code=204)
        return ClosingStream(chat_events(stream, stream.specialist, aiter(stream)), stream)

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
        return ClosingStream(bulk_events(run), run)
