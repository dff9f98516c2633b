"""Handrail's core runtime: events, the bus, threads, the agent loop and approvals. It imports no channel."""
