"""A small MCP server for the tests (stdio): notes to look up, a short one first, then a longer one (so
a test can see the result's length in the model's prompt)."""

from mcp.server.mcpserver import MCPServer

server = MCPServer("notes")
asked = 0


@server.tool()
def lookup(topic: str) -> str:
    """Look a topic up in the notes."""
    global asked
    asked += 1
    return "42" if asked == 1 else "42, says the note on " + topic + ", and much more besides. " * 4


if __name__ == "__main__":
    server.run()
