"""Approval records: created with the gated call they are bound to, decided once, checked before running."""

from __future__ import annotations

import json
import secrets
import weakref
from dataclasses import dataclass
from typing import Any, Literal

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot import codec, install
from bot.bus import Command
from bot.errors import ApprovalRequired, NotFound
from bot.events import ApprovalDecided, ApprovalRequested, args_hash, now_ms
from bot.keys import Keys

# First decision wins: check the state, check the approver, record the decision and put the event on the
# inbound stream, all in one step. The decision keeps the caller's nonce, so the same call retried by the client
# after a lost reply is told "ok" again, not "already decided". No repeat-check key: the record itself makes a
# second decision impossible, and the thread's log drops a repeated event.
# KEYS: approval, pending set, inbound stream, recorded settings.
# ARGV: identity, "1"/"0", time, encoded event, (unused), id, approved-args hash, nonce, recorded settings.
_DECIDE = (
    install.CHECK_LUA.format(key=4, arg=9)
    + """
local st = redis.call('HMGET', KEYS[1], 'state', 'approvers', 'by', 'at', 'nonce', 'expires_at')
if not st[1] then return {'missing'} end
if st[1] ~= 'pending' then
  if st[5] == ARGV[8] then return {'ok', st[1], st[3], st[4]} end
  return {'decided', st[1], st[3], st[4]}
end
local expires = tonumber(st[6] or '')
if expires and expires > 0 then  -- past its time nobody decides, even before the expirer has recorded it
  local t = redis.call('TIME')
  if tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) >= expires then
    return {'decided', 'expired', '', tostring(expires)}
  end
end
local kind = string.match(ARGV[1], '^([^:]*):') or ''
local allowed = false
for a in string.gmatch(st[2], '[^\\n]+') do
  if a == ARGV[1] or a == kind .. ':*' then allowed = true end
end
if not allowed then return {'forbidden'} end
local state = 'rejected'
if ARGV[2] == '1' then state = 'approved' end
redis.call('HSET', KEYS[1], 'state', state, 'by', ARGV[1], 'at', ARGV[3], 'approved_hash', ARGV[7], 'nonce', ARGV[8])
redis.call('ZREM', KEYS[2], ARGV[6])
redis.call('XADD', KEYS[3], '*', 'e', ARGV[4])
return {'ok', state, ARGV[1], ARGV[3]}
"""
)

_scripts: weakref.WeakKeyDictionary[aioredis.Redis, Any] = weakref.WeakKeyDictionary()
_close_scripts: weakref.WeakKeyDictionary[aioredis.Redis, Any] = weakref.WeakKeyDictionary()

State = Literal["pending", "approved", "rejected", "cancelled", "expired"]

EXPIRED_BY = "handrail:expiry"  # who an expiry is recorded as: no person, no channel


@dataclass(frozen=True)
class ApprovalRecord:
    id: str
    thread_id: str
    call_id: str
    tool: str
    args: dict[str, Any]
    args_hash: str
    approvers: tuple[str, ...]
    reason: str
    state: State
    requested_at: int
    expires_at: int = 0
    by: str = ""
    at: int = 0
    approved_hash: str = ""


@dataclass(frozen=True)
class Outcome:
    """The answer to a decision attempt, for the channel it was made in."""

    result: Literal["ok", "decided", "forbidden", "missing", "later"]
    state: str = ""
    by: str = ""
    at: int = 0

    @property
    def message(self) -> str:
        if self.result == "ok":
            return f"{self.state} by {self.by}"
        if self.result == "decided":
            by = f" by {self.by}" if self.by else ""
            return f"already {self.state}{by} at {_clock(self.at)}"
        if self.result == "forbidden":
            return "you are not allowed to decide this approval"
        return "no such approval"


def _clock(ms: int) -> str:
    import datetime as dt

    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def request_commands(keys: Keys, req: ApprovalRequested) -> list[Command]:
    """The writes that open an approval; they go in the same atomic commit as the request event."""
    return [
        (
            "HSET", keys.approval(req.approval_id),
            "thread_id", req.thread_id, "call_id", req.call_id, "tool", req.tool,
            "args", json.dumps(req.args, sort_keys=True), "args_hash", req.args_hash,
            "approvers", "\n".join(req.approvers), "reason", req.reason, "state", "pending",
            "requested_at", req.at, "expires_at", req.expires_at,
        ),
        # scored by expiry: the expirer reads what is due from the front, and the list shows what runs out first
        ("ZADD", keys.pending_approvals, req.expires_at or req.at, req.approval_id),
    ]  # fmt: skip


# Close a pending approval without a decision (its thread was cancelled), unless a decision got there first;
# safe to run twice. KEYS: the record, the pending set. ARGV: the new state, the approval id.
_CLOSE = """
local st = redis.call('HMGET', KEYS[1], 'state', 'by', 'at')
redis.call('ZREM', KEYS[2], ARGV[2])
if st[1] and st[1] ~= 'pending' then return {'decided', st[1], st[2] or '', st[3] or '0'} end
if st[1] then
  local t = redis.call('TIME')
  redis.call('HSET', KEYS[1], 'state', ARGV[1], 'at', string.format('%d%03d', t[1], math.floor(t[2] / 1000)))
end
return {'ok', ARGV[1]}
"""


