"""The MCP server's tools: request_approval, ask_human and get_decision, over any transport.

Each request opens a thread of the agent routed for ``mcp`` (config ``routes: {mcp: ...}``), so its card or
question goes to humans exactly like one of Handrail's own agents'; the answer is read back from the thread's log.
A human may take hours: a call waits up to ``timeout`` seconds (sending progress notifications when the client
gave a progress token), and ``wait=false`` or a timed-out wait hands back the request id for get_decision.
"""

# No `from __future__ import annotations`: the SDK reads the tools' annotations (Context among them) at runtime.

import asyncio
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from pydantic import Field

from bot import control, threads
from bot.errors import HandrailError
from bot.events import ChannelRef, new_id
from bot.runtime import Deps
from channels.mcp.outcome import Decision, decision

log = logging.getLogger(__name__)

KIND = "mcp"
POLL_EVERY = 0.25  # seconds between looks at a waited-on thread's log
PROGRESS_EVERY = 15.0  # seconds between progress notifications while a call waits for a human
MAX_WAIT = 24 * 3600.0


@dataclass(frozen=True)
class Caller:
    """Who is asking: the identity requests are made in, what it may do, where its threads may talk."""

    identity: str  # terminal:alice over stdio, api:NAME over HTTP
    scopes: frozenset[str]
    agents: frozenset[str] | None = None  # None: every agent
    channels: frozenset[str] | None = None  # "KIND:ADDRESS" or "KIND:*"; None: any

    def may_use(self, agent: str) -> bool:
        return self.agents is None or agent in self.agents

    def may_talk_on(self, kind: str, address: str) -> bool:
        if kind == KIND or self.channels is None:
            return True
        return f"{kind}:{address}" in self.channels or f"{kind}:*" in self.channels


# How a tool call learns who is calling (stdio: fixed; HTTP: from the bearer key); None: not authenticated.
Identify = Callable[[Context], Caller | None]

Wait = Annotated[bool, Field(description="Wait for the human (true) or return the request id at once (false)")]
RequestKey = Annotated[
    str | None,
    Field(description="Your own id for this request: asking again with the same key and the same request (a retry "
                      "after a timeout or a reconnect) returns that request instead of opening another",
          min_length=1, max_length=255),
]  # fmt: skip
Timeout = Annotated[
    float, Field(ge=0, le=MAX_WAIT, description="Seconds to wait before returning 'pending' with the request id")
]
Where = Annotated[
    str | None,
    Field(description="Where to ask, e.g. 'slack:C0123' or 'email:ops@example.com' (default: the approval queue, "
                      "seen in the REST API, the CLI and webhooks)", max_length=300),
]  # fmt: skip


