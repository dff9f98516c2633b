"""MCP servers as tools: an agent's ``mcp_servers`` (a stdio command or a Streamable HTTP URL) lend it their tools.

A server's tools are listed the first time the agent needs them, and again: for a server that could not be
reached, at most every ``RETRY_EVERY`` seconds; after the server said its list changed (in any session we had with
it); and every ``REFRESH_EVERY`` seconds, for a change said while no session was open. Each becomes a Tool named
``SERVER.TOOL`` whose arguments are checked against the server's own JSON schema before anything runs, so approval
policies (``SERVER.*``), repeats and idempotency apply as to any Python tool. Each call opens its own session: a
server that is down is a failed call, recorded and shown to the model like any tool failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import RootModel, model_validator

from bot.redact import redact
from bot.tools import Tool, ToolContext

log = logging.getLogger(__name__)

RETRY_EVERY = 30.0  # seconds before listing the tools of a server that could not be reached again
REFRESH_EVERY = 300.0  # seconds a listing is trusted when the server has not said its tools changed


@dataclass(frozen=True)
class ServerSpec:
    name: str
    command: tuple[str, ...] = ()  # stdio: the program and its arguments
    url: str = ""  # Streamable HTTP endpoint
    env: Mapping[str, str] = field(default_factory=dict)  # extra environment of a stdio server
    headers: Mapping[str, str] = field(default_factory=dict)  # HTTP headers (credentials from the environment)
    timeout: float = 30.0  # seconds to connect and list the tools


class McpToolError(Exception):
    """The server answered the call with an error result."""


class _McpArgs(RootModel[dict[str, Any]]):
    """Arguments checked against a server's JSON schema (a subclass per tool sets ``input_schema``)."""

    input_schema: ClassVar[dict[str, Any]] = {"type": "object"}

    @model_validator(mode="after")
    def _matches_schema(self) -> _McpArgs:
        from jsonschema import Draft202012Validator

        errors = sorted(Draft202012Validator(self.input_schema).iter_errors(self.root), key=lambda e: list(e.path))
        if errors:
            raise ValueError("; ".join(f"{'.'.join(map(str, e.path)) or 'args'}: {e.message}" for e in errors[:5]))
        return self

    @classmethod
    def model_json_schema(cls, *args: Any, **kwargs: Any) -> dict[str, Any]:
        return dict(cls.input_schema)  # what the model sees is the server's schema, as given


@contextlib.asynccontextmanager
async def session(spec: ServerSpec, changed: Callable[[], None] | None = None) -> AsyncIterator[Any]:
    """An initialised client session with the server (a fresh process, for a stdio server); ``changed`` is called
    when the server says its tool list changed."""
    from mcp import types
    from mcp.client.session import ClientSession

    async def on_message(message: Any) -> None:
        if changed is not None and isinstance(message, types.ToolListChangedNotification):
            changed()

    async with contextlib.AsyncExitStack() as stack:
        if spec.command:
            from mcp.client.stdio import StdioServerParameters, stdio_client

            params = StdioServerParameters(command=spec.command[0], args=list(spec.command[1:]), env=dict(spec.env))
            read, write = await stack.enter_async_context(stdio_client(params))
        else:
            from mcp.client.streamable_http import streamable_http_client
            from mcp.shared._httpx_utils import create_mcp_http_client

            http = await stack.enter_async_context(create_mcp_http_client(headers=dict(spec.headers)))
            read, write = await stack.enter_async_context(streamable_http_client(spec.url, http_client=http))
        client = await stack.enter_async_context(ClientSession(read, write, message_handler=on_message))
        await client.initialize()
        yield client


def _leaf(exc: BaseException) -> BaseException:
    """The first real error inside the task groups' exception groups."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def _result_value(result: Any) -> Any:
    text = "\n".join(getattr(c, "text", "") for c in result.content if getattr(c, "type", "") == "text")
    if result.is_error:
        raise McpToolError(text or "the server reported an error")
    return result.structured_content if result.structured_content is not None else text


def make_tool(spec: ServerSpec, listed: Any, changed: Callable[[], None] | None = None) -> Tool:
    """A Tool that calls ``listed`` (an MCP tool description) on the server ``spec`` names."""
    remote = listed.name
    schema = dict(listed.input_schema or {"type": "object"})
    args_model = type(f"{spec.name}.{remote}.args", (_McpArgs,), {"input_schema": schema})

    async def call(args: _McpArgs, ctx: ToolContext) -> Any:
        try:
            async with session(spec, changed) as client:
                # servers that de-duplicate take the key from _meta; the others ignore it
                result = await client.call_tool(remote, args.root, meta={"idempotency_key": ctx.idempotency_key})
        except Exception as exc:  # down, refused, crashed: one compact line, like any tool failure
            leaf = _leaf(exc)
            raise ConnectionError(f"MCP server {spec.name!r}: {type(leaf).__name__}: {redact(str(leaf))}") from None
        return _result_value(result)

    return Tool(name=f"{spec.name}.{remote}", description=listed.description or "", args_model=args_model, fn=call)


class McpServers:
    """The MCP servers of one agent: their tools are added to the agent's (a dict shared with its LLM step)."""

    def __init__(self, agent: str, specs: list[ServerSpec], tools: dict[str, Tool]) -> None:
        self.agent, self.specs, self.tools = agent, specs, tools
        self.listed: dict[str, float] = {}  # server -> when its tools were listed (monotonic)
        self.tried: dict[str, float] = {}
        self.lock = asyncio.Lock()

    def changed(self, server: str) -> Callable[[], None]:
        """What a session calls when ``server`` says its tool list changed: list it again before the next step."""
        def forget() -> None:
            self.listed.pop(server, None)
            self.tried.pop(server, None)  # at once, not after the wait for a server that could not be reached

        return forget

    def _due(self, spec: ServerSpec, now: float) -> bool:
        if spec.name in self.listed:
            return now - self.listed[spec.name] >= REFRESH_EVERY
        return now - self.tried.get(spec.name, -RETRY_EVERY) >= RETRY_EVERY

    async def prepare(self) -> None:
        """List the tools of every server not listed yet, or whose list changed or is old (a server that cannot be
        reached is tried again later; a server listed before keeps its tools meanwhile)."""
        async with self.lock:
            for spec in self.specs:
                if not self._due(spec, time.monotonic()):
                    continue
                self.tried[spec.name] = time.monotonic()
                changed = self.changed(spec.name)
                try:
                    async with asyncio.timeout(spec.timeout):
                        async with session(spec, changed) as client:
                            listed = (await client.list_tools()).tools
                except Exception as exc:
                    log.warning("agent %s: MCP server %r cannot be reached (%s); its tools are missing until it "
                                "can", self.agent, spec.name, redact(str(_leaf(exc))))  # fmt: skip
                    continue
                fresh = {tool.name: tool for tool in (make_tool(spec, item, changed) for item in listed)}
                for gone in [n for n in self.tools if n.startswith(f"{spec.name}.") and n not in fresh]:
                    del self.tools[gone]  # withdrawn by the server: the model is no longer offered it
                self.tools.update(fresh)
                self.listed[spec.name] = time.monotonic()
                log.info("agent %s: MCP server %r lends %d tools", self.agent, spec.name, len(listed))
