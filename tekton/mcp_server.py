"""`tekton mcp`: Tekton as an MCP server (the official ``mcp`` SDK's low-level server) over stdio, or
over streamable HTTP with ``--http PORT`` (endpoint ``/mcp``; DNS-rebinding protection on localhost).

- Tools: one per running specialist (``$SRV.INFO``, asked afresh on every ``tools/list``), with a
  ``prompt`` argument and an optional ``session``. A call streams the answer from the bus; every chunk
  goes to the MCP client as a ``notifications/progress`` whose message is the text so far (when the
  client sent a progress token), and the result is the whole answer.
- Resources: the gateway's sessions, ``tekton://sessions/<id>``, read as the conversation in JSON.

Errors from the bus are tool results with ``isError`` and the error's own one-line message, so the
model using the tool sees why (no specialist of that name, deadline, ...), and the server lives on.
"""

from __future__ import annotations

import json
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.stdio import stdio_server

from bus.client import Bus, ServiceInstance
from bus.errors import BusError
from bus.settings import TektonSettings
from bus.wire import ChatMessage

SESSION_SCHEME = "tekton://sessions/"
TOOL_SCHEMA = {
    "type": "object",
    "properties": {
        "prompt": {"type": "string", "description": "What to ask the specialist"},
        "session": {
            "type": "string",
            "description": "A session id or name: the gateway adds its history and records the answer",
        },
    },
    "required": ["prompt"],
}


def tool_for(instance: ServiceInstance) -> types.Tool:
    caps = ", ".join(instance.primary) or ", ".join(sorted(instance.capabilities))
    description = instance.description or f"the Tekton specialist {instance.name}"
    if caps:
        description += f" (good at: {caps})"
    return types.Tool(name=instance.name, description=description, input_schema=TOOL_SCHEMA)


def _error(text: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=True)


def create_server(bus: Bus) -> Server[Any]:
    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        instances = await bus.instances(window=0.2)
        seen: dict[str, ServiceInstance] = {}
        for instance in instances:
            seen.setdefault(instance.name, instance)
        return types.ListToolsResult(tools=[tool_for(i) for i in seen.values()])

    async def call_tool(
        ctx: ServerRequestContext[Any], params: types.CallToolRequestParams
    ) -> types.CallToolResult:
        args = params.arguments or {}
        prompt = args.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            return _error("the 'prompt' argument (a non-empty string) is required")
        session = args.get("session")
        parts: list[str] = []
        try:
            async with bus.stream(
                params.name,
                [ChatMessage(role="user", content=prompt)],
                session=session if isinstance(session, str) and session else None,
            ) as s:
                async for text in s:
                    parts.append(text)
                    await ctx.session.report_progress(len(parts), None, "".join(parts))
            result = await s.result()
        except BusError as err:
            return _error(f"{err.code}: {err.message}")
        usage = result.done.usage
        return types.CallToolResult(
            content=[types.TextContent(type="text", text=result.text)],
            structured_content={
                "text": result.text,
                "specialist": result.start.specialist,
                "completion_tokens": usage.completion_tokens,
                "prompt_tokens": usage.prompt_tokens,
            },
        )

    async def list_resources(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListResourcesResult:
        try:
            sessions = await bus.gateway.list(limit=200)
        except BusError:  # no gateway on this bus: no sessions to show
            sessions = []
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=f"{SESSION_SCHEME}{s.id}",
                    name=s.name or s.id,
                    description=f"{s.turns} turns with {s.specialist or 'any specialist'}: {s.last}",
                    mime_type="application/json",
                )
                for s in sessions
            ]
        )

    async def read_resource(
        ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        uri = str(params.uri)
        if not uri.startswith(SESSION_SCHEME):
            raise ValueError(f"not a Tekton session URI: {uri} (expected {SESSION_SCHEME}<id>)")
        session = await bus.gateway.get(uri.removeprefix(SESSION_SCHEME))
        turns = [t.model_dump(include={"role", "content", "specialist", "status"}) for t in session.turns]
        body = {"id": session.id, "name": session.name, "specialist": session.specialist, "turns": turns}
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=uri, mime_type="application/json", text=json.dumps(body))
            ]
        )

    return Server(
        "tekton",
        version="0.1.0",
        instructions="Each tool is a Tekton specialist on a NATS bus; its answer streams as progress.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
    )


async def serve_stdio(settings: TektonSettings) -> None:
    async with Bus.connect(settings, name="tekton-mcp") as bus:
        server = create_server(bus)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


async def serve_http(settings: TektonSettings, host: str, port: int, on_ready: Any = None) -> None:
    import uvicorn

    from gateway.runtime import http_socket

    async with Bus.connect(settings, name="tekton-mcp") as bus:
        app = create_server(bus).streamable_http_app(host=host)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
        # Listening before we say where: connections made after the ready line wait in the backlog.
        sock = http_socket(host, port)
        sock.listen(128)
        if on_ready is not None:
            bound_host, bound_port = sock.getsockname()[:2]
            on_ready(f"http://{bound_host}:{bound_port}/mcp")
        await server.serve([sock])
