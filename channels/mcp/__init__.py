"""MCP: Handrail as a Model Context Protocol server, so any MCP agent can ask a human through it."""