async def close(redis: aioredis.Redis, keys: Keys, approval_id: str, state: str) -> Outcome:
    """Close a pending approval as ``state``; "decided" (with who and when) if a decision got there first."""
    script = _close_scripts.get(redis)
    if script is None:
        script = _close_scripts[redis] = redis.register_script(_CLOSE)
    res = await script(keys=[keys.approval(approval_id), keys.pending_approvals], args=[state, approval_id])
    found = res[1].decode()
    if res[0] == b"ok" or found == state:  # closed now, or by an earlier try of this same close
        return Outcome("ok", state)
    return Outcome("decided", found, res[2].decode(), int(res[3] or 0))


# Expire a pending approval whose time has come, by Redis's clock, unless a decision got there first; safe to run
# in any number of processes at once (the state changes once, the event is published once). A record from before
# expiry existed gets its expiry (requested + ARGV[3] ms) and waits for it.
# KEYS: the record, the pending set, inbound stream, recorded settings. ARGV: id, encoded event, default ms, settings.
_EXPIRE = (
    install.CHECK_LUA.format(key=4, arg=4)
    + """
local st = redis.call('HMGET', KEYS[1], 'state', 'expires_at', 'requested_at', 'by', 'at')
if not st[1] then redis.call('ZREM', KEYS[2], ARGV[1]) return {'missing'} end
if st[1] ~= 'pending' then
  redis.call('ZREM', KEYS[2], ARGV[1])
  return {'decided', st[1], st[4] or '', st[5] or '0'}
end
local expires = tonumber(st[2] or '')
if not expires or expires <= 0 then
  expires = tonumber(st[3] or '0') + tonumber(ARGV[3])
  redis.call('HSET', KEYS[1], 'expires_at', expires)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if now < expires then
  redis.call('ZADD', KEYS[2], expires, ARGV[1])
  return {'later', tostring(expires)}
end
redis.call('HSET', KEYS[1], 'state', 'expired', 'by', '"""
    + EXPIRED_BY
    + """', 'at', now)
redis.call('ZREM', KEYS[2], ARGV[1])
redis.call('XADD', KEYS[3], '*', 'e', ARGV[2])
return {'ok', 'expired', '', tostring(now)}
"""
)
_expire_scripts: weakref.WeakKeyDictionary[aioredis.Redis, Any] = weakref.WeakKeyDictionary()


async def expire(redis: aioredis.Redis, keys: Keys, approval_id: str, *, default_after: float) -> Outcome:
    """Expire ``approval_id`` if its time has come and nobody decided: "ok" when this call expired it, "decided"
    (with the state) when it was settled before, "missing", or "later" (``at`` is when it expires)."""
    raw = await redis.hmget(keys.approval(approval_id), "thread_id", "requested_at", "expires_at")
    if raw[0] is None:
        await redis.zrem(keys.pending_approvals, approval_id)
        return Outcome("missing")
    thread_id = raw[0].decode()
    expires = int(raw[2] or 0) or int(raw[1] or 0) + int(default_after * 1000)
    waited = _duration(expires - int(raw[1] or expires))
    event = ApprovalDecided(
        thread_id=thread_id, key=f"approval:{approval_id}", approval_id=approval_id, approved=False, by=EXPIRED_BY,
        feedback=f"nobody decided within {waited}", expired=True,
    )  # fmt: skip
    script = _expire_scripts.get(redis)
    if script is None:
        script = _expire_scripts[redis] = redis.register_script(_EXPIRE)
    try:
        res = await script(
            keys=[keys.approval(approval_id), keys.pending_approvals, keys.inbound_for(thread_id), keys.settings],
            args=[approval_id, codec.encode(event, keep_thread=True), int(default_after * 1000),
                  install.ours(keys).dump()],
        )  # fmt: skip
    except ResponseError as exc:
        raise install.refused(exc, keys) or exc from None
    kind = res[0].decode()
    if kind == "later":
        return Outcome("later", "pending", at=int(res[1]))
    if kind in ("ok", "decided"):
        return Outcome(kind, res[1].decode(), (res[2] or b"").decode(), int(res[3] or 0))
    return Outcome("missing")


def _duration(ms: int) -> str:
    """A wait as people say it: 7 days, 36 hours, 90 minutes, 20 seconds."""
    seconds = max(ms, 0) // 1000
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= 2 * size or (seconds >= size and seconds % size == 0):
            n = seconds // size
            return f"{n} {unit}{'s' if n != 1 else ''}"
    return f"{seconds} second{'s' if seconds != 1 else ''}"