def build(deps: Deps, identify: Identify, *, name: str = "handrail") -> MCPServer:
    server: MCPServer = MCPServer(
        name,
        instructions="Ask a human before anything that matters: request_approval for an action, ask_human for a "
        "question. Both wait for the human; with wait=false they return a request_id for get_decision.",
    )

    def caller(ctx: Context, scope: str) -> Caller:
        who = identify(ctx)
        if who is None:
            raise ToolError("missing or invalid API key")
        if scope not in who.scopes:
            raise ToolError(f"this key lacks the {scope!r} scope")
        return who

    def agent_for(who: Caller) -> str:
        agent = deps.agents.spec.routes.get(KIND)
        if agent is None:  # not the first agent, as for other channels: it would read the requests as chat
            raise ToolError("no agent answers MCP requests: add 'routes: {mcp: mcp-desk}' to the config (README, MCP)")
        if not who.may_use(agent):
            raise ToolError(f"this key may not use agent {agent!r}, which answers MCP requests")
        return agent

    def origin(who: Caller, where: str | None) -> ChannelRef:
        if not where:
            return ChannelRef(kind=KIND, address=who.identity, user=who.identity)
        kind, sep, address = where.partition(":")
        if not sep or not kind or not address:
            raise ToolError(f"channel {where!r} should look like 'slack:C0123' or 'email:ops@example.com'")
        if not who.may_talk_on(kind, address):
            raise ToolError(f"{who.identity} may not ask on {where}")
        return ChannelRef(kind=kind, address=address, user=who.identity)

    async def open_request(ctx: Context, who: Caller, request: dict[str, Any], where: str | None, wait: bool,
                           timeout: float, request_key: str | None) -> Decision:  # fmt: skip
        agent = agent_for(who)
        ref = origin(who, where)
        text = json.dumps(request, ensure_ascii=False)
        thread_id = new_id() if request_key is None else _keyed_id(who.identity, request_key, where or "", text)
        try:
            accepted = await control.launch(deps, agent, text, ref, thread_id=thread_id, key=f"mcp:{thread_id}")
        except HandrailError as exc:
            raise ToolError(str(exc)) from None
        if accepted.duplicate:
            log.info("thread %s: %s asked again with its request key", thread_id, who.identity)
            return await settle(ctx, thread_id, timeout if wait else 0)
        log.info("thread %s: %s opened an MCP %s request", thread_id, who.identity, request["request"])
        return await settle(ctx, thread_id, timeout if wait else 0)

    async def settle(ctx: Context, thread_id: str, timeout: float) -> Decision:
        """The request's decision, waiting up to ``timeout`` seconds for one (progress sent meanwhile)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        deadline, next_progress = start + timeout, start + PROGRESS_EVERY
        while True:
            thread = await threads.load(deps.redis, deps.keys, thread_id)
            found = decision(thread_id, thread.events)
            now = loop.time()
            if found.status != "pending" or now >= deadline:
                return found
            if now >= next_progress:
                waited = now - start
                await ctx.report_progress(waited, timeout, f"waiting for a human ({waited:.0f} s so far)")
                next_progress = now + PROGRESS_EVERY
            await asyncio.sleep(min(POLL_EVERY, deadline - now))

    @server.tool(structured_output=True)
    async def request_approval(
        action: Annotated[str, Field(min_length=1, max_length=2_000, description="What you want to do, for a human")],
        ctx: Context,
        arguments: Annotated[dict[str, Any] | None, Field(description="The arguments you would do it with")] = None,
        approvers: Annotated[
            list[str] | None,
            Field(
                description="Who may approve, e.g. ['slack:U123', 'email:ops@example.com'] (default: everyone the "
                "configured policy names; others are refused)",
                max_length=50,
            ),
        ] = None,
        channel: Where = None,
        wait: Wait = True,
        timeout: Timeout = 3600,
        request_key: RequestKey = None,
    ) -> Decision:
        """Ask a human to approve an action before you take it. Returns approved (with the arguments to use,
        possibly edited by the approver) or rejected (with feedback), or pending with a request_id."""
        who = caller(ctx, "launch")
        wanted = [a.strip() for a in approvers or () if a.strip()]
        policies = deps.agents.agent(agent_for(who)).approvals.values()
        if not policies:
            raise ToolError(f"agent {agent_for(who)!r} gates nothing, so it cannot ask for approvals")
        refused = [a for a in wanted if not any(p.allows(a) for p in policies)]
        if refused:
            allowed = sorted({a for p in policies for a in p.approvers})
            raise ToolError(f"not allowed to approve these requests: {', '.join(refused)} (allowed: "
                            f"{', '.join(allowed)})")  # fmt: skip
        request = {"request": "approval", "action": action, "arguments": arguments or {}, "approvers": wanted}
        return await open_request(ctx, who, request, channel, wait, timeout, request_key)

    @server.tool(structured_output=True)
    async def ask_human(
        question: Annotated[str, Field(min_length=1, max_length=4_000, description="The question, for a human")],
        ctx: Context,
        choices: Annotated[
            list[str] | None, Field(description="Answers to offer, e.g. ['yes', 'no']", max_length=20)
        ] = None,
        urgency: Annotated[Literal["low", "normal", "high"], Field(description="How soon it matters")] = "normal",
        channel: Where = None,
        wait: Wait = True,
        timeout: Timeout = 3600,
        request_key: RequestKey = None,
    ) -> Decision:
        """Ask a human a question and get their answer (with the matching choice, if you offered some), or
        pending with a request_id."""
        who = caller(ctx, "launch")
        request = {"request": "question", "question": question, "choices": choices or [], "urgency": urgency}
        return await open_request(ctx, who, request, channel, wait, timeout, request_key)

    @server.tool(structured_output=True)
    async def get_decision(
        request_id: Annotated[str, Field(min_length=1, max_length=128, description="From request_approval or "
                                                                                   "ask_human")],
        ctx: Context,
        timeout: Timeout = 0,
    ) -> Decision:  # fmt: skip
        """The decision or answer of an earlier request (after a reconnect too), waiting up to timeout seconds
        for it while it is pending."""
        who = caller(ctx, "read")
        agent = await threads.agent_of(deps.redis, deps.keys, request_id)
        if agent is None:
            launched = await control.pending_launch(deps, request_id)
            agent = launched.agent if launched is not None else None
        if agent is None or agent != deps.agents.spec.routes.get(KIND) or not who.may_use(agent):
            raise ToolError(f"no request {request_id!r}")
        return await settle(ctx, request_id, timeout)

    return server


def _keyed_id(identity: str, request_key: str, where: str, text: str) -> str:
    """The thread of a keyed request: the same caller, key, place and request always land on the same thread (a
    different request under a reused key is a new one, never an old request's decision)."""
    digest = hashlib.sha256("\0".join((identity, request_key, where, text)).encode()).hexdigest()[:24]
    return f"mcp-{digest}"
