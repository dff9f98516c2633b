"""Approvals nobody decides in time expire: an outcome of its own (not a rejection), recorded in the thread like a
decision, so the agent can tell the user, and no button, link or API call can approve the call afterwards.

The pending-approvals set is scored by expiry, so what is due is its front. Any number of processes may run
``run_expirer``: each expiry is one atomic step in Redis (by Redis's clock), so it is recorded once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.exceptions import RedisError

from bot import approvals
from bot.agent import DEFAULT_EXPIRY
from bot.connections import server_time_ms
from bot.errors import HandrailError
from bot.runtime import Deps

log = logging.getLogger(__name__)

EVERY = 1.0  # seconds between looks at what is due
BATCH = 100  # approvals expired per look, at most


async def expire_due(deps: Deps, *, limit: int = BATCH) -> int:
    """Expire the approvals whose time has come; how many this call expired."""
    now = await server_time_ms(deps.redis)
    due = await deps.redis.zrangebyscore(deps.keys.pending_approvals, "-inf", now, start=0, num=limit)
    expired = 0
    for raw in due:
        try:
            outcome = await approvals.expire(deps.redis, deps.keys, raw.decode(), default_after=DEFAULT_EXPIRY)
        except (RedisError, HandrailError):  # Redis away, or this process's settings are stale: not this record's
            raise
        except Exception:  # a record this version cannot read holds up no other: logged, the rest expire
            log.exception("approval %s: cannot expire it", raw.decode(errors="replace"))
            continue
        if outcome.result == "ok":
            expired += 1
            log.info("approval %s expired", raw.decode())
    return expired


async def run_expirer(deps: Deps, stop: asyncio.Event, every: float = EVERY) -> None:
    while not stop.is_set():
        try:
            while await expire_due(deps) == BATCH and not stop.is_set():
                pass  # more were due than one batch holds
        except RedisError as exc:  # Redis restarting or unreachable: the next look tries again
            log.warning("cannot expire approvals (%s); retrying", exc)
        except Exception:  # e.g. this process's settings went stale: said, and tried again, as the scheduler does
            log.exception("expiring approvals failed; retrying")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
