"""The outbox: what the runtime says to humans, one stream per channel kind, delivered at least once.

A channel adapter is the ``Deliver`` callable: it sends one message and returns a receipt (a Slack ts, a
Message-ID) which is kept so a later update can find the message. It raises ``PermanentDeliveryError`` for a
message the channel will never take (dead-lettered at once) and anything else for a failure worth retrying.

A message that failed for now is set aside — onto its thread's queue, the queue scheduled in a sorted set by
next attempt — and the outbox moves on: later messages of that thread queue behind it (a card update never
overtakes its card), other threads' messages go out meanwhile. Each move between the stream, the aside queues
and the dead-letter stream is one atomic script, so a deliverer that dies at any point loses nothing.
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
from pydantic import BaseModel, ValidationError
from redis.exceptions import ResponseError

from bot.bus import Command
from bot.errors import PermanentDeliveryError
from bot.events import ChannelRef
from bot.keys import Keys
from bot.redact import redact

log = logging.getLogger(__name__)

OUTBOX_GROUP = "delivery"
LEASE_MS = 15_000  # how soon a dead deliverer's outbox moves to another process
MAX_BACKOFF = 60.0  # seconds: the longest wait between two attempts at one message
BATCH = 100
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# Broadcast outboxes are read by chat sessions, each in its own group, and never deleted from: a cap is all that
# bounds them. Delivery outboxes delete what they delivered, so their length is their backlog: never trimmed.
BROADCAST_MAXLEN = {"terminal": 100_000}

# Move a stream entry aside, behind its thread's queue (which it starts, scheduled at ARGV[5], if there is none).
# KEYS: stream, due (zset), the thread's queue (list), tries (hash); ARGV: group, entry id, element, thread,
# next attempt (ms), tries so far, delete from the stream (1/0). Only a pending entry moves, so a repeat is a no-op.
_SET_ASIDE = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1) == 0 then return 0 end
redis.call('RPUSH', KEYS[3], ARGV[3])
if not redis.call('ZSCORE', KEYS[2], ARGV[4]) then
  redis.call('ZADD', KEYS[2], ARGV[5], ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[6])
end
redis.call('XACK', KEYS[1], ARGV[1], ARGV[2])
if ARGV[7] == '1' then redis.call('XDEL', KEYS[1], ARGV[2]) end
return 1
"""

# The head of a thread's aside queue is done: delivered (receipt kept) or dead-lettered (ARGV[6] is the error);
# the next one in the queue is due at once. KEYS: due, queue, tries, receipts, dlq; ARGV: thread, element, now (ms),
# receipt field, receipt ('' for none), error ('' if delivered), stream, payload. Only that head moves (a repeat
# finds another head, or none, and does nothing).
_HEAD_DONE = """
if redis.call('LINDEX', KEYS[2], 0) ~= ARGV[2] then return 0 end
if ARGV[6] ~= '' then
  redis.call('XADD', KEYS[5], '*', 'stream', ARGV[7], 'field', 'm', 'payload', ARGV[8], 'error', ARGV[6],
             'thread_id', ARGV[1])
elseif ARGV[5] ~= '' then
  redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
end
redis.call('LPOP', KEYS[2])
if redis.call('LLEN', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  redis.call('HDEL', KEYS[3], ARGV[1])
else
  redis.call('ZADD', KEYS[1], ARGV[3], ARGV[1])
  redis.call('HSET', KEYS[3], ARGV[1], 0)
end
return 1
"""


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
    name = stream or msg.ref.kind
    cap = BROADCAST_MAXLEN.get(name)
    trim = ("MAXLEN", "~", cap) if cap else ()
    return ("XADD", keys.outbox(name), *trim, "*", "m", msg.model_dump_json())


def backoff(tries: int, base_delay: float, retry_after: float | None) -> float:
    """Seconds to wait before the next attempt after ``tries`` failed ones (the channel's Retry-After wins)."""
    if retry_after is not None:
        return max(0.0, float(retry_after))
    return min(base_delay * 2.0 ** (tries - 1), MAX_BACKOFF)


def _error(exc: BaseException) -> str:
    """A delivery failure as logged and dead-lettered: credentials redacted (HTTP clients name the URL they called,
    tokens and all)."""
    return redact(f"{type(exc).__name__}: {exc}")


