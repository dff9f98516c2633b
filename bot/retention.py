"""Retention: a finished thread is deleted some time after its last event (archived first, if asked), and dead
letters are purged on request. Nothing still going on is deleted, nor anything that moved while it was looked at.

A sweep pages through the threads index (score: last activity) up to a cutoff and reads each candidate's log once.
A thread it finds unfinished stays. Finishing is itself an event, and every event moves the thread's score to
the time of its commit, so an unfinished thread needs no second look until it moves: a cursor remembers how far
the sweeps got, and each sweep reads only the threads that went quiet since the one before.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from bot import codec
from bot.errors import HandrailError, LeaseLost, NotFound
from bot.events import ApprovalDecided, ApprovalRequested
from bot.keys import Keys
from bot.threads import Status, Thread

log = logging.getLogger(__name__)

DAY_MS = 86_400_000
FINISHED = frozenset({Status.DONE, Status.FAILED, Status.CANCELLED})
PAGE = 100  # threads read per round trip; a page's logs are in memory at once
LEASE_MS = 60_000  # a sweeper that dies frees the sweep this soon
# The cursor stays this far behind Redis's clock: commits are scored by the worker's clock, which may lag a little.
CURSOR_LAG_MS = 3_600_000

# Delete a thread only if its log still ends at the entry the sweep examined: an event committed since (a new
# message to a done thread) keeps it. KEYS: log, threads index, pending approvals, then every key to delete.
# ARGV: the examined last id, the thread id, then its approval ids.
_EXPIRE = """
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
local id = '0-0'
if #last > 0 then id = last[1][1] end
if id ~= ARGV[1] then return 0 end
redis.call('ZREM', KEYS[2], ARGV[2])
for i = 3, #ARGV do redis.call('ZREM', KEYS[3], ARGV[i]) end
for i = 4, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_STREAM_ID = re.compile(r"^\d+(-\d+)?$")


# -- what one read of a log decides (pure) ---------------------------------------------------------------------


def finished(thread: Thread) -> bool:
    """Done, failed or cancelled: nothing more happens unless someone writes to it again."""
    return bool(thread.events) and thread.status in FINISHED


def approval_ids(thread: Thread) -> list[str]:
    return [e.approval_id for e in thread.events if isinstance(e, ApprovalRequested)]


def settled_approvals(thread: Thread) -> list[str]:
    """Decided approvals only a late decider would still read: rejected, or approved and run. An approved call
    that has not run yet (its thread is paused) keeps its record: the executor's gate reads it."""
    call_of = {e.approval_id: e.call_id for e in thread.events if isinstance(e, ApprovalRequested)}
    return [
        e.approval_id
        for e in thread.events
        if isinstance(e, ApprovalDecided)
        and (not e.approved or thread.result(call_of.get(e.approval_id, e.approval_id)) is not None)
    ]


@dataclass(frozen=True)
class Finished:
    """A finished thread as the sweep read it, about to be archived and deleted."""

    thread: Thread
    last_activity: int  # ms, its score in the threads index

    def record(self) -> dict[str, Any]:
        """The archive's line: the thread with its events decoded (``bot.events.parse_event`` reads them back)."""
        return {
            "thread_id": self.thread.id,
            "agent": self.thread.agent,
            "status": str(self.thread.status),
            "last_activity": self.last_activity,
            "events": [e.model_dump(mode="json") for e in self.thread.events],
        }


Archive = Callable[[Sequence[Finished]], Awaitable[None]]  # must make the page durable before it returns


@dataclass
class Tally:
    examined: int = 0
    expired: int = 0
    kept: int = 0  # not finished
    moved: int = 0  # finished, but an event arrived (or waits on the inbound stream): kept

    def __str__(self) -> str:
        return (f"examined {self.examined} threads: {self.expired} deleted, {self.kept} still going on, "
                f"{self.moved} moved meanwhile (kept)")  # fmt: skip


# -- the lease: one sweep at a time ----------------------------------------------------------------------------


class Busy(HandrailError):
    """Another process is sweeping right now."""


@dataclass
class Lease:
    redis: aioredis.Redis
    key: str
    ms: int = LEASE_MS
    holder: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")

    async def acquire(self) -> bool:
        return bool(await self.redis.set(self.key, self.holder, nx=True, px=self.ms))

    async def renew(self) -> None:
        """Keep the lease for another ``ms``, or raise LeaseLost if it already expired and moved on."""
        if not await self.redis.eval(_RENEW, 1, self.key, self.holder, self.ms):
            raise LeaseLost(self.key)

    async def release(self) -> None:
        await self.redis.eval(_RELEASE, 1, self.key, self.holder)