def settle_commands(keys: Keys, approval_id: str) -> list[Command]:
    """Once decided, an approval keeps only what the executor's gate and late deciders are told; the request
    itself lives on in the thread's log."""
    return [("HDEL", keys.approval(approval_id), "args", "approvers", "reason", "args_hash", "requested_at",
             "expires_at")]  # fmt: skip


def _record(approval_id: str, raw: dict[bytes, bytes]) -> ApprovalRecord:
    f = {k.decode(): v.decode() for k, v in raw.items()}
    return ApprovalRecord(
        id=approval_id,
        thread_id=f["thread_id"],
        call_id=f.get("call_id", approval_id),
        tool=f["tool"],
        args=json.loads(f.get("args", "{}")),
        args_hash=f.get("args_hash", ""),
        approvers=tuple(a for a in f.get("approvers", "").split("\n") if a),
        reason=f.get("reason", ""),
        state=f["state"],  # type: ignore[arg-type]
        requested_at=int(f.get("requested_at") or 0),
        expires_at=int(f.get("expires_at") or 0),
        by=f.get("by", ""),
        at=int(f.get("at") or 0),
        approved_hash=f.get("approved_hash", ""),
    )


async def get(redis: aioredis.Redis, keys: Keys, approval_id: str) -> ApprovalRecord:
    raw = await redis.hgetall(keys.approval(approval_id))
    if not raw:
        raise NotFound(f"no approval {approval_id!r} (see 'handrail approvals list')")
    return _record(approval_id, raw)


async def pending(redis: aioredis.Redis, keys: Keys, limit: int = 100) -> list[ApprovalRecord]:
    """The oldest ``limit`` approvals waiting for a decision (``control.approvals_page`` pages through all)."""
    ids = [i.decode() for i in await redis.zrange(keys.pending_approvals, 0, limit - 1)]
    return await records(redis, keys, ids)


async def records(redis: aioredis.Redis, keys: Keys, ids: list[str]) -> list[ApprovalRecord]:
    """The approval records of ``ids``, in that order; ids whose record is gone are left out."""
    pipe = redis.pipeline(transaction=False)
    for i in ids:
        pipe.hgetall(keys.approval(i))
    return [_record(i, raw) for i, raw in zip(ids, await pipe.execute(), strict=True) if raw]


async def decide(
    redis: aioredis.Redis,
    keys: Keys,
    approval_id: str,
    *,
    by: str,
    approved: bool,
    feedback: str = "",
    args: dict[str, Any] | None = None,
) -> Outcome:
    """Record a decision if it is the first and ``by`` may make it; the thread resumes from the inbound event.

    ``args`` replaces the call's arguments (an approver's edit); the caller validates them against the tool.
    """
    raw = await redis.hgetall(keys.approval(approval_id))
    if not raw:
        return Outcome("missing")
    rec = _record(approval_id, raw)
    run_args = rec.args if args is None else args
    event = ApprovalDecided(
        thread_id=rec.thread_id,
        key=f"approval:{approval_id}",
        approval_id=approval_id,
        approved=approved,
        by=by,
        feedback=feedback,
        args=args,
        args_hash=args_hash(rec.tool, run_args) if approved else "",
    )
    script = _scripts.get(redis)
    if script is None:
        script = _scripts[redis] = redis.register_script(_DECIDE)
    try:
        res = await script(
            keys=[
                keys.approval(approval_id),
                keys.pending_approvals,
                keys.inbound_for(rec.thread_id),
                keys.settings,
            ],
            args=[by, "1" if approved else "0", now_ms(), codec.encode(event, keep_thread=True), 0,
                  approval_id, event.args_hash, secrets.token_hex(8), install.ours(keys).dump()],
        )  # fmt: skip
    except ResponseError as exc:
        raise install.refused(exc, keys) or exc from None
    kind = res[0].decode()
    if kind in ("ok", "decided"):
        return Outcome(kind, res[1].decode(), (res[2] or b"").decode(), int(res[3] or 0))
    return Outcome(kind)


async def check_approved(
    redis: aioredis.Redis,
    keys: Keys,
    approval_id: str | None,
    tool: str,
    args: dict[str, Any],
    *,
    record: ApprovalRecord | None = None,
) -> ApprovalRecord:
    """The executor's gate: a recorded, approved decision bound to exactly this tool and these arguments.

    ``record`` is the approval record as read from Redis within this same step, if the caller has it.
    """
    if approval_id is None:
        raise ApprovalRequired(tool, "?", "no approval was requested for this call")
    rec = record
    if rec is None or rec.id != approval_id:
        raw = await redis.hgetall(keys.approval(approval_id))
        if not raw:
            raise ApprovalRequired(tool, approval_id, "no approval record")
        rec = _record(approval_id, raw)
    if rec.state != "approved":
        raise ApprovalRequired(tool, rec.call_id, f"approval is {rec.state}")
    if rec.tool != tool or rec.approved_hash != args_hash(tool, args):
        raise ApprovalRequired(tool, rec.call_id, "the approved call differs from this one")
    return rec
