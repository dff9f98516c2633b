"""The web process, assembled: the routes of every registered channel (the REST API, signed inbound webhooks, Slack
and email links when configured), and health. Wiring layer, like bot/cli.py: it names no channel.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import Any

from fastapi import FastAPI, HTTPException, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.responses import HTMLResponse, JSONResponse, Response
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Receive, Scope, Send

from bot import channel
from bot.errors import SettingsMismatch
from bot.runtime import Deps, check_installation

log = logging.getLogger(__name__)

METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
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
                    # an HTTPException passes through FastAPI's body parsing (any other error there is a 400)
                    raise HTTPException(413, f"request body over {self.limit} bytes")
            return message

        await self.app(scope, limited, send)


def _too_large(limit: int) -> JSONResponse:
    return JSONResponse({"detail": f"request body over {limit} bytes"}, status_code=413)


def _unavailable(body: dict[str, Any]) -> JSONResponse:
    return JSONResponse(body, status_code=503, headers={"Retry-After": "1"})


def create_app(deps: Deps) -> FastAPI:
    """The ASGI app over already-opened dependencies (the caller owns their lifetime)."""
    app = FastAPI(
        title="Handrail",
        version="1",
        docs_url=None,  # served by _docs, from local files
        openapi_url="/api/v1/openapi.json",
        redoc_url=None,
    )
    _docs(app)
    app.state.deps = deps
    for router in channel.routes(deps):  # the REST API, inbound webhooks, Slack, email links: whatever is there
        app.include_router(router)  # its lifespan, if it has one, runs around serving (see serve)

    @app.get("/healthz", tags=["health"])
    async def healthz() -> dict[str, bool]:
        """Liveness: the process answers."""
        return {"ok": True}

    @app.get("/readyz", tags=["health"])
    async def readyz(request: Request) -> JSONResponse:
        """Readiness: Redis answers and holds the same settings as this process (recorded again if Redis came
        back empty)."""
        try:
            await check_installation(deps)
        except RedisError as exc:
            return _unavailable({"ready": False, "reason": f"redis: {exc}"})
        except SettingsMismatch as exc:
            return _unavailable({"ready": False, "reason": str(exc)})
        return JSONResponse({"ready": True})

    async def redis_down(request: Request, exc: Exception) -> JSONResponse:
        # Redis stopped, frozen or refusing: a short, retryable answer instead of a 500 (the cause is logged)
        log.warning("%s %s: Redis error: %s", request.method, request.url.path, exc)
        return _unavailable({"detail": "Redis is unavailable; try again shortly"})

    for outage in (RedisConnectionError, RedisTimeoutError):  # not every RedisError: a WRONGTYPE is our bug, a 500
        app.add_exception_handler(outage, redis_down)

    @app.exception_handler(SettingsMismatch)
    async def stale_settings(request: Request, exc: SettingsMismatch) -> JSONResponse:
        log.error("%s", exc)
        return _unavailable({"detail": "this server's settings differ from the installation's; try again shortly"})

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code == 405:  # Starlette's Allow names the methods of the first route on the path only
            allowed = [m for m in METHODS if any(r.matches({**request.scope, "method": m})[0] is Match.FULL
                                                 for r in app.router.routes)]  # fmt: skip
            exc.headers = {**(exc.headers or {}), "Allow": ", ".join(allowed)}
        return await http_exception_handler(request, exc)

    app.add_middleware(BodyLimit)
    return app


DOCS = "/api/v1/docs"


def _docs(app: FastAPI) -> None:
    """Swagger UI at /api/v1/docs from the files swagger-ui-bundle ships (FastAPI's self-hosting recipe), not
    from a CDN: the docs work offline and load no third-party script next to the API keys typed into them."""
    from fastapi.openapi.docs import get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
    from fastapi.staticfiles import StaticFiles
    from swagger_ui_bundle import swagger_ui_path

    app.mount(f"{DOCS}/static", StaticFiles(directory=swagger_ui_path), name="swagger-ui")

    @app.get(DOCS, include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url or "", title=f"{app.title} API",
            swagger_js_url=f"{DOCS}/static/swagger-ui-bundle.js", swagger_css_url=f"{DOCS}/static/swagger-ui.css",
            swagger_favicon_url=f"{DOCS}/static/favicon-32x32.png", oauth2_redirect_url=f"{DOCS}/oauth2-redirect",
        )  # fmt: skip

    @app.get(f"{DOCS}/oauth2-redirect", include_in_schema=False)
    async def oauth2_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()


async def serve(deps: Deps, stop: asyncio.Event, host: str = "127.0.0.1", port: int = 8000,
                sock: socket.socket | None = None) -> None:  # fmt: skip
    """Run the web app under uvicorn until ``stop`` is set (on ``sock`` if given, e.g. one bound to port 0)."""
    import uvicorn

    app = create_app(deps)
    # for routes that must know: long-lived responses (server-sent events) end when ``stop`` is set, and whether
    # the app is reachable from other machines (the console then asks for a login)
    app.state.stop, app.state.host = stop, sock.getsockname()[0] if sock else host
    # lifespan on: a channel's router may bring one (APIRouter(lifespan=...)), e.g. a mounted app's task group
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on"))
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]  # the CLI owns signals
    task = asyncio.create_task(server.serve(sockets=[sock] if sock else None))
    await stop.wait()
    server.should_exit = True
    await task
