"""The inbound bus: publish with de-duplication, the dead-letter stream, and the fenced commit primitive."""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot import codec, install
from bot.errors import LeaseLost, LogConflict, NotFound
from bot.events import Event
from bot.keys import Keys

SEEN_TTL = 7 * 24 * 3600  # a repeat of an inbound event within a week is recognised at the door

# Accept events once, all of a call's events or none: if any event's idempotency key was seen, the call is a
# repeat and publishes nothing. A seen key holds "<nonce> <entry id>", so the same call retried by the client after
# a lost reply (same nonce) answers the entry ids of its first run instead of "repeat".
# KEYS: the stream, the recorded settings, then one seen-key per event.
# ARGV: ttl, nonce, recorded settings, then (payload, key) per event; key '' skips the check (and the retry guard).
_PUBLISH = (
    install.CHECK_LUA.format(key=2, arg=3)
    + """
local n = #KEYS - 2
local earlier, retried = {}, false
for i = 1, n do
  if ARGV[2 * i + 3] ~= '' then
    local seen = redis.call('GET', KEYS[i + 2])
    if seen then
      local nonce, id = string.match(seen, '^(%S+) (%S+)$')
      if nonce ~= ARGV[2] then return false end
      earlier[i], retried = id, true
    end
  end
end
local out = {}
for i = 1, n do
  if retried then
    out[i] = earlier[i] or false
  else
    out[i] = redis.call('XADD', KEYS[1], '*', 'e', ARGV[2 * i + 2])
    if ARGV[2 * i + 3] ~= '' then
      redis.call('SET', KEYS[i + 2], ARGV[2] .. ' ' .. out[i], 'EX', ARGV[1])
    end
  end
end
return out
"""
)

# Run a batch of commands only while the caller still holds its partition lease (the fencing check) and,
# when KEYS[2] names a thread log, only if that log still ends where the caller last saw it: a commit that
# Redis applied but whose reply was lost cannot be applied twice by the client's retry.
# ARGV: token, expected last log id, then for each command its argument count followed by its arguments.
_FENCED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('LEASELOST') end
if KEYS[2] ~= '' then
  local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
  local id = '0-0'
  if #last > 0 then id = last[1][1] end
  if id ~= ARGV[2] then return redis.error_reply('CONFLICT log ends at ' .. id .. ', not ' .. ARGV[2]) end
end
local i, out = 3, {}
while i <= #ARGV do
  local n = tonumber(ARGV[i])
  out[#out + 1] = redis.call(unpack(ARGV, i + 1, i + n))
  i = i + n + 1
end
return out
"""

_STREAM_ID = re.compile(r"^\d+(-\d+)?$")

Command = Sequence[str | bytes | int | float]


@dataclass
class Bus:
    redis: aioredis.Redis
    keys: Keys

    def __post_init__(self) -> None:
        self._publish = self.redis.register_script(_PUBLISH)
        self._fenced = self.redis.register_script(_FENCED)

    async def publish(self, event: Event, *, dedupe: bool = True) -> str | None:
        """Put an inbound event on its thread's partition; returns the entry id, or None for a repeat.

        Only after this returns may a source be told "accepted".
        """
        ids = await self.publish_all([event], dedupe=dedupe)
        return ids[0] if ids else None

    async def publish_all(self, events: Sequence[Event], *, dedupe: bool = True) -> list[str] | None:
        """Publish events of one thread together, in order: all of them, or none if any is a repeat (its
        idempotency key was seen). Returns their entry ids, or None for a repeat.

        Safe under the client's retry: a retried call answers the ids of its first run. With ``dedupe=False``
        nothing is checked and a retried call may publish twice.
        """
        if len({e.thread_id for e in events}) != 1:
            raise ValueError("publish_all takes events of exactly one thread")
        args: list[Any] = [SEEN_TTL, secrets.token_hex(8), install.ours(self.keys).dump()]
        for e in events:
            if dedupe and not e.key:
                raise ValueError(f"inbound event {e.type} has no idempotency key")
            args += [codec.encode(e, keep_thread=True), e.key if dedupe else ""]
        seen = [self.keys.seen(e.key or "-") for e in events]
        stream = self.keys.inbound_for(events[0].thread_id)
        try:
            entries = await self._publish(keys=[stream, self.keys.settings, *seen], args=args)
        except ResponseError as exc:
            raise install.refused(exc, self.keys) or exc from None
        if entries is None:
            return None
        return [entry.decode() if entry else "" for entry in entries]

    async def fenced(
        self, lease_key: str, token: str, commands: Sequence[Command], *, log: str = "", last_id: str = "0-0"
    ) -> list[Any]:
        """Apply ``commands`` atomically if ``token`` still holds ``lease_key`` (else LeaseLost) and ``log``,
        if given, still ends at ``last_id`` (else LogConflict)."""
        args: list[Any] = [token, last_id]
        for cmd in commands:
            args.append(len(cmd))
            args.extend(cmd)
        try:
            result: list[Any] = await self._fenced(keys=[lease_key, log], args=args)
        except ResponseError as exc:
            if "LEASELOST" in str(exc):
                raise LeaseLost(lease_key) from None
            if "CONFLICT" in str(exc):
                raise LogConflict(str(exc)) from None
            raise
        return result

    # -- the dead-letter stream -------------------------------------------------------------------------

    async def dead_letters(self, count: int = 100) -> list[tuple[str, dict[str, str]]]:
        rows = await self.redis.xrange(self.keys.dlq, count=count)
        return [(i.decode(), {k.decode(): v.decode(errors="replace") for k, v in f.items()}) for i, f in rows]

    async def retry_dead_letter(self, dlq_id: str) -> str:
        """Put a dead letter back on its inbound stream (bypassing the repeat check) and drop it from the DLQ."""
        rows = await self.redis.xrange(self.keys.dlq, min=dlq_id, max=dlq_id) if _STREAM_ID.match(dlq_id) else []
        if not rows:
            raise NotFound(f"no dead letter {dlq_id} (see 'handrail dlq list')")
        fields = rows[0][1]
        pipe = self.redis.pipeline(transaction=True)
        field = fields.get(b"field", b"e").decode()
        pipe.xadd(fields[b"stream"].decode(), {field: fields[b"payload"]})
        pipe.xdel(self.keys.dlq, dlq_id)
        entry, _ = await pipe.execute()
        return str(entry.decode())
