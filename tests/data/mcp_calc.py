"""A small MCP server for the tests (stdio): arithmetic, and a tool that always fails."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("calc")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    return a + b


@server.tool()
def explode() -> str:
    """Always fails."""
    raise ValueError("the calculator exploded")


if __name__ == "__main__":
    server.run()
