"""A small MCP server (the official SDK, stdio) for tests: it records every call of deploy in CALLS_FILE.

It refuses to start while DOWN_FILE exists, as a server that is down would.
"""

import json
import os
import sys
from pathlib import Path

from mcp.server.mcpserver import MCPServer

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


if __name__ == "__main__":
    server.run("stdio")