@contextlib.asynccontextmanager
async def sweeping(redis: aioredis.Redis, keys: Keys, ms: int = LEASE_MS) -> AsyncIterator[Lease]:
    """Hold the sweep lease for the block; Busy if another process holds it."""
    lease = Lease(redis, keys.retention_lease, ms)
    if not await lease.acquire():
        held = await redis.get(keys.retention_lease)
        who = held.decode() if held else "another process"
        raise Busy(f"a retention sweep is already running ({who}); try again in a minute")
    try:
        yield lease
    finally:
        await lease.release()


async def redis_now(redis: aioredis.Redis) -> int:
    """Redis's clock in ms: the one every process agrees on."""
    sec, usec = await redis.time()
    return int(sec) * 1000 + int(usec) // 1000


# -- the sweep -----------------------------------------------------------------------------------------------


@dataclass
class Sweeper:
    redis: aioredis.Redis
    keys: Keys
    channel_suffixes: Sequence[str] = ()  # per-thread keys the channels keep (see Keys.thread_keys)
    page: int = PAGE

    def __post_init__(self) -> None:
        self._expire = self.redis.register_script(_EXPIRE)

    async def sweep(
        self,
        *,
        now_ms: int,
        older_than_ms: int,
        archive: Archive | None = None,
        lease: Lease | None = None,
        progress: Callable[[Tally], None] | None = None,
    ) -> Tally:
        """Delete (after ``archive``, if given) every thread finished and quiet since ``now_ms - older_than_ms``."""
        cutoff = now_ms - older_than_ms
        limit = min(cutoff, now_ms - CURSOR_LAG_MS)  # how far the cursor may go
        lo = int(await self.redis.get(self.keys.retention_cursor) or 0)
        seen: set[str] = set()  # threads at score ``lo`` already examined in this sweep
        hold = cutoff  # a thread kept for an entry still on the inbound stream must be looked at again
        tally = Tally()
        while True:
            if lease is not None:
                await lease.renew()
            rows = await self.redis.zrangebyscore(
                self.keys.threads, lo, f"({cutoff}", start=0, num=self.page + len(seen), withscores=True
            )
            page = [(m.decode(), int(s)) for m, s in rows if not (int(s) == lo and m.decode() in seen)][: self.page]
            if not page:
                break
            hold = min(hold, await self._page(page, archive, tally))
            top = page[-1][1]
            seen = (seen if top == lo else set()) | {tid for tid, score in page if score == top}
            lo = top
            await self._advance(min(lo, hold, limit))
            if progress is not None:
                progress(tally)
        await self._advance(min(cutoff, hold, limit))
        return tally

    async def _page(self, page: Sequence[tuple[str, int]], archive: Archive | None, tally: Tally) -> int:
        """Examine one page; returns the lowest score the cursor must not pass (or a large number)."""
        pipe = self.redis.pipeline(transaction=False)
        for tid, _ in page:
            pipe.xrange(self.keys.log(tid))
        done: list[Finished] = []
        settled: list[str] = []
        for (tid, score), rows in zip(page, await pipe.execute(), strict=True):
            tally.examined += 1
            try:
                events = [codec.decode(f[b"e"], tid) for _, f in rows]
            except Exception:  # a log this code cannot read is kept, and said once per sweep
                log.exception("retention: cannot read the log of thread %s; keeping it", tid)
                tally.kept += 1
                continue
            thread = Thread(tid, events, rows[-1][0].decode() if rows else "0-0")
            if not rows or finished(thread):  # an index entry without a log goes too
                done.append(Finished(thread, score))
            else:
                tally.kept += 1
                settled += settled_approvals(thread)
        hold = 1 << 62
        waiting = await self._awaited({f.thread.id for f in done if f.thread.events})
        if waiting:
            tally.moved += len(waiting)
            hold = min(f.last_activity for f in done if f.thread.id in waiting)
            done = [f for f in done if f.thread.id not in waiting]
        if archive is not None and done:
            await archive([f for f in done if f.thread.events])
        for f in done:
            if not f.thread.events:
                await self._delete(f.thread)  # a left-over index entry (or another sweep got there first)
            elif await self._delete(f.thread):
                tally.expired += 1
            else:
                tally.moved += 1  # it moved on, so its score is past the cutoff now
        if settled:
            await self.redis.delete(*(self.keys.approval(a) for a in settled))
        return hold

    async def _delete(self, thread: Thread) -> bool:
        approvals = approval_ids(thread)
        keys = [self.keys.log(thread.id), self.keys.threads, self.keys.pending_approvals,
                *self.keys.thread_keys(thread.id, self.channel_suffixes),
                *(self.keys.approval(a) for a in approvals)]  # fmt: skip
        return bool(await self._expire(keys=keys, args=[thread.last_id, thread.id, *approvals]))

    async def _awaited(self, thread_ids: set[str]) -> set[str]:
        """Which of these threads have an inbound entry not applied yet: a message on its way to a done thread
        must find the thread there."""
        found: set[str] = set()
        for p in sorted({self.keys.partition(t) for t in thread_ids}):
            start = "-"
            while True:
                rows = await self.redis.xrange(self.keys.inbound(p), min=start, count=500)
                for _, fields in rows:
                    tid = _thread_of(fields.get(b"e"))
                    if tid in thread_ids:
                        found.add(tid)
                if len(rows) < 500:
                    break
                start = "(" + rows[-1][0].decode()
        return found

    async def _advance(self, to: int) -> None:
        """Everything scored below ``to`` has been examined and is not finished; the cursor never goes back."""
        current = int(await self.redis.get(self.keys.retention_cursor) or 0)
        if to > current:
            await self.redis.set(self.keys.retention_cursor, to)


