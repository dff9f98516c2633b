"""A local fake of Slack's Web API (the client's base_url): records every call, answers like Slack, and fails on
request (429 with Retry-After, 5xx, an error code such as channel_not_found given as the "error" header of a
failure, no answer in time, or -- status -1 -- a message posted whose answer comes too late) so delivery retries
can be tested. It keeps the messages posted (with their metadata) so conversations.history/replies find them."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web


def blocks_fit(blocks: Any) -> bool:
    """Block Kit's limits that Slack enforces on a message: 50 blocks, 3,000 characters a section, 10 fields of
    2,000 each."""
    if blocks is None:
        return True
    if len(blocks) > 50:
        return False
    for b in blocks:
        if len(((b.get("text") or {}).get("text")) or "") > 3000:
            return False
        fields = b.get("fields") or []
        if len(fields) > 10 or any(len(f.get("text", "")) > 2000 for f in fields):
            return False
    return True


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
    epoch: int = 1700000500  # the seconds of every ts it gives (set to time.time() where `oldest` matters)
    calls: list[Call] = field(default_factory=list)
    failures: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)  # method -> answers first
    envelopes: list[dict[str, Any]] = field(default_factory=list)  # Socket Mode: sent to each connecting client
    acks: list[dict[str, Any]] = field(default_factory=list)  # Socket Mode: what clients sent back
    on_ack: Callable[[], Awaitable[Any]] | None = None  # Socket Mode: looks at the world as each ack arrives
    seen_at_ack: list[Any] = field(default_factory=list)
    messages: list[dict[str, Any]] = field(default_factory=list)  # what is in the channels, oldest first
    users: dict[str, dict[str, Any]] = field(default_factory=dict)  # users.info answers by user id (else a member)
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
        app.router.add_get("/api/{method}", self._handle)
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
        if request.method == "GET":
            params: dict[str, Any] = dict(request.query)
        elif request.content_type == "application/json":
            params = await request.json()
        else:
            params = dict(await request.post())
        for name in ("blocks", "metadata"):
            if isinstance(params.get(name), str):
                params[name] = json.loads(params[name])
        call = Call(method, params, time.monotonic())
        self.calls.append(call)
        if self.failures.get(method):
            call.status, headers = self.failures[method].pop(0)
            if call.status == -1:  # done, but the answer comes after the client gave up
                answer = self._answer(method, params)
                await asyncio.sleep(float(headers.get("hang", "5")))
                return web.json_response(answer)
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
        if method in ("chat.postMessage", "chat.update") and not blocks_fit(params.get("blocks")):
            return {"ok": False, "error": "invalid_blocks"}
        if method == "auth.test":
            return {"ok": True, "url": "https://fake.slack.test/", "team": "Fake", "user": "handrail",
                    "team_id": self.team, "user_id": self.bot_user, "bot_id": "BBOT"}  # fmt: skip
        if method == "chat.postMessage":
            self._ts += 1
            ts = f"{self.epoch}.{self._ts:06d}"
            self.messages.append({"channel": params.get("channel"), "ts": ts, "thread_ts": params.get("thread_ts"),
                                  "text": params.get("text"), "blocks": params.get("blocks"),
                                  "metadata": params.get("metadata")})  # fmt: skip
            return {"ok": True, "channel": params.get("channel"), "ts": ts}
        if method == "chat.update":
            for m in self.messages:
                if (m["channel"], m["ts"]) == (params.get("channel"), params.get("ts")):
                    m.update(text=params.get("text"), blocks=params.get("blocks"))
            return {"ok": True, "channel": params.get("channel"), "ts": params.get("ts")}
        if method in ("conversations.history", "conversations.replies"):
            return {"ok": True, "messages": self._conversation(method, params), "has_more": False}
        if method == "users.info":
            user = {"id": params.get("user"), "team_id": self.team, "is_restricted": False,
                    "is_ultra_restricted": False} | self.users.get(str(params.get("user")), {})  # fmt: skip
            return {"ok": True, "user": user}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": "1700000900.000001"}
        if method == "views.open":
            return {"ok": True, "view": {"id": "V1"}}
        if method == "apps.connections.open":
            return {"ok": True, "url": self.socket_url}
        return {"ok": False, "error": "unknown_method"}

    def _conversation(self, method: str, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Newest first for a channel's history, oldest first for a thread's replies, as Slack answers."""
        oldest = float(params.get("oldest") or 0)
        found = [m for m in self.messages if m["channel"] == params.get("channel") and float(m["ts"]) >= oldest]
        if method == "conversations.replies":
            found = [m for m in found if params.get("ts") in (m["ts"], m["thread_ts"])]
        else:
            found = [m for m in reversed(found) if m["thread_ts"] in (None, m["ts"])]
        with_metadata = str(params.get("include_all_metadata")).lower() in ("1", "true")
        return [{"type": "message", "ts": m["ts"], "text": m["text"], "thread_ts": m["thread_ts"]}
                | ({"metadata": m["metadata"]} if with_metadata and m["metadata"] else {})
                for m in found]  # fmt: skip
