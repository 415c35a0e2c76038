"""The OpenAI-compatible API: `GET /v1/models` (specialists, `@capabilities` and `@auto` as models) and
`POST /v1/chat/completions`, streaming or not."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Depends, FastAPI
from pydantic import BaseModel, Field

from bridge.edge import ClosingStream, PlainHandler, error_body, json_body, serve_events
from bridge.rest import ChatBody
from bus.errors import (
    BusError,
)
from bus.failover import Opened
from bus.subjects import TARGET_PATTERN
from bus.wire import ChatMessage, ChatOptions, Usage

if TYPE_CHECKING:
    from bridge.app import Bridge


class OpenAIMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class StreamOptions(BaseModel):
    include_usage: bool = False


class OpenAIChat(BaseModel):
    model: str = Field(pattern=TARGET_PATTERN, description="a specialist name, `@capability` or `@auto`")
    messages: list[OpenAIMessage] = Field(min_length=1)
    stream: bool = False
    # As OpenAI's: with include_usage, a last chunk (no choices) carries the answer's usage. A client
    # must not count chunks as tokens (a chunk may carry several).
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=1_000_000)
    temperature: float | None = Field(default=None, ge=0, le=2)


COMPLETIONS_PATH = "/v1/chat/completions"


def as_chat_body(body: OpenAIChat) -> ChatBody:
    """The Tekton chat request an OpenAI one asks for."""
    return ChatBody(
        specialist=body.model,
        messages=[ChatMessage(role=m.role, content=m.content) for m in body.messages],
        options=ChatOptions(max_tokens=body.max_tokens, temperature=body.temperature),
    )


def plain_routes(ctx: Bridge) -> dict[str, PlainHandler]:
    async def completions(scope: Any, message: dict[str, Any], receive: Any, send: Any) -> bool:
        body = json_body(scope, message, OpenAIChat)
        if body is None or not body.stream:  # (an answer in one piece: FastAPI's route)
            return False
        await serve_events(
            ctx,
            scope,
            receive,
            send,
            lambda: as_chat_body(body),
            lambda opened: completion_events(opened, body),
        )
        return True

    return {COMPLETIONS_PATH: completions}


def completion_events(opened: Opened, body: OpenAIChat) -> AsyncIterator[str]:
    """A streamed completion's chunks, as OpenAI's: the role, the text, the finish reason, the usage
    if asked for (``stream_options.include_usage``), then ``[DONE]``."""
    name, stream = opened.name, opened.stream
    created = int(time.time())
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"

    def chunk(delta: dict[str, str], finish: str | None = None, usage: Usage | None = None) -> str:
        data: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": name,
            "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}],
        }
        if usage is not None:
            data["usage"] = openai_usage(usage)
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
            if body.stream_options and body.stream_options.include_usage:
                yield chunk({}, usage=result.done.usage)
            yield "data: [DONE]\n\n"

    return events()


def add_routes(app: FastAPI, ctx: Bridge) -> None:
    bus, admitted, open_stream = ctx.bus, ctx.admitted, ctx.open_stream

    @app.get("/v1/models", summary="OpenAI-compatible: specialists and @capabilities as models")
    async def models(caller: str = Depends(admitted)) -> dict[str, Any]:
        views = (await bus(caller).gateway.discover()).specialists
        names = [v.name for v in views] + sorted({f"@{c}" for v in views for c in v.capabilities}) + ["@auto"]
        return {"object": "list", "data": [{"id": n, "object": "model", "owned_by": "tekton"} for n in names]}

    @app.post(COMPLETIONS_PATH, summary="OpenAI-compatible chat completions (streaming or not)")
    async def completions(body: OpenAIChat, caller: str = Depends(admitted)) -> Any:
        opened = await open_stream(as_chat_body(body), caller)
        if body.stream:
            return ClosingStream(completion_events(opened, body), opened.stream)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())  # (as it starts)
        async with opened.stream:
            result = await opened.stream.result()
        return {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": opened.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": result.text},
                    "finish_reason": result.done.finish_reason,
                }
            ],
            "usage": openai_usage(result.done.usage),
        }


def openai_usage(usage: Usage) -> dict[str, int]:
    return {
        "prompt_tokens": usage.prompt_tokens or 0,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": (usage.prompt_tokens or 0) + usage.completion_tokens,
    }
