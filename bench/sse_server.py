"""The baseline: the same scripted token stream served as SSE by FastAPI + uvicorn (one process).

Usage: python -m bench.sse_server PORT LONG_TOKENS
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import uvicorn
from fastapi import FastAPI
from fastapi.responses import StreamingResponse

from bus.wire import ChatMessage, ChatOptions
from specialists.providers.base import ProviderContext, SharedResources
from specialists.providers.scripted import ScriptedOptions, ScriptedProvider

app = FastAPI()
SHORT = ScriptedProvider(ScriptedOptions(tokens=8), ProviderContext("apollo", SharedResources()))
LONG = ScriptedProvider(
    ScriptedOptions(tokens=int(sys.argv[2])), ProviderContext("athena", SharedResources())
)


@app.get("/stream")
async def stream(q: str = "hello", long: bool = False) -> StreamingResponse:
    provider = LONG if long else SHORT

    async def events() -> AsyncIterator[bytes]:
        async for text in provider.stream([ChatMessage(role="user", content=q)], ChatOptions()):
            yield f"data: {text}\n\n".encode()
        yield b"event: done\ndata: {}\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning")
