"""The web process, assembled: REST API, signed inbound webhooks, Slack and email links (when configured), health.
Wiring layer, like bot/cli.py.

The routes live with their channels; this module only knows which ones exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from bot.keys import INBOUND_GROUP
from bot.runtime import Deps

MAX_BODY = 256 * 1024  # bytes; larger request bodies get 413


class BodyLimit:
    """Refuse request bodies over ``limit`` bytes with 413, whether or not they declare a length."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await _too_large(self.limit)(scope, receive, send)
            return
        seen = 0

        async def limited() -> Any:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _too_large(self.limit)(scope, receive, send)


class _TooLarge(Exception):
    pass


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)


def create_app(deps: Deps) -> FastAPI:
    """The ASGI app over already-opened dependencies (the caller owns their lifetime)."""
    from channels import api, webhooks

    app = FastAPI(
        title="Handrail",
        version="1",
        docs_url="/api/v1/docs",
        openapi_url="/api/v1/openapi.json",
        redoc_url=None,
    )
    app.state.deps = deps
    app.include_router(api.router(deps))
    app.include_router(webhooks.trigger_router(deps))
    from channels.slack.settings import SlackSettings

    slack = SlackSettings.from_env()
    if slack is not None:  # POST /slack/events only where Slack is configured
        from channels.slack.app import router as slack_router

        app.include_router(slack_router(deps, slack))
    from channels.email.settings import EmailSettings

    email = EmailSettings.from_env()
    if email is not None:  # the confirm pages of decision links, only where email is configured
        from channels.email.links import router as email_router

        app.include_router(email_router(deps, email))

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        """Liveness: the process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: Redis answers and every inbound partition has its consumer group."""
        try:
            await deps.redis.ping()
            missing = []
            for p in range(deps.keys.partitions):
                groups = await deps.redis.xinfo_groups(deps.keys.inbound(p))
                if not any(g["name"].decode() == INBOUND_GROUP for g in groups):
                    missing.append(p)
        except RedisError as exc:
            return JSONResponse({"ready": False, "reason": f"redis: {exc}"}, status_code=503)
        if missing:
            return JSONResponse({"ready": False, "reason": f"no consumer group on partitions {missing}"}, 503)
        return JSONResponse({"ready": True})

    app.add_middleware(BodyLimit)
    return app


async def serve(deps: Deps, stop: asyncio.Event, host: str = "127.0.0.1", port: int = 8000,
                sock: socket.socket | None = None) -> None:  # fmt: skip
    """Run the web app under uvicorn until ``stop`` is set (on ``sock`` if given, e.g. one bound to port 0)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(create_app(deps), host=host, port=port, log_level="warning", lifespan="off"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # the CLI owns signals
    task = asyncio.create_task(server.serve(sockets=[sock] if sock else None))
    await stop.wait()
    server.should_exit = True
    await task
