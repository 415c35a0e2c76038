"""`tekton mcp`: the MCP server of bridge/mcp.py over stdio (what an MCP host launches), or over
streamable HTTP with ``--http PORT`` (endpoint ``/mcp``; DNS-rebinding protection on localhost)."""

from __future__ import annotations

from typing import Any

from mcp.server.stdio import stdio_server

from bridge.mcp import create_server
from bus.client import Bus
from bus.settings import TektonSettings


async def serve_stdio(settings: TektonSettings) -> None:
    async with Bus.connect(settings, name="tekton-mcp") as bus:
        server = create_server(bus)
        async with stdio_server() as (read, write):
            await server.run(read, write, server.create_initialization_options())


async def serve_http(settings: TektonSettings, host: str, port: int, on_ready: Any = None) -> None:
    import uvicorn

    from bridge.listen import HTTP_KEEP_ALIVE_S, http_socket

    # Listening first: a port in use is one line at once, and connections made after the ready line
    # wait in the backlog. Closed however it ends.
    with http_socket(host, port) as sock:
        async with Bus.connect(settings, name="tekton-mcp") as bus:
            app = create_server(bus).streamable_http_app(host=host)
            server = uvicorn.Server(
                uvicorn.Config(app, log_level="warning", timeout_keep_alive=HTTP_KEEP_ALIVE_S)
            )
            if on_ready is not None:
                bound_host, bound_port = sock.getsockname()[:2]
                on_ready(f"http://{bound_host}:{bound_port}/mcp")
            await server.serve([sock])
