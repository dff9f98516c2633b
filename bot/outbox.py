"""The outbox: what the runtime says to humans, one stream per channel kind, delivered at least once.

A channel adapter is the ``Deliver`` callable: it sends one message and returns a receipt (a Slack ts, a
Message-ID) which is kept so a later update can find the message.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Literal

import redis.asyncio as aioredis
from pydantic import BaseModel
from redis.exceptions import ResponseError

from bot.bus import Command
from bot.events import ChannelRef
from bot.keys import Keys

log = logging.getLogger(__name__)

OUTBOX_GROUP = "delivery"
LEASE_MS = 15_000  # how soon a dead deliverer's outbox moves to another process
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
OUTBOX_MAXLEN = 100_000


class Outbound(BaseModel):
    id: str  # the event it says; a channel can use it to deliver once
    thread_id: str
    ref: ChannelRef
    kind: Literal["text", "question", "approval_request", "approval_update", "error", "event"]
    text: str = ""
    approval: dict[str, Any] | None = None
    event: dict[str, Any] | None = None  # kind "event": a thread event for webhook subscribers


class Receipt(BaseModel):
    channel_id: str  # what the channel calls the message it sent


# A channel's delivery: send one message, return its receipt (None: not this consumer's to send; acked).
Deliver = Callable[[Outbound], Awaitable[Receipt | None]]


def outbox_command(keys: Keys, msg: Outbound, stream: str | None = None) -> Command:
    """Queue ``msg`` on its channel kind's outbox (or on ``stream``, a subscriber's own outbox)."""
    return (
        "XADD", keys.outbox(stream or msg.ref.kind), "MAXLEN", "~", OUTBOX_MAXLEN, "*", "m", msg.model_dump_json(),
    )  # fmt: skip


# Which thread events a webhook subscriber can ask for, by the name it asks with.
NOTIFICATIONS = {
    "approval.requested": "approval.requested",
    "approval.decided": "approval.decided",
    "reply": "thread.done",
    "thread.failed": "thread.failed",
}


# Channel kinds no process delivers to: API callers read the thread, or subscribe to webhooks.
UNDELIVERED = frozenset({"api"})


def webhook_stream(name: str) -> str:
    """Each subscriber has its own outbox, so a failing one delays no one else."""
    return f"webhook.{name}"


class OutboxConsumer:
    """Delivers one channel kind's outbox: retries with backoff, keeps receipts, dead-letters what never goes."""

    def __init__(
        self,
        redis: aioredis.Redis,
        keys: Keys,
        kind: str,
        deliver: Deliver,
        *,
        group: str = OUTBOX_GROUP,
        consumer: str = "c1",
        max_attempts: int = 8,
        base_delay: float = 0.2,
        start: str = "0",
        delete_delivered: bool = True,
        claim_idle_ms: int = 30_000,
    ) -> None:
        self.redis, self.keys, self.kind, self.deliver = redis, keys, kind, deliver
        self.group, self.consumer, self.max_attempts, self.base_delay = group, consumer, max_attempts, base_delay
        self.stream = keys.outbox(kind)
        self.start = start
        self.delete_delivered = delete_delivered  # False where other groups read the same stream
        self.claim_idle_ms = claim_idle_ms  # an entry pending this long belongs to a consumer presumed dead

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run_once(self, block_ms: int = 1000) -> int:
        """Deliver what is waiting (entries left by a dead consumer first); returns how many went out."""
        claimed = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=100
        )
        entries = list(claimed[1])  # Redis 7 adds a third element (deleted ids); 6.2 does not
        if not entries:
            got = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=100, block=block_ms)
            entries = [e for _, batch in got for e in batch]
        sent = 0
        for entry_id, fields in entries:
            if fields is None:  # deleted while pending
                await self.redis.xack(self.stream, self.group, entry_id)
                continue
            sent += await self._deliver_one(entry_id, Outbound.model_validate_json(fields[b"m"]))
        return sent

    async def _deliver_one(self, entry_id: bytes, msg: Outbound) -> int:
        for attempt in range(1, self.max_attempts + 1):
            try:
                receipt = await self.deliver(msg)
            except Exception as exc:  # a channel failure: retried, then dead-lettered, never dropped
                if attempt == self.max_attempts:
                    await self._dead_letter(entry_id, msg, exc)
                    return 0
                delay = getattr(exc, "retry_after", None) or self.base_delay * 2 ** (attempt - 1)
                log.warning("delivery of %s to %s failed (%s); retrying in %.1fs", msg.id, self.kind, exc, delay)
                await asyncio.sleep(min(float(delay), 60.0))
                continue
            pipe = self.redis.pipeline(transaction=True)
            if receipt is not None:
                # keyed by outbox too: the Slack message and a webhook about the same event have one event id
                pipe.hset(self.keys.receipts(msg.thread_id), f"{self.kind}:{msg.id}", receipt.channel_id)
            pipe.xack(self.stream, self.group, entry_id)
            if self.delete_delivered:
                pipe.xdel(self.stream, entry_id)
            await pipe.execute()
            return 0 if receipt is None else 1
        return 0

    async def _dead_letter(self, entry_id: bytes, msg: Outbound, exc: Exception) -> None:
        pipe = self.redis.pipeline(transaction=True)
        error = f"{type(exc).__name__}: {exc}"
        fields = {"stream": self.stream, "field": "m", "payload": msg.model_dump_json(), "error": error}
        pipe.xadd(self.keys.dlq, {**fields, "thread_id": msg.thread_id})
        pipe.xack(self.stream, self.group, entry_id)
        if self.delete_delivered:
            pipe.xdel(self.stream, entry_id)
        await pipe.execute()
        log.error("delivery of %s to %s dead-lettered: %s", msg.id, self.kind, exc)

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        while not stop.is_set():
            await self.run_once(block_ms=200)

    async def run_exclusive(self, stop: asyncio.Event, *, lease_ms: int = LEASE_MS) -> None:
        """Deliver until ``stop``, but only while this process holds the outbox's lease: one deliverer at a
        time keeps a channel's messages in order (a card update never overtakes its card), and a dead holder's
        outbox moves to another process within ``lease_ms``."""
        me = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        lease = f"{self.stream}:lease"
        while not stop.is_set():
            try:
                if await self.redis.set(lease, me, nx=True, px=lease_ms):
                    await self._lead(lease, me, stop, lease_ms)
            except Exception:  # a Redis hiccup or a delivery bug: log, breathe, go on; what was read stays pending
                log.exception("delivery of %s stopped; trying again", self.stream)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), lease_ms / 3000)

    async def _lead(self, lease: str, me: str, stop: asyncio.Event, lease_ms: int) -> None:
        await self.ensure_group()

        async def pump() -> None:
            while True:
                await self.run_once(block_ms=200)

        # stop is watched beside the pump: a delivery waiting out a backoff must not hold up shutdown
        pumping, stopping = asyncio.create_task(pump()), asyncio.create_task(stop.wait())
        try:
            while not stop.is_set():
                await asyncio.wait({pumping, stopping}, timeout=lease_ms / 3000, return_when=asyncio.FIRST_COMPLETED)
                if pumping.done():
                    pumping.result()  # its failure, to be logged
                if not stop.is_set() and not await self.redis.eval(_RENEW, 1, lease, me, lease_ms):
                    log.warning("delivery lease %s moved to another process", lease)
                    return
        finally:
            stopping.cancel()
            while not pumping.done():  # insist: redis-py can swallow a cancel that lands while it reconnects
                pumping.cancel()
                await asyncio.wait({pumping}, timeout=0.5)
            await asyncio.gather(pumping, stopping, return_exceptions=True)  # a cut-off delivery stays pending
            await self.redis.eval(_RELEASE, 1, lease, me)

    async def close(self) -> None:
        """Remove this consumer's group (for short-lived consumers such as a chat session)."""
        await self.redis.xgroup_destroy(self.stream, self.group)
