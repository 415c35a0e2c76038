"""`tekton mcp` launched the way an MCP host launches it (the SDK's stdio_client), against real
specialists and a real gateway on a real nats-server."""

from __future__ import annotations

import itertools
import json
import socket
import sys
from typing import Any

import anyio
import pytest
from mcp.client.session import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from bus.client import Bus
from bus.settings import TektonSettings
from tests.helpers import (
    assert_kept_alive,
    child_env,
    eventually,
    in_process_gateway,
    in_process_specialists,
    spawn,
)

pytestmark = pytest.mark.anyio


def tekton_mcp(settings: TektonSettings) -> StdioServerParameters:
    env = child_env(settings, TEKTON_LOG_LEVEL="warning")
    return StdioServerParameters(command=sys.executable, args=["-m", "tekton", "mcp"], env=env)


async def test_each_specialist_is_a_tool_whose_answer_streams_as_progress(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo", "athena"),
        stdio_client(tekton_mcp(settings)) as (read, write),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        tools = {t.name: t for t in (await client.list_tools()).tools}
        assert set(tools) == {"apollo", "athena"}
        assert tools["apollo"].input_schema["required"] == ["prompt"]

        progress: list[tuple[float, str | None]] = []

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            progress.append((done, message))

        result = await client.call_tool(
            "apollo", {"prompt": "explain queue groups"}, progress_callback=on_progress
        )
        assert not result.is_error
        assert result.content[0].text == "apollo heard: explain queue groups"  # type: ignore[union-attr]
        # One notification per chunk, each carrying the text so far: the answer arrived piece by piece
        # (the first token alone, a burst of the others in fewer chunks).
        texts = [m or "" for _, m in progress]
        assert texts[0] == "apollo " and texts[-1] == "apollo heard: explain queue groups"
        assert all(b.startswith(a) and b != a for a, b in itertools.pairwise(texts))
        assert [d for d, _ in progress] == list(range(1, len(progress) + 1))

        missing = await client.call_tool("apolo", {"prompt": "x"})
        assert missing.is_error
        assert "no specialist named 'apolo' is running" in missing.content[0].text  # type: ignore[union-attr]
        no_prompt = await client.call_tool("apollo", {})
        assert no_prompt.is_error and "'prompt'" in no_prompt.content[0].text  # type: ignore[union-attr]
        for name in ("a.>*", "x" * 5000):  # not a specialist's name at all
            bad = await client.call_tool(name, {"prompt": "x"})
            said = bad.content[0].text  # type: ignore[union-attr]
            assert bad.is_error and said.startswith("bad_request: invalid specialist name")
            assert len(said) < 300
        long_session = await client.call_tool("apollo", {"prompt": "x", "session": "s" * 5000})
        said = long_session.content[0].text  # type: ignore[union-attr]
        assert long_session.is_error and said.startswith("bad_request: ") and "\n" not in said, said
        assert len(said) < 300
        # The server lived through them all.
        again = await client.call_tool("athena", {"prompt": "still there?"})
        assert again.content[0].text == "athena heard: still there?"  # type: ignore[union-attr]


async def test_sessions_are_resources(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo"),
        in_process_gateway(settings),
        Bus.connect(settings) as bus,
    ):
        session = await bus.gateway.create(specialist="apollo", name="design")
        async with stdio_client(tekton_mcp(settings)) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            answer = await client.call_tool("apollo", {"prompt": "first question", "session": "design"})
            assert answer.content[0].text == "apollo heard: first question"  # type: ignore[union-attr]
            listed = (await client.list_resources()).resources
            assert [r.name for r in listed] == ["design"]
            assert str(listed[0].uri) == f"tekton://sessions/{session.id}"
            read_back = await client.read_resource(listed[0].uri)
            body = json.loads(read_back.contents[0].text)  # type: ignore[union-attr]
            assert [(t["role"], t["content"]) for t in body["turns"]] == [
                ("user", "first question"),
                ("assistant", "apollo heard: first question"),
            ]
            # Not a session's URI, no such session, not a session id at all: errors with their codes.
            for uri, code in (
                ("file:///etc/passwd", -32602),
                ("tekton://sessions/nosuch", -32002),
                ("tekton://sessions/" + "x" * 500, -32602),
            ):
                with pytest.raises(MCPError) as refused:
                    await client.read_resource(uri)  # type: ignore[arg-type]
                assert refused.value.error.code == code, (uri, refused.value.error)
            assert (await client.list_resources()).resources  # and the server lives on


def mcp_http(settings: TektonSettings) -> tuple[int, Any]:
    """`tekton mcp --http PORT` on a free port: the port and the child."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    argv = [sys.executable, "-m", "tekton", "mcp", "--http", str(port), "--log-level", "warning"]
    return port, spawn(argv, child_env(settings))


async def test_streamable_http_serves_the_same_tools(settings: TektonSettings) -> None:
    _, child = mcp_http(settings)
    try:
        url = (
            await anyio.to_thread.run_sync(lambda: child.wait_for(lambda s: "MCP (streamable HTTP) on" in s))
        ).split()[-1]
        async with in_process_specialists(settings, "athena"):
            progress: list[str | None] = []

            async def on_progress(done: float, total: float | None, message: str | None) -> None:
                progress.append(message)

            async def connected() -> bool:
                try:
                    async with (
                        streamable_http_client(url) as (read, write),
                        ClientSession(read, write) as client,
                    ):
                        await client.initialize()
                        assert [t.name for t in (await client.list_tools()).tools] == ["athena"]
                        result = await client.call_tool(
                            "athena", {"prompt": "over http"}, progress_callback=on_progress
                        )
                        assert result.content[0].text == "athena heard: over http"  # type: ignore[union-attr]
                        return True
                except OSError:
                    return False  # uvicorn printed our ready line just before it listens

            await eventually(connected, within=20)
            assert progress[-1] == "athena heard: over http" and len(progress) >= 2
    finally:
        child.stop()


async def test_streamable_http_keeps_an_idle_connection_past_uvicorn_s_default(
    settings: TektonSettings,
) -> None:
    """HTTP clients pool idle connections (aiohttp 15 s); with uvicorn's 5 s keep-alive a client reusing
    one just as the server closed it got "server disconnected". Idle longer than 5 s, it still answers
    (the bridge's keep-alive, HTTP_KEEP_ALIVE_S)."""
    port, child = mcp_http(settings)
    try:
        await anyio.to_thread.run_sync(lambda: child.wait_for(lambda s: "MCP (streamable HTTP) on" in s))
        request = f"DELETE /mcp HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n"
        await assert_kept_alive(port, request.encode())
    finally:
        child.stop()


async def test_the_roster_s_prompts_are_mcp_prompts(settings: TektonSettings) -> None:
    async with (
        in_process_specialists(settings, "apollo", "athena"),
        stdio_client(tekton_mcp(settings)) as (read, write),
        ClientSession(read, write) as client,
    ):
        await client.initialize()
        prompts = {p.name: p for p in (await client.list_prompts()).prompts}
        assert set(prompts) == {"apollo.review", "apollo.explain-error", "athena.explain"}  # running ones
        review = prompts["apollo.review"]
        assert [(a.name, a.required) for a in review.arguments or []] == [("code", True), ("language", False)]

        got = await client.get_prompt("apollo.review", {"code": "def f(): return {1}", "language": "Python"})
        [message] = got.messages
        assert message.role == "user"
        text = message.content.text  # type: ignore[union-attr]
        assert text.startswith("Review this Python code.") and text.endswith("\n\ndef f(): return {1}")
        without = await client.get_prompt("apollo.review", {"code": "x = 1"})
        assert without.messages[0].content.text.startswith("Review this code.")  # type: ignore[union-attr]
        # The filled prompt is what a user sends the specialist's tool.
        asked = await client.call_tool("athena", {"prompt": "quick question"})
        assert asked.content[0].text == "athena heard: quick question"  # type: ignore[union-attr]

        with pytest.raises(MCPError, match="missing required argument"):
            await client.get_prompt("apollo.review", {"language": "Go"})
        with pytest.raises(MCPError, match=r"no prompt named 'apollo\.nope'"):
            await client.get_prompt("apollo.nope", {})
