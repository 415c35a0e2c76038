"""A specialist's MCP tools: the MCP servers its roster entry names, as clients of the official SDK.

    [specialists.apollo.mcp_servers.calc]
    command = "python"
    args = ["-m", "my_calc_server"]          # stdio: started with the specialist, stopped with it
    # or: url = "http://127.0.0.1:8000/mcp"  # streamable HTTP

A provider asks for the tools of the request it is serving with :func:`current` (None when the
specialist has none) and calls one with ``await tools.call(server, tool, arguments)``. Each call and
its result go into the reply stream as typed frames (``tool_call``, ``tool_result``), so whoever reads
the answer (aish, the bridge) sees what the specialist did, in order with its text.
"""

from __future__ import annotations

import contextvars
import json
import re
import uuid
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING, Any

import anyio
import structlog
from anyio.abc import TaskStatus
from pydantic import BaseModel, ConfigDict, model_validator

from bus.errors import BusError, ErrorCode
from bus.wire import ToolCallFrame, ToolResultFrame

if TYPE_CHECKING:  # the MCP SDK loads when a specialist has servers (~0.8 s of every start otherwise)
    import mcp_types as types
    from mcp.client.session import ClientSession

log = structlog.get_logger("tekton.tools")

Emit = Callable[..., Awaitable[None]]  # ReplyStream.send: (frame type, **fields)


class McpServerSpec(BaseModel):
    """One MCP server a specialist may use: a command to start (stdio) or a URL (streamable HTTP)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: str | None = None
    args: list[str] = []
    env: dict[str, str] = {}
    url: str | None = None

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of 'command' (stdio) or 'url' (streamable HTTP)")
        return self


class ToolError(BusError):
    def __init__(self, message: str):
        super().__init__(message, code=ErrorCode.PROVIDER_ERROR)


class ToolBox:
    """Open MCP client sessions, one per server, and what tools each offers."""

    def __init__(self) -> None:
        self.sessions: dict[str, ClientSession] = {}
        self.tools: dict[str, list[types.Tool]] = {}

    async def call(self, server: str, tool: str, arguments: dict[str, Any]) -> types.CallToolResult:
        session = self.sessions.get(server)
        if session is None:
            raise ToolError(
                f"no MCP server named '{server}' (this specialist has: {', '.join(self.sessions)})"
            )
        return await session.call_tool(tool, arguments)

    async def run(
        self,
        servers: dict[str, McpServerSpec],
        stop: anyio.Event,
        *,
        task_status: TaskStatus[ToolBox] = anyio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect to every server, report ready, hold the sessions until ``stop``, then close them (in
        this same task, as the SDK's transports require)."""
        from mcp.client.session import ClientSession
        from mcp.client.stdio import StdioServerParameters, stdio_client
        from mcp.client.streamable_http import streamable_http_client

        async with AsyncExitStack() as stack:
            for name, spec in servers.items():
                if spec.url is not None:
                    read, write = await stack.enter_async_context(streamable_http_client(spec.url))
                else:
                    assert spec.command is not None
                    params = StdioServerParameters(command=spec.command, args=spec.args, env=spec.env or None)
                    read, write = await stack.enter_async_context(stdio_client(params))
                session = await stack.enter_async_context(ClientSession(read, write))
                await session.initialize()
                self.sessions[name] = session
                self.tools[name] = (await session.list_tools()).tools
                log.info("MCP server connected", server=name, tools=[t.name for t in self.tools[name]])
            task_status.started(self)
            await stop.wait()


class RequestTools:
    """The tools of one request: calls go to the servers, and their frames into the reply stream."""

    def __init__(self, box: ToolBox, emit: Emit):
        self.box = box
        self._emit = emit

    @property
    def available(self) -> dict[str, list[types.Tool]]:
        return self.box.tools

    async def call(self, server: str, tool: str, arguments: dict[str, Any] | None = None) -> str:
        """Call ``server``'s ``tool``; returns its text (an error result raises :class:`ToolError`)."""
        call_id = uuid.uuid4().hex[:12]
        arguments = arguments or {}
        await self._emit(ToolCallFrame, id=call_id, server=server, tool=tool, arguments=arguments)
        try:
            result = await self.box.call(server, tool, arguments)
        except BusError as err:
            await self._emit(ToolResultFrame, id=call_id, text=err.message, is_error=True)
            raise
        except Exception as err:  # the MCP server refused or went away: the request's error, not ours
            await self._emit(ToolResultFrame, id=call_id, text=str(err), is_error=True)
            raise ToolError(f"tool '{server}.{tool}' failed: {err}") from err
        from mcp_types import TextContent

        text = "".join(c.text for c in result.content if isinstance(c, TextContent))
        await self._emit(ToolResultFrame, id=call_id, text=text, is_error=result.is_error)
        if result.is_error:
            raise ToolError(f"tool '{server}.{tool}' failed: {text}")
        return text

    def functions(self) -> list[tuple[str, types.Tool]]:
        """Every tool under one name for a model's tools API (OpenAI functions, Anthropic tools):
        ``server__tool``, in the characters and length those APIs accept."""
        tools = self.box.tools.items()
        return [(function_name(server, tool.name), tool) for server, listed in tools for tool in listed]

    async def answer(self, function: str, arguments: str | dict[str, Any]) -> str:
        """Call the tool a model named (``server__tool``, arguments as JSON text or a dict); what to
        tell the model. A failing tool's message goes back to the model too (it may try otherwise);
        the frames show it either way."""
        found = {
            function_name(server, tool.name): (server, tool.name)
            for server, listed in self.box.tools.items()
            for tool in listed
        }
        if function not in found:
            return f"error: there is no tool named '{function}' (tools: {', '.join(found)})"
        if isinstance(arguments, str):
            try:
                parsed = json.loads(arguments or "{}")
            except json.JSONDecodeError as err:
                return f"error: the arguments are not JSON ({err.msg}); send a JSON object"
            if not isinstance(parsed, dict):
                return "error: the arguments must be a JSON object"
            arguments = parsed
        try:
            return await self.call(*found[function], arguments)
        except ToolError as err:
            return f"error: {err.message}"


def function_name(server: str, tool: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", f"{server}__{tool}")[:64]


_CURRENT: contextvars.ContextVar[RequestTools | None] = contextvars.ContextVar("tekton_tools", default=None)


def current() -> RequestTools | None:
    """The tools of the request being served in this task (None: the specialist has none)."""
    return _CURRENT.get()


def bind(box: ToolBox | None, emit: Emit) -> None:
    """Make ``box`` the current request's tools (each request is served in its own task)."""
    if box is not None:
        _CURRENT.set(RequestTools(box, emit))