def _malformed(exc: ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"])
    return f"malformed outbox entry: {where + ': ' if where else ''}{first['msg']}"


class OutboxConsumer:
    """Delivers one channel kind's outbox: sets failures aside to retry later, keeps receipts, dead-letters
    what never goes."""

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
        self.due = f"{self.stream}:aside:{group}"  # zset: thread -> when its queue's head is tried next (ms)
        self.tries = f"{self.due}:tries"  # hash: thread -> failed attempts at its queue's head

    def queue(self, thread_id: str) -> str:
        """A thread's messages set aside, oldest (the one being retried) first."""
        return f"{self.due}:q:{thread_id}"

    async def ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, self.group, id=self.start, mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def run_once(self, block_ms: int = 1000) -> int:
        """Retry what is due, then deliver what is waiting (entries left by a dead consumer first); returns how
        many went out. A vanished group (Redis restarted empty) is re-created."""
        try:
            return await self._pump(block_ms)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("outbox %s lost its consumer group %s (Redis restarted empty?); re-creating it",
                        self.stream, self.group)  # fmt: skip
            await self.ensure_group()
            return 0

    async def _pump(self, block_ms: int) -> int:
        sent, wait_ms = await self._retry_due(block_ms)
        claimed = await self.redis.xautoclaim(
            self.stream, self.group, self.consumer, min_idle_time=self.claim_idle_ms, start_id="0-0", count=BATCH
        )
        entries = list(claimed[1])  # Redis 7 adds a third element (deleted ids); 6.2 does not
        if not entries:
            block = wait_ms if wait_ms > 0 else None  # None: answer at once (0 would block for ever)
            got = await self.redis.xreadgroup(self.group, self.consumer, {self.stream: ">"}, count=BATCH, block=block)
            entries = [e for _, batch in got for e in batch]
        for entry_id, fields in entries:
            sent += await self._take(entry_id, fields)
        return sent

    # -- entries fresh from the stream --------------------------------------------------------------------------

    async def _take(self, entry_id: bytes, fields: dict[bytes, bytes] | None) -> int:
        if fields is None:  # deleted while pending
            await self.redis.xack(self.stream, self.group, entry_id)
            return 0
        payload = fields.get(b"m", b"")
        try:
            msg = Outbound.model_validate_json(payload)
        except ValidationError as exc:  # a hand-written entry, or a kind from a newer version: never wedge on it
            await self._dead_letter(entry_id, payload, "", _malformed(exc))
            return 0
        if await self.redis.zscore(self.due, msg.thread_id) is not None:
            await self._set_aside(entry_id, payload, msg.thread_id, tries=0, delay=0.0)  # behind its thread's
            return 0
        try:
            receipt = await self.deliver(msg)
        except PermanentDeliveryError as exc:
            await self._dead_letter(entry_id, payload, msg.thread_id, _error(exc))
            return 0
        except Exception as exc:  # a channel failure: set aside and tried again later, never dropped
            if self.max_attempts <= 1:
                await self._dead_letter(entry_id, payload, msg.thread_id, _error(exc))
                return 0
            delay = backoff(1, self.base_delay, getattr(exc, "retry_after", None))
            log.warning("delivery of %s to %s failed (%s); retrying in %.1fs", msg.id, self.kind, _error(exc), delay)
            await self._set_aside(entry_id, payload, msg.thread_id, tries=1, delay=delay)
            return 0
        pipe = self.redis.pipeline(transaction=True)
        if receipt is not None:
            # keyed by outbox too: the Slack message and a webhook about the same event have one event id
            pipe.hset(self.keys.receipts(msg.thread_id), f"{self.kind}:{msg.id}", receipt.channel_id)
        pipe.xack(self.stream, self.group, entry_id)
        if self.delete_delivered:
            pipe.xdel(self.stream, entry_id)
        await pipe.execute()
        return 0 if receipt is None else 1

    async def _set_aside(self, entry_id: bytes, payload: bytes, thread_id: str, *, tries: int, delay: float) -> None:
        at = await self._now_ms() + int(delay * 1000)
        element = entry_id + b"\n" + payload
        await self.redis.eval(
            _SET_ASIDE, 4, self.stream, self.due, self.queue(thread_id), self.tries,
            self.group, entry_id, element, thread_id, at, tries, int(self.delete_delivered),
        )  # fmt: skip

    async def _dead_letter(self, entry_id: bytes, payload: bytes, thread_id: str, error: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        fields = {"stream": self.stream, "field": "m", "payload": payload, "error": error}
        pipe.xadd(self.keys.dlq, {**fields, "thread_id": thread_id})
        pipe.xack(self.stream, self.group, entry_id)
        if self.delete_delivered:
            pipe.xdel(self.stream, entry_id)
        await pipe.execute()
        log.error("delivery of outbox entry %s on %s dead-lettered: %s", entry_id.decode(), self.stream, error)

    # -- threads waiting aside -----------------------------------------------------------------------------------

    async def _retry_due(self, block_ms: int) -> tuple[int, int]:
        """Try the head of every thread queue that is due; returns how many went out and how long the stream
        may be waited on before the next one is due (ms)."""
        first = await self.redis.zrange(self.due, 0, 0, withscores=True)
        if not first:
            return 0, block_ms
        now = await self._now_ms()
        sent = 0
        if first[0][1] <= now:
            for thread in await self.redis.zrangebyscore(self.due, "-inf", now, start=0, num=BATCH):
                sent += await self._drain(thread.decode(), now)
            return sent, 0
        return 0, min(block_ms, int(first[0][1] - now))

    async def _drain(self, thread_id: str, now: int) -> int:
        """Deliver a thread's aside queue from its head until one fails for now (it is rescheduled)."""
        sent = 0
        for _ in range(BATCH):  # a long queue yields to the other threads, then goes on next round
            element = await self.redis.lindex(self.queue(thread_id), 0)
            if element is None:  # nothing left (a deliverer that died between the two steps of a move cannot)
                await self.redis.zrem(self.due, thread_id)
                return sent
            entry_id, _, payload = element.partition(b"\n")
            try:
                msg = Outbound.model_validate_json(payload)
                receipt = await self.deliver(msg)
            except PermanentDeliveryError as exc:
                await self._head_done(thread_id, element, now, error=_error(exc))
                continue
            except ValidationError as exc:  # set aside by another version: dead-lettered, not retried
                await self._head_done(thread_id, element, now, error=_malformed(exc))
                continue
            except Exception as exc:
                tries = int(await self.redis.hget(self.tries, thread_id) or 0) + 1
                if tries >= self.max_attempts:
                    await self._head_done(thread_id, element, now, error=_error(exc))
                    continue
                delay = backoff(tries, self.base_delay, getattr(exc, "retry_after", None))
                log.warning("delivery of %s to %s failed %d times (%s); retrying in %.1fs",
                            entry_id.decode(), self.kind, tries, _error(exc), delay)  # fmt: skip
                pipe = self.redis.pipeline(transaction=True)
                pipe.zadd(self.due, {thread_id: now + int(delay * 1000)}, xx=True)
                pipe.hset(self.tries, thread_id, tries)
                await pipe.execute()
                return sent
            receipt_field = f"{self.kind}:{msg.id}" if receipt is not None else ""
            await self._head_done(thread_id, element, now, receipt=receipt, field=receipt_field)
            sent += receipt is not None
        return sent

    async def _head_done(
        self, thread_id: str, element: bytes, now: int, *, error: str = "", receipt: Receipt | None = None,
        field: str = "",
    ) -> None:  # fmt: skip
        payload = element.partition(b"\n")[2]
        await self.redis.eval(
            _HEAD_DONE, 5, self.due, self.queue(thread_id), self.tries, self.keys.receipts(thread_id), self.keys.dlq,
            thread_id, element, now, field, receipt.channel_id if receipt else "", error, self.stream, payload,
        )  # fmt: skip
        if error:
            log.error("delivery of outbox entry %s on %s dead-lettered: %s",
                      element.partition(b"\n")[0].decode(), self.stream, error)  # fmt: skip

    async def _now_ms(self) -> int:
        """Redis's clock: the next lease holder may run on another machine."""
        seconds, micros = await self.redis.time()
        return int(seconds) * 1000 + int(micros) // 1000

    async def waiting(self) -> int:
        """How many messages are set aside, waiting for another attempt."""
        total = 0
        for thread in await self.redis.zrange(self.due, 0, -1):
            total += await self.redis.llen(self.queue(thread.decode()))
        return total

    # -- running ---------------------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        await self.ensure_group()
        while not stop.is_set():
            await self.run_once(block_ms=200)

    async def run_exclusive(self, stop: asyncio.Event, *, lease_ms: int = LEASE_MS) -> None:
        """Deliver until ``stop``, but only while this process holds the outbox's lease: one deliverer at a
        time keeps a thread's messages in order (a card update never overtakes its card), and a dead holder's
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

        # stop is watched beside the pump: a delivery hanging on a slow channel must not hold up shutdown
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
