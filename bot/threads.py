"""Threads: an append-only event log per thread, and everything about it derived from that log."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum

import redis.asyncio as aioredis

from bot import codec
from bot.errors import NotFound
from bot.events import (
    ApprovalDecided,
    ApprovalRequested,
    ChannelRef,
    Event,
    ThreadLaunched,
    ToolCall,
    ToolResult,
    ToolStarted,
)
from bot.keys import Keys


class Status(StrEnum):
    RUNNING = "running"
    WAITING_APPROVAL = "waiting_approval"
    WAITING_HUMAN = "waiting_human"
    PAUSED = "paused"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


# How each event moves the status; events not listed leave it as it was.
_MOVES: dict[str, Status] = {
    "thread.launched": Status.RUNNING,
    "message.received": Status.RUNNING,
    "human.answered": Status.RUNNING,
    "approval.decided": Status.RUNNING,
    "tool.call": Status.RUNNING,
    "tool.result": Status.RUNNING,
    "error": Status.RUNNING,
    "approval.requested": Status.WAITING_APPROVAL,
    "human.asked": Status.WAITING_HUMAN,
    "reply": Status.DONE,
    "thread.failed": Status.FAILED,
}


@dataclass
class Thread:
    """A thread's log and what follows from it. Nothing here is stored apart from the events."""

    id: str
    events: list[Event] = field(default_factory=list)
    last_id: str = "0-0"  # stream id of the log's last entry, so a commit can check nothing came between

    @property
    def launched(self) -> ThreadLaunched | None:
        first = self.events[0] if self.events else None
        return first if isinstance(first, ThreadLaunched) else None

    @property
    def agent(self) -> str:
        return self.launched.agent if self.launched else ""

    @property
    def origin(self) -> ChannelRef | None:
        return self.launched.ref if self.launched else None

    @property
    def status(self) -> Status:
        return derive_status(self.events)

    def has_key(self, key: str) -> bool:
        return bool(key) and any(e.key == key for e in self.events)

    def open_approval(self) -> ApprovalRequested | None:
        """The approval request still waiting for a decision, if any."""
        decided = {e.approval_id for e in self.events if isinstance(e, ApprovalDecided)}
        for e in reversed(self.events):
            if isinstance(e, ApprovalRequested) and e.approval_id not in decided:
                return e
        return None

    def call(self, call_id: str) -> ToolCall | None:
        return next((e for e in self.events if isinstance(e, ToolCall) and e.call_id == call_id), None)

    def result(self, call_id: str) -> ToolResult | None:
        return next((e for e in self.events if isinstance(e, ToolResult) and e.call_id == call_id), None)

    def started(self, call_id: str) -> ToolStarted | None:
        return next((e for e in self.events if isinstance(e, ToolStarted) and e.call_id == call_id), None)


def derive_status(events: Sequence[Event]) -> Status:
    status, paused = Status.RUNNING, False
    for e in events:
        if e.type == "thread.cancelled":
            return Status.CANCELLED
        if e.type == "thread.paused":
            paused = True
        elif e.type == "thread.resumed":
            paused = False
            if status is Status.FAILED:
                status = Status.RUNNING  # resuming a failed thread gives it another go
        elif e.type in ("message.received", "human.answered") and status is Status.WAITING_APPROVAL:
            continue  # a message while an approval is open is context, not a decision
        else:
            status = _MOVES.get(e.type, status)
    return Status.PAUSED if paused else status


async def load(redis: aioredis.Redis, keys: Keys, thread_id: str) -> Thread:
    rows = await redis.xrange(keys.log(thread_id))
    last = rows[-1][0].decode() if rows else "0-0"
    return Thread(thread_id, [codec.decode(f[b"e"], thread_id) for _, f in rows], last)


async def agent_of(redis: aioredis.Redis, keys: Keys, thread_id: str) -> str | None:
    """The agent a thread was launched for, from its first event alone; None for a thread with no log."""
    return (await agents_of(redis, keys, [thread_id]))[0]


async def agents_of(redis: aioredis.Redis, keys: Keys, thread_ids: Sequence[str]) -> list[str | None]:
    """``agent_of`` for many threads, in one round trip."""
    pipe = redis.pipeline(transaction=False)
    for tid in thread_ids:
        pipe.xrange(keys.log(tid), count=1)
    out: list[str | None] = []
    for tid, rows in zip(thread_ids, await pipe.execute(), strict=True):
        first = codec.decode(rows[0][1][b"e"], tid) if rows else None
        out.append(first.agent if isinstance(first, ThreadLaunched) else None)
    return out


async def get(redis: aioredis.Redis, keys: Keys, thread_id: str) -> Thread:
    thread = await load(redis, keys, thread_id)
    if not thread.events:
        raise NotFound(f"no thread {thread_id!r} (see 'handrail threads list')")
    return thread


async def recent_ids(redis: aioredis.Redis, keys: Keys, limit: int = 50) -> list[str]:
    """Thread ids, most recently active first."""
    return [i.decode() for i in await redis.zrevrange(keys.threads, 0, limit - 1)]
