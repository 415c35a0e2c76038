"""Tekton as an MCP server (the official ``mcp`` SDK's low-level server): on stdio (`tekton mcp`), on
streamable HTTP (`tekton mcp --http PORT`), and on the HTTP bridge itself at ``/mcp`` (its API tokens
acting as their bus users, like every other edge of the bridge).

- Tools: one per running specialist (``$SRV.INFO``, asked afresh on every ``tools/list``), with a
  ``prompt`` argument and an optional ``session``. A call streams the answer from the bus; every chunk
  goes to the MCP client as a ``notifications/progress`` whose message is the text so far (when the
  client sent a progress token), and the result is the whole answer.
- Resources: the gateway's sessions, ``tekton://sessions/<id>``, read as the conversation in JSON.
- Prompts: the roster's prompt templates of every running specialist, ``<specialist>.<prompt>``
  (``apollo.review``), with their arguments; getting one fills the template in (bus/prompts.py).

Errors from the bus are tool results with ``isError`` and the error's own one-line message, so the
model using the tool sees why (no specialist of that name, deadline, ...), and the server lives on.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import mcp_types as types
from mcp.server.context import ServerRequestContext
from mcp.server.lowlevel.server import Server
from mcp.server.streamable_http_manager import StreamableHTTPSessionManager
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from bus.client import Bus, ServiceInstance
from bus.errors import BadRequest, BusError, SessionNotFound, problems_line
from bus.wire import ChatMessage

# Which bus a request is served with: the server's own, or (on the bridge) the caller's user's.
BusFor = Callable[[ServerRequestContext[Any]], Bus]

SESSION_SCHEME = "tekton://sessions/"
RESOURCE_NOT_FOUND = -32002  # the MCP specification's code (the SDK has no name for it)
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


def prompt_list(views: list[Any]) -> list[types.Prompt]:
    return [
        types.Prompt(
            name=f"{view.name}.{name}",
            description=f"{view.name}: {template.description}" if template.description else view.name,
            arguments=[
                types.PromptArgument(name=a.name, description=a.description or None, required=a.required)
                for a in template.arguments
            ],
        )
        for view in views
        for name, template in sorted(view.prompts.items())
    ]


def create_server(bus: Bus | None = None, *, bus_for: BusFor | None = None) -> Server[Any]:
    """The MCP server over ``bus``, or over the bus ``bus_for(ctx)`` picks per request."""
    if bus_for is None:
        assert bus is not None
        fixed = bus
        bus_for = lambda ctx: fixed  # noqa: E731

    async def list_tools(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListToolsResult:
        instances = await bus_for(ctx).instances(window=0.2)
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
            async with bus_for(ctx).stream(
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
        except ValidationError as err:  # a session reference that cannot be one (too long, say)
            return _error(f"bad_request: {problems_line(err, 'the request')}")
        except ValueError as err:  # not a specialist's name at all
            return _error(f"bad_request: {err}")
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
            sessions = await bus_for(ctx).gateway.list(limit=200)
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
            raise MCPError(
                types.INVALID_PARAMS, f"not a Tekton session URI: {uri[:100]} (expected {SESSION_SCHEME}<id>)"
            )
        ref = uri.removeprefix(SESSION_SCHEME)
        try:
            session = await bus_for(ctx).gateway.get(ref)
        except (ValueError, BadRequest):  # not a session id or name at all (too long, say)
            raise MCPError(types.INVALID_PARAMS, f"not a session id or name: {ref[:80]!r}") from None
        except BusError as err:
            code = RESOURCE_NOT_FOUND if isinstance(err, SessionNotFound) else types.INTERNAL_ERROR
            raise MCPError(code, f"{err.code}: {err.message}") from None
        turns = [t.model_dump(include={"role", "content", "specialist", "status"}) for t in session.turns]
        body = {"id": session.id, "name": session.name, "specialist": session.specialist, "turns": turns}
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=uri, mime_type="application/json", text=json.dumps(body))
            ]
        )

    async def list_prompts(
        ctx: ServerRequestContext[Any], params: types.PaginatedRequestParams | None
    ) -> types.ListPromptsResult:
        return types.ListPromptsResult(prompts=prompt_list(await bus_for(ctx).survey(window=0.2)))

    async def get_prompt(
        ctx: ServerRequestContext[Any], params: types.GetPromptRequestParams
    ) -> types.GetPromptResult:
        specialist, _, name = params.name.partition(".")
        views = [v for v in await bus_for(ctx).survey(window=0.2) if v.name == specialist]
        template = views[0].prompts.get(name) if views else None
        if template is None:
            offered = ", ".join(p.name for p in prompt_list(await bus_for(ctx).survey(window=0.1))) or "none"
            raise MCPError(types.INVALID_PARAMS, f"no prompt named '{params.name}' (offered: {offered})")
        try:
            text = template.render(params.arguments or {})
        except BusError as err:
            raise MCPError(types.INVALID_PARAMS, f"prompt '{params.name}': {err.message}") from None
        return types.GetPromptResult(
            description=f"{template.description} (ask it with the tool '{specialist}')",
            messages=[types.PromptMessage(role="user", content=types.TextContent(type="text", text=text))],
        )

    return Server(
        "tekton",
        version="0.1.0",
        instructions="Each tool is a Tekton specialist on a NATS bus; its answer streams as progress.",
        on_list_tools=list_tools,
        on_call_tool=call_tool,
        on_list_resources=list_resources,
        on_read_resource=read_resource,
        on_list_prompts=list_prompts,
        on_get_prompt=get_prompt,
    )


class McpEndpoint:
    """MCP streamable HTTP as an ASGI app on the bridge (``/mcp``). ``admit(scope)`` runs the bridge's
    own checks (API token, rate) and raises :class:`BusError`; the bridge's edge guard has already
    checked Host and Origin. Run :meth:`running` in the app's lifespan."""

    def __init__(self, bus_for: BusFor, admit: Callable[[Any], object]):
        self.admit = admit
        # DNS-rebinding checks are the edge guard's (for every route alike), so none here.
        self.manager = StreamableHTTPSessionManager(app=create_server(bus_for=bus_for))

    @asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        async with self.manager.run():
            yield

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.responses import JSONResponse

        try:
            self.admit(scope)
        except BusError as err:
            body = {"error": {"code": str(err.code), "message": err.message}}
            return await JSONResponse(body, status_code=err.http_status)(scope, receive, send)
        await self.manager.handle_request(scope, receive, send)
