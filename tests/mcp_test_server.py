"""A small MCP server of the tests' own, built with the SDK's MCPServer (formerly FastMCP).

    python tests/mcp_test_server.py stdio
    python tests/mcp_test_server.py http PORT      # streamable HTTP at http://127.0.0.1:PORT/mcp

Its tools exercise what the reference servers cannot: hanging, crashing, huge results,
failures, concurrency (a barrier), and what the process can see (its pid, its environment).
"""

from __future__ import annotations

import asyncio
import os
import sys

from mcp.server.mcpserver import MCPServer

server = MCPServer("clawgate-test-tools")
_arrived: dict[str, int] = {}
_released: dict[str, asyncio.Event] = {}


@server.tool()
def echo(text: str) -> str:
    """Return the text."""
    return text


@server.tool()
async def hang(seconds: float = 3600) -> str:
    """Sleep (a tool that does not answer in time)."""
    await asyncio.sleep(seconds)
    return "woke up"


@server.tool()
def big(size: int) -> str:
    """Return `size` characters."""
    return "x" * size


@server.tool()
def crash() -> str:
    """Kill this server process mid-call."""
    os._exit(3)


@server.tool()
def pid() -> int:
    """This process id (a restarted server has another)."""
    return os.getpid()


@server.tool()
def env(name: str) -> str:
    """One variable of this process' environment, or "<unset>"."""
    return os.environ.get(name, "<unset>")


@server.tool()
def env_names() -> list[str]:
    """The names in this process' environment."""
    return sorted(os.environ)


@server.tool()
def fail(message: str = "tool failed on purpose") -> str:
    """Raise: the client gets an error result."""
    raise RuntimeError(message)


@server.tool()
async def barrier(name: str, n: int, tag: str = "") -> str:
    """Return only once `n` calls with this name are in flight at the same time."""
    _arrived[name] = _arrived.get(name, 0) + 1
    event = _released.setdefault(name, asyncio.Event())
    if _arrived[name] >= n:
        event.set()
    await asyncio.wait_for(event.wait(), 30)
    return f"{name} passed with {n}: {tag}"


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "http":
        server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        server.run("stdio")
