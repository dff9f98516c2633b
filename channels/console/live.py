"""Live updates: a server-sent event stream per page that says "changed" when what the page shows changed.

Each stream polls one cheap fingerprint in Redis (a thread log's last entry, the pending approvals, the newest
threads, the dead letters); the page then fetches its fragment again. Polling keeps it simple and robust: no
connection is held in a blocking read, a stream that ends (server restart, proxy timeout) is reopened by the
browser, and the fingerprint it last saw (Last-Event-ID) makes sure nothing in between is missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator

from fastapi import HTTPException, Request
from fastapi.responses import StreamingResponse
from redis.exceptions import RedisError

from bot.runtime import Deps

POLL_S = 0.5  # how often a stream looks for a change
BEAT_S = 15.0  # a comment this often keeps proxies from closing an idle stream
LIFETIME_S = 300.0  # a stream ends after this long; the browser reopens it (and so finds a restarted server)


async def fingerprint(deps: Deps, watch: str) -> str:
    """What changes when the watched thing changes (an opaque string; equal means unchanged)."""
    r, keys = deps.redis, deps.keys
    if watch.startswith("thread:"):
        rows = await r.xrevrange(keys.log(watch.partition(":")[2]), count=1)
        return rows[0][0].decode() if rows else "-"
    if watch == "approvals":
        ids = await r.zrange(keys.pending_approvals, 0, 999)
        return f"{len(ids)}.{hashlib.sha256(b' '.join(ids)).hexdigest()[:16]}"
    if watch == "threads":
        top = await r.zrevrange(keys.threads, 0, 19, withscores=True)
        return hashlib.sha256(repr(top).encode()).hexdigest()[:16]
    if watch == "dlq":
        last = await r.xrevrange(keys.dlq, count=1)
        return f"{await r.xlen(keys.dlq)}.{last[0][0].decode() if last else '-'}"
    raise HTTPException(400, "watch one of: thread:<id>, approvals, threads, dlq")


async def stream(deps: Deps, request: Request, watch: str, since: str) -> StreamingResponse:
    """The event stream for ``watch``: ``changed`` at once if it differs from ``since``, then at each change."""
    first = await fingerprint(deps, watch)  # a bad ``watch`` is a 400 here, before the stream starts
    stop: asyncio.Event = getattr(request.app.state, "stop", None) or asyncio.Event()

    async def events() -> AsyncIterator[str]:
        loop = asyncio.get_running_loop()
        end, beat = loop.time() + LIFETIME_S, loop.time()
        last = since
        now = first
        yield "retry: 1000\n\n"
        while True:
            if now != last:
                last = now
                yield f"event: changed\nid: {now}\ndata: {now}\n\n"
                beat = loop.time()
            elif loop.time() - beat > BEAT_S:
                yield ": still here\n\n"
                beat = loop.time()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), POLL_S)
            if stop.is_set() or loop.time() > end or await request.is_disconnected():
                return
            try:
                now = await fingerprint(deps, watch)
            except RedisError:  # Redis away: end the stream; the browser tries again in a second
                return

    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no"}
    return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
