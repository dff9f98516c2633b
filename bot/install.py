"""What every process of an installation must agree on, recorded in Redis at first start and checked by each
process: the partition count, the key namespace and the event encoding. And the start-up check of Redis itself.

The record is one small JSON string under ``keys.settings``. Whoever finds it missing writes it (SET NX): the first
process to start, or the first after Redis came back empty. The scripts that put events on an inbound stream
compare it too, so a process whose settings went stale (a repartition while it ran) is refused at the door.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from bot import codec
from bot.errors import HandrailError, SettingsMismatch
from bot.keys import Keys

log = logging.getLogger(__name__)

# The Lua that opens every script that publishes: KEYS[settings] is keys.settings, ARGV[settings] this process's
# record. A missing record is written (Redis came back empty); a different one refuses the call.
CHECK_LUA = """
local recorded = redis.call('GET', KEYS[{key}])
if not recorded then
  redis.call('SET', KEYS[{key}], ARGV[{arg}])
elseif recorded ~= ARGV[{arg}] then
  return redis.error_reply('SETTINGS ' .. recorded)
end
"""


@dataclass(frozen=True)
class Recorded:
    namespace: str
    partitions: int
    encoding: int
    moving_to: int | None = None  # a repartition in progress (or interrupted): nobody may publish

    def dump(self) -> str:
        """The canonical form: scripts compare it byte for byte."""
        data = {"encoding": self.encoding, "namespace": self.namespace, "partitions": self.partitions}
        if self.moving_to is not None:
            data["moving_to"] = self.moving_to
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    @classmethod
    def load(cls, raw: bytes | str) -> Recorded:
        data = json.loads(raw)
        return cls(data["namespace"], int(data["partitions"]), int(data["encoding"]), data.get("moving_to"))


def ours(keys: Keys) -> Recorded:
    return Recorded(keys.ns, keys.partitions, codec.VERSION)


def mismatch(recorded: Recorded, mine: Recorded) -> SettingsMismatch | None:
    """What differs between the installation's record and this process, and what to do; None if nothing."""
    if recorded.moving_to is not None:
        return SettingsMismatch(
            f"the partition count of namespace {mine.namespace!r} is being changed from {recorded.partitions} to "
            f"{recorded.moving_to} (or the change was interrupted): finish it with "
            f"'handrail repartition {recorded.moving_to}', then start every process with "
            f"HANDRAIL_PARTITIONS={recorded.moving_to}"
        )
    problems = []
    if recorded.partitions != mine.partitions:
        problems.append(
            f"this process has HANDRAIL_PARTITIONS={mine.partitions} but the installation in Redis (namespace "
            f"{mine.namespace!r}) uses {recorded.partitions}; every process must use the same count: set "
            f"HANDRAIL_PARTITIONS={recorded.partitions}, or change it for all with "
            f"'handrail repartition {mine.partitions}' (stop the workers first)"
        )
    if recorded.encoding != mine.encoding:
        problems.append(
            f"this process encodes events as version {mine.encoding} but the installation's events are version "
            f"{recorded.encoding}; run every process on the same Handrail release"
        )
    if recorded.namespace != mine.namespace:
        problems.append(
            f"the settings under namespace {mine.namespace!r} were recorded for namespace {recorded.namespace!r} "
            "(copied keys?); check HANDRAIL_NAMESPACE"
        )
    return SettingsMismatch("; ".join(problems)) if problems else None


def refused(exc: ResponseError, keys: Keys) -> SettingsMismatch | None:
    """The mismatch behind a script's SETTINGS error reply (see CHECK_LUA), or None for any other error."""
    text = str(exc)
    if not text.startswith("SETTINGS "):
        return None
    return mismatch(Recorded.load(text.removeprefix("SETTINGS ")), ours(keys)) or SettingsMismatch(text)


async def check(redis: aioredis.Redis, keys: Keys) -> bool:
    """Record this process's settings if none are recorded, else refuse (SettingsMismatch) if they differ.

    Returns True if it recorded them: a first start, or Redis came back empty.
    """
    mine = ours(keys)
    if await redis.set(keys.settings, mine.dump(), nx=True):
        log.info("recorded the installation's settings: %s", mine.dump())
        return True
    raw = await redis.get(keys.settings)
    if raw is None:  # deleted between the two calls: try once more
        return await check(redis, keys)
    problem = mismatch(Recorded.load(raw), mine)
    if problem is not None:
        raise problem
    return False


SAFE_POLICIES = ("noeviction", "")  # "": a Redis that does not say (some managed ones)


async def check_eviction(redis: aioredis.Redis, *, allow: bool) -> None:
    """Refuse a Redis that may evict keys under memory pressure: logs, approvals and leases would vanish."""
    try:
        got = await redis.config_get("maxmemory-policy")
    except ResponseError as exc:  # CONFIG is often disabled on managed Redis: say so, and trust the operator
        log.warning("cannot read Redis's maxmemory-policy (%s); make sure it is noeviction", exc)
        return
    raw = next(iter(got.values()), b"")
    policy = raw.decode() if isinstance(raw, bytes) else str(raw)
    if policy in SAFE_POLICIES:
        return
    what = (
        f"Redis's maxmemory-policy is {policy!r}: when memory runs short it silently deletes keys, and with them "
        "thread logs, approvals, leases and de-duplication keys"
    )
    if allow:
        log.warning("%s (allowed by HANDRAIL_ALLOW_EVICTION)", what)
        return
    raise HandrailError(
        f"{what}. Set it to noeviction (CONFIG SET maxmemory-policy noeviction, and in redis.conf), "
        "or set HANDRAIL_ALLOW_EVICTION=1 to run anyway"
    )
