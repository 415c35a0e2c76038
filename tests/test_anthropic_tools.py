"""The anthropic provider's tool use: the specialist's MCP tools (a real MCP server over stdio) offered
as Anthropic tools, a ``tool_use`` block run and answered with a ``tool_result``, over the real
``anthropic`` client and a real bus.

There is no Anthropic server to run here, so the far side is a small server in this test speaking the
Messages API's streaming protocol (SSE events as documented) from a script: the model's two turns are
written down, not generated. What is tested is Tekton's side: the requests it sends (the tools, the
tool_result for the right tool_use id) and what it makes of the answers."""

from __future__ import annotations

import json
import socket
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bus.client import Bus
from bus.settings import TektonSettings
from bus.wire import ChatMessage, ToolCallFrame, ToolResultFrame
from tests.helpers import eventually, in_process_specialists

pytestmark = pytest.mark.anyio
CALC = Path(__file__).parent / "data" / "mcp_calc.py"


def sse(*events: dict[str, Any]) -> str:
    return "".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n" for e in events)


def turn(blocks: list[tuple[dict[str, Any], list[dict[str, Any]]]], stop: str, out: int) -> str:
    """One streamed assistant message: content blocks with their deltas, then the stop reason."""
    message = {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "claude-test",
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": 20, "output_tokens": 1},
    }
    events: list[dict[str, Any]] = [{"type": "message_start", "message": message}]
    for i, (start, deltas) in enumerate(blocks):
        events.append({"type": "content_block_start", "index": i, "content_block": start})
        events += [{"type": "content_block_delta", "index": i, "delta": d} for d in deltas]
        events.append({"type": "content_block_stop", "index": i})
    events.append(
        {
            "type": "message_delta",
            "delta": {"stop_reason": stop, "stop_sequence": None},
            "usage": {"output_tokens": out},
        }
    )
    events.append({"type": "message_stop"})
    return sse(*events)


@asynccontextmanager
async def messages_api(seen: list[dict[str, Any]]) -> AsyncIterator[str]:
    async def create(request: Request) -> Response:
        body = await request.json()
        seen.append(body)
        last = body["messages"][-1]["content"]
        if isinstance(last, list) and last and last[0].get("type") == "tool_result":
            said = last[0]["content"]
            text = [{"type": "text_delta", "text": "The sum is "}, {"type": "text_delta", "text": said}]
            script = turn([({"type": "text", "text": ""}, text)], "end_turn", 5)
        else:
            use = {"type": "tool_use", "id": "toolu_7", "name": "calc__add", "input": {}}
            parts = [{"type": "input_json_delta", "partial_json": p} for p in ('{"a": 2, ', '"b": 40}')]
            thinking = [{"type": "text_delta", "text": "Let me add."}]
            script = turn([({"type": "text", "text": ""}, thinking), (use, parts)], "tool_use", 12)
        return Response(script, media_type="text/event-stream")

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = Starlette(routes=[Route("/v1/messages", create, methods=["POST"])])
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    async with anyio.create_task_group() as tg:
        tg.start_soon(server.serve)
        await eventually(lambda: server.started, within=20)
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True


async def test_a_tool_use_block_is_run_and_answered(settings: TektonSettings, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []
    async with messages_api(seen) as url:
        roster = tmp_path / "roster.toml"
        roster.write_text(
            f"""
[specialists.apollo]
description = "Arithmetic"
primary = ["math"]
capabilities = {{ math = 0.9 }}
system_prompt = "You can call tools."
provider = "anthropic"
provider_options = {{ base_url = "{url}", api_key = "test-key", model = "claude-test" }}

[specialists.apollo.mcp_servers.calc]
command = {json.dumps(sys.executable)}
args = [{json.dumps(str(CALC))}]
"""
        )
        served = settings.model_copy(update={"provider": None, "roster": roster})
        async with in_process_specialists(served, "apollo"), Bus.connect(served) as bus:
            async with bus.stream("apollo", [ChatMessage(role="user", content="2 + 40?")]) as s:
                parts = [t async for t in s]
            result = await s.result()
    assert parts == ["Let me add.", "The sum is ", "42"]  # both turns' text, as it came
    [call, answer] = s.tool_frames
    assert isinstance(call, ToolCallFrame) and isinstance(answer, ToolResultFrame)
    assert (call.server, call.tool, call.arguments) == ("calc", "add", {"a": 2, "b": 40})
    assert (answer.text, answer.is_error) == ("42", False)  # the MCP server's own sum
    assert (result.done.usage.prompt_tokens, result.done.usage.completion_tokens) == (40, 17)  # both turns

    first, second = seen
    assert first["system"] == "You can call tools."
    assert [t["name"] for t in first["tools"]] == ["calc__add", "calc__explode"]
    assert first["tools"][0]["input_schema"]["required"] == ["a", "b"]
    assert second["messages"][-2] == {
        "role": "assistant",
        "content": [
            {"type": "text", "text": "Let me add."},
            {"type": "tool_use", "id": "toolu_7", "name": "calc__add", "input": {"a": 2, "b": 40}},
        ],
    }
    assert second["messages"][-1] == {
        "role": "user",
        "content": [{"type": "tool_result", "tool_use_id": "toolu_7", "content": "42"}],
    }
