"""A local fake of Slack's Web API (the client's base_url): records every call, answers like Slack, and fails on
request (429 with Retry-After, 5xx, an error code such as channel_not_found given as the "error" header of a
failure, or no answer in time) so delivery retries can be tested."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float  # time.monotonic() when it arrived
    status: int = 200


@dataclass
class FakeSlack:
    bot_user: str = "UBOT"
    team: str = "T1"
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)  # method -> answers first
    envelopes: list[dict[str, Any]] = field(default_factory=list)  # Socket Mode: sent to each connecting client
    acks: list[dict[str, Any]] = field(default_factory=list)  # Socket Mode: what clients sent back
    on_ack: Callable[[], Awaitable[Any]] | None = None  # Socket Mode: looks at the world as each ack arrives
    seen_at_ack: list[Any] = field(default_factory=list)
    acked: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None
    _port: int = 0
    _ts: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._port}/api/"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/api/{method}", self._handle)
        app.router.add_get("/link", self._socket)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self._port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def socket_url(self) -> str:
        return f"ws://127.0.0.1:{self._port}/link"

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        """Slack's Socket Mode endpoint: hello, then the queued envelopes; records the acknowledgements."""
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "fake"}})
        for envelope in self.envelopes:
            await ws.send_json(envelope)
        async for message in ws:
            if message.type == web.WSMsgType.TEXT:
                self.acks.append(json.loads(message.data))
                if self.on_ack is not None:
                    self.seen_at_ack.append(await self.on_ack())
                self.acked.set()
        return ws

    def made(self, method: str, ok_only: bool = True) -> list[Call]:
        return [c for c in self.calls if c.method == method and (c.status == 200 or not ok_only)]

    async def _handle(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        if isinstance(params.get("blocks"), str):
            params["blocks"] = json.loads(params["blocks"])
        call = Call(method, params, time.monotonic())
        self.calls.append(call)
        if self.failures.get(method):
            call.status, headers = self.failures[method].pop(0)
            if call.status == 0:  # no answer in time: hang, then give up without having done anything
                await asyncio.sleep(float(headers.get("hang", "5")))
                return web.json_response({"ok": False, "error": "timeout"}, status=504)
            headers = dict(headers)
            error = headers.pop("error", "ratelimited" if call.status == 429 else "internal_error")
            return web.json_response({"ok": False, "error": error}, status=call.status, headers=headers)
        if not request.headers.get("Authorization", "").startswith(("Bearer xoxb-", "Bearer xapp-")):
            return web.json_response({"ok": False, "error": "not_authed"})
        return web.json_response(self._answer(method, params))

    def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "handrail",
                    "team_id": self.team, "user_id": self.bot_user, "bot_id": "BBOT"}  # fmt: skip
        if method == "chat.postMessage":
            self._ts += 1
            return {"ok": True, "channel": params.get("channel"), "ts": f"1700000500.{self._ts:06d}"}
        if method == "chat.update":
            return {"ok": True, "channel": params.get("channel"), "ts": params.get("ts")}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": "1700000900.000001"}
        if method == "views.open":
            return {"ok": True, "view": {"id": "V1"}}
        if method == "apps.connections.open":
            return {"ok": True, "url": self.socket_url}
        return {"ok": False, "error": "unknown_method"}