def _thread_of(blob: bytes | None) -> str | None:
    if blob is None:
        return None
    try:
        return codec.decode(blob).thread_id
    except Exception:  # a malformed entry is the worker's to dead-letter
        return None


async def run_sweeper(sweeper: Sweeper, stop: asyncio.Event, *, retention_days: int, every_s: int) -> None:
    """Sweep every ``every_s`` seconds in whichever process gets there first; the lease keeps it to one at a time
    and the due-marker to one per period, however many processes run this."""
    if retention_days <= 0:
        return  # kept forever
    redis, keys = sweeper.redis, sweeper.keys
    while not stop.is_set():
        try:
            if await redis.set(keys.retention_due, "1", nx=True, px=every_s * 1000):
                async with sweeping(redis, keys) as lease:
                    tally = await sweeper.sweep(
                        now_ms=await redis_now(redis), older_than_ms=retention_days * DAY_MS, lease=lease
                    )
                if tally.examined:
                    log.info("retention: %s", tally)
        except (Busy, LeaseLost) as exc:  # someone else is at it (an operator's archive run, say)
            log.info("retention: %s", exc)
        except Exception:  # a Redis hiccup: the next period tries again
            log.exception("retention sweep failed")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), min(every_s, 60))


# -- archiving to a file -------------------------------------------------------------------------------------


@dataclass
class JsonLinesArchive:
    """Appends each finished thread as one JSON line, flushed to disk before the sweep deletes it."""

    path: Path
    written: int = 0

    async def __call__(self, page: Sequence[Finished]) -> None:
        lines = "".join(json.dumps(f.record(), ensure_ascii=False, separators=(",", ":")) + "\n" for f in page)
        await asyncio.to_thread(self._append, lines)
        self.written += len(page)

    def _append(self, text: str) -> None:
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())


# -- dead letters --------------------------------------------------------------------------------------------


async def purge_dead_letters_before(redis: aioredis.Redis, keys: Keys, cutoff_ms: int) -> int:
    """Remove dead letters older than ``cutoff_ms`` (their stream ids are their times); returns how many."""
    return int(await redis.xtrim(keys.dlq, minid=str(cutoff_ms), approximate=False))


async def purge_dead_letters(redis: aioredis.Redis, keys: Keys, ids: Iterable[str]) -> int:
    """Remove the named dead letters; one unknown or malformed id removes none of them."""
    ids = list(dict.fromkeys(ids))
    pipe = redis.pipeline(transaction=False)
    for i in ids:
        if not _STREAM_ID.match(i):
            raise NotFound(f"{i!r} is not a dead-letter id (see 'handrail dlq list')")
        pipe.xrange(keys.dlq, min=i, max=i)
    missing = [i for i, rows in zip(ids, await pipe.execute(), strict=True) if not rows]
    if missing:
        raise NotFound(f"no dead letter {', '.join(missing)} (see 'handrail dlq list'); nothing purged")
    return int(await redis.xdel(keys.dlq, *ids)) if ids else 0
