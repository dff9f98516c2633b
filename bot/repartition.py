"""Changing the partition count: with no worker running, move every inbound entry to its thread's new partition,
in order, then record the new count (see bot/install.py).

While it runs, the recorded settings say ``moving_to``: every script that publishes refuses, and no process
starts. An interrupted run is finished by running the same command again: each entry moves atomically (copy and
delete in one script), and the entries of a thread, all in one source stream, move in stream order.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace

import redis.asyncio as aioredis

from bot import codec, install
from bot.connections import server_time_ms
from bot.errors import HandrailError
from bot.keys import Keys

log = logging.getLogger(__name__)

BATCH = 200

# KEYS[1]: the source stream; KEYS[i + 1]: where entry ARGV[i] goes. An entry no longer there (this batch retried
# after a lost reply) is skipped, so nothing moves twice.
_MOVE = """
local moved = 0
for i = 1, #ARGV do
  local e = redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i])
  if #e > 0 then
    redis.call('XADD', KEYS[i + 1], '*', unpack(e[1][2]))
    redis.call('XDEL', KEYS[1], ARGV[i])
    moved = moved + 1
  end
end
return moved
"""

# An entry that cannot be read has no thread to follow: it goes to the dead-letter stream, as a worker would do.
# KEYS: source stream, dead-letter stream. ARGV: entry id, error.
_BURY = """
local e = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #e == 0 then return 0 end
local f = e[1][2]
local payload = ''
for i = 1, #f, 2 do if f[i] == 'e' then payload = f[i + 1] end end
redis.call('XADD', KEYS[2], '*', 'stream', KEYS[1], 'field', 'e', 'payload', payload, 'error', ARGV[2])
redis.call('XDEL', KEYS[1], ARGV[1])
return 1
"""


@dataclass(frozen=True)
class Repartitioned:
    old: int
    new: int
    moved: int = 0
    dead_lettered: list[str] = field(default_factory=list)  # "stream id" of unreadable entries


async def running_workers(redis: aioredis.Redis, keys: Keys, *, partitions: int, lease_ms: int) -> list[str]:
    """Who may still read or write an inbound partition: a held partition lease, or a recent worker heartbeat."""
    found = []
    for p in range(partitions):
        holder = await redis.get(keys.lease(p))
        if holder is not None:
            found.append(f"partition {p} is leased by {holder.decode(errors='replace')}")
    recent = await server_time_ms(redis) - 3 * lease_ms
    for member in await redis.zrangebyscore(keys.workers, recent, "+inf"):
        found.append(f"worker {member.decode(errors='replace')} sent a heartbeat")
    return found


async def repartition(redis: aioredis.Redis, ns: str, new: int, *, lease_ms: int) -> Repartitioned:
    """Move every inbound entry of namespace ``ns`` to its partition under ``new``, then record ``new``."""
    keys = Keys(ns, new)
    raw = await redis.get(keys.settings)
    recorded = install.Recorded.load(raw) if raw is not None else install.ours(keys)
    if recorded.encoding != codec.VERSION:
        raise install.mismatch(recorded, install.ours(keys)) or HandrailError("encoding version differs")
    if recorded.moving_to not in (None, new):
        raise HandrailError(
            f"a change of the partition count to {recorded.moving_to} was interrupted; finish it first with "
            f"'handrail repartition {recorded.moving_to}'"
        )
    streams = await _inbound_streams(redis, ns)
    old = recorded.partitions
    if old == new and recorded.moving_to is None and all(p < new for p in streams):
        return Repartitioned(old, new)
    busy = await running_workers(redis, keys, partitions=max(old, new, *streams, 0) + 1, lease_ms=lease_ms)
    if busy:
        raise HandrailError(
            f"workers are running ({'; '.join(busy[:5])}): stop every worker process, wait "
            f"{3 * lease_ms / 1000:g} s for their heartbeats to age, and run this again"
        )
    # From here on no script publishes and no process starts, until the new count is recorded.
    await redis.set(keys.settings, replace(recorded, moving_to=new).dump())
    done = Repartitioned(old, new)
    for p in sorted(streams):
        done = await _move_stream(redis, keys, keys.inbound(p), done)
        if p >= new and not await redis.xlen(keys.inbound(p)):
            await redis.delete(keys.inbound(p))
    await redis.set(keys.settings, install.ours(keys).dump())
    log.info("partitions: %d -> %d, %d entries moved", old, new, done.moved)
    return done


async def _inbound_streams(redis: aioredis.Redis, ns: str) -> list[int]:
    """The partition numbers of every inbound stream in Redis, whatever count made them."""
    pattern = re.compile(rf"^{re.escape(ns)}:in:(\d+)$")
    found = []
    async for key in redis.scan_iter(match=f"{ns}:in:*", count=1000):
        m = pattern.match(key.decode(errors="replace"))
        if m:
            found.append(int(m.group(1)))
    return found


async def _move_stream(redis: aioredis.Redis, keys: Keys, stream: str, done: Repartitioned) -> Repartitioned:
    move, bury = redis.register_script(_MOVE), redis.register_script(_BURY)
    moved, buried = done.moved, list(done.dead_lettered)
    start = "-"
    while True:
        rows = await redis.xrange(stream, min=start, count=BATCH)
        ids: list[bytes] = []
        targets: list[str] = []
        for entry_id, fields in rows:
            try:
                target = keys.inbound_for(codec.decode(fields[b"e"]).thread_id)
            except Exception as exc:  # unreadable: keep the order of what we have so far, then bury it
                moved += await move(keys=[stream, *targets], args=ids) if ids else 0
                ids, targets = [], []
                await bury(keys=[stream, keys.dlq], args=[entry_id, f"unreadable entry, found by repartition: {exc}"])
                buried.append(f"{stream} {entry_id.decode()}")
                continue
            if target != stream:
                ids.append(entry_id)
                targets.append(target)
        if ids:
            moved += await move(keys=[stream, *targets], args=ids)
        if len(rows) < BATCH:
            return replace(done, moved=moved, dead_lettered=buried)
        start = "(" + rows[-1][0].decode()
