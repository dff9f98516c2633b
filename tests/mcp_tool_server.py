"""A small MCP server (the official SDK, stdio) for tests: it records every call of deploy in CALLS_FILE.

It refuses to start while DOWN_FILE exists, as a server that is down would. Its tool enable_rollback adds a tool,
rollback, from then on (EXTRA_FILE remembers it across its processes) and says so: tools/list_changed.
"""

import json
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import Context, MCPServer

if os.environ.get("DOWN_FILE") and Path(os.environ["DOWN_FILE"]).exists():
    sys.exit("down for maintenance")

server = MCPServer("ops")


@server.tool()
def deploy(env: str, replicas: int = 1) -> dict[str, object]:
    """Deploy the service to an environment."""
    with open(os.environ["CALLS_FILE"], "a") as calls:
        calls.write(json.dumps({"env": env, "replicas": replicas}) + "\n")
    return {"deployed": env, "replicas": replicas}


@server.tool()
def status() -> str:
    """The service's status."""
    return "all green"


def rollback(version: str) -> str:
    """Roll the service back to a version."""
    return f"rolled back to {version}"


if os.environ.get("EXTRA_FILE") and Path(os.environ["EXTRA_FILE"]).exists():
    server.add_tool(rollback)


@server.tool()
async def enable_rollback(ctx: Context) -> str:
    """Offer the rollback tool from now on."""
    Path(os.environ["EXTRA_FILE"]).touch()  # noqa: ASYNC240  # a test server: one tiny file
    await ctx.session.send_tool_list_changed()
    return "rollback is available"


if __name__ == "__main__":
    server.run("stdio")
