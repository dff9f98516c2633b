"""The MCP channel: Streamable HTTP under /mcp on the web process (a bearer API key required), and the stdio
server ``handrail mcp`` runs (as the local terminal user)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from fastapi import APIRouter
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.transport_security import TransportSecuritySettings
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from bot.channel import BaseChannel
from bot.runtime import Deps
from channels.api import Principal, authenticate, load_keys
from channels.mcp import server
from channels.mcp.server import KIND, Caller

PATH = "/mcp"


def _caller(principal: Principal) -> Caller:
    channels = frozenset(c for c in principal.channels if c != "api")
    return Caller(principal.identity, principal.scopes, principal.agents, channels)


class BearerOnly:
    """Refuse any request to the wrapped MCP endpoint without a valid API key (401), before the SDK sees it."""

    def __init__(self, app: ASGIApp, keys: list[tuple[bytes, Principal]]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers") or []}
        if authenticate(self.keys, headers.get("authorization")) is None:
            answer = JSONResponse({"detail": "missing or invalid API key"}, 401, {"WWW-Authenticate": "Bearer"})
            await answer(scope, receive, send)
            return
        await self.app(scope, receive, send)


def http_server(deps: Deps) -> MCPServer:
    """The MCP server for Streamable HTTP: each call acts as the API key its request carries."""
    keys = load_keys(deps)

    def identify(ctx: Context) -> Caller | None:
        headers = ctx.headers or {}
        principal = authenticate(keys, headers.get("authorization"))
        return _caller(principal) if principal is not None else None

    return server.build(deps, identify)


def stdio_server(deps: Deps, identity: str) -> MCPServer:
    """The MCP server for stdio: a local process, acting as the terminal user who started it."""
    who = Caller(identity, frozenset({"launch", "read"}))
    return server.build(deps, lambda ctx: who)


def router(deps: Deps) -> APIRouter:
    mcp = http_server(deps)
    # Stateless: any web replica answers any call (the requests live in Redis), and a reconnecting client needs
    # nothing but its request id. The SDK's Host/Origin allow-list for localhost is off: this endpoint serves
    # whatever name the web process is reached by, and a bearer key (which a rebound page cannot send) guards it.
    open_hosts = TransportSecuritySettings(enable_dns_rebinding_protection=False)
    mcp.streamable_http_app(streamable_http_path=PATH, stateless_http=True, transport_security=open_hosts)
    manager = mcp.session_manager

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[None]:
        async with manager.run():
            yield

    api = APIRouter(lifespan=lifespan)
    gate = BearerOnly(manager.handle_request, load_keys(deps))
    # an ASGI app as the endpoint (not a function): Starlette hands it the raw request, as the SDK needs
    api.add_route(PATH, gate, methods=["GET", "POST", "DELETE"], include_in_schema=False)  # type: ignore[arg-type]
    return api


class McpChannel(BaseChannel):
    """MCP clients ask humans through Handrail; they read answers from the tool result, so nothing is queued."""

    name = KIND
    delivers = False

    def routes(self, deps: Deps) -> Sequence[Any]:
        return [router(deps)]


channel = McpChannel()
