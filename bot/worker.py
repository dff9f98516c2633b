"""Workers: each owns some inbound partitions (a lease with a fencing token) and applies their events in order.

Partitioning by thread gives one writer per thread and arrival order; a dead worker's lease lapses, another
worker takes the partition, claims the entries left pending (XAUTOCLAIM) and carries on from the thread logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import random
import socket
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bot import codec, threads
from bot.bus import Command
from bot.errors import LeaseLost, LogConflict
from bot.events import Event, now_ms
from bot.keys import INBOUND_GROUP
from bot.llm import LLMStep, load_litellm
from bot.loop import Runner, Tx
from bot.runtime import Deps

log = logging.getLogger(__name__)

_ACQUIRE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return false end
local token = ARGV[1] .. ':' .. redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], token, 'PX', ARGV[2])
return token
"""
_RENEW = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"

# Thread logs kept in memory per worker, each valid only under the lease it was read with. Small on purpose:
# every cached event is a few Python objects, and a large cache makes full garbage collections stall the loop.
CACHE_THREADS = 512


class Worker:
    def __init__(self, deps: Deps, worker_id: str | None = None, *, batch: int = 50) -> None:
        self.deps, self.keys, self.redis = deps, deps.keys, deps.redis
        self.id = worker_id or f"{socket.gethostname()}-{os.getpid()}-{random.randrange(1 << 20):x}"
        self.batch = batch
        self.runner = Runner(deps, deps.keys)
        self.lease_ms = deps.settings.lease_ms
        self.owned: dict[int, str] = {}  # partition -> fencing token
        self.tasks: dict[int, asyncio.Task[None]] = {}
        self._acquire = self.redis.register_script(_ACQUIRE)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)
        self.processed = 0
        self.cache: OrderedDict[str, tuple[str, threads.Thread]] = OrderedDict()  # thread id -> (lease, log)

    # -- membership ---------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        log.info("worker %s started", self.id)
        if any(isinstance(a.step, LLMStep) for a in self.deps.agents.agents.values()):
            # litellm takes seconds to import; doing it on the first model call would stall lease renewals
            await asyncio.to_thread(load_litellm)
        try:
            while not stop.is_set():
                try:
                    await self.rebalance()
                except (RedisError, OSError) as exc:  # Redis restarting or unreachable: keep trying
                    log.warning("worker %s: cannot reach Redis (%s); retrying", self.id, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.lease_ms / 3000)
        finally:
            await self.shutdown()

    async def rebalance(self) -> None:
        """Heartbeat, keep my leases alive, and hold a fair share of the partitions."""
        now = now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.workers, {self.id: now})
        pipe.zremrangebyscore(self.keys.workers, 0, now - 3 * self.lease_ms)
        pipe.zcount(self.keys.workers, now - self.lease_ms, "+inf")
        _, _, live = await pipe.execute()
        for p, token in list(self.owned.items()):
            if not await self._renew(keys=[self.keys.lease(p)], args=[token, self.lease_ms]):
                log.warning("worker %s lost partition %d", self.id, p)
                self._drop(p)
        for p, task in list(self.tasks.items()):
            if task.done():  # stopped on an error: let the partition go, to us or another worker
                await self._give_up(p)
        share = math.ceil(self.keys.partitions / max(int(live), 1))
        for p in list(self.owned)[share:]:
            await self._give_up(p)
        free = [p for p in range(self.keys.partitions) if p not in self.owned]
        random.shuffle(free)
        for p in free:
            if len(self.owned) >= share:
                break
            token = await self._acquire(keys=[self.keys.lease(p), self.keys.fence(p)], args=[self.id, self.lease_ms])
            if token:
                self.owned[p] = token.decode()
                self.tasks[p] = asyncio.create_task(self._partition(p, self.owned[p]), name=f"partition-{p}")

    def _drop(self, p: int) -> None:
        self.owned.pop(p, None)
        task = self.tasks.pop(p, None)
        if task and not task.done():
            task.cancel()

    async def _give_up(self, p: int) -> None:
        token = self.owned.get(p)
        self._drop(p)
        if token:
            await self._release(keys=[self.keys.lease(p)], args=[token])

    async def shutdown(self) -> None:
        tasks, held = list(self.tasks.values()), dict(self.owned)
        for p in held:
            self._drop(p)
        await _stopped(tasks)
        # leases are released only after the tasks stopped, so no one else writes while we still might
        for p, token in held.items():
            await self._release(keys=[self.keys.lease(p)], args=[token])
        await self.redis.zrem(self.keys.workers, self.id)

    # -- one partition ------------------------------------------------------------------------------------

    async def _partition(self, p: int, token: str) -> None:
        stream = self.keys.inbound(p)
        try:
            # Entries a dead owner left pending become ours; reading history ("0") replays them in order.
            cursor = "0-0"
            while True:
                # Redis 7 answers [cursor, entries, deleted], Redis 6.2 (the embedded one) [cursor, entries]
                cursor = (await self.redis.xautoclaim(stream, INBOUND_GROUP, self.id, 0, cursor, count=500))[0]
                if cursor in (b"0-0", "0-0"):
                    break
            backlog = True
            while True:
                got = await self.redis.xreadgroup(
                    INBOUND_GROUP, self.id, {stream: "0" if backlog else ">"}, count=self.batch,
                    block=None if backlog else 2000,
                )  # fmt: skip
                entries = [e for _, batch in got for e in batch]
                if backlog and not entries:
                    backlog = False
                    continue
                for entry_id, fields in entries:
                    ok = await self._handle(p, token, stream, entry_id, fields)
                    if not ok:
                        backlog = True  # a failed entry stays pending; retry it before anything newer
                        break
        except LeaseLost:
            log.warning("worker %s: partition %d was taken over; stopping it", self.id, p)
        except asyncio.CancelledError:
            raise
        except RedisError as exc:
            log.warning("worker %s: partition %d stopped: %s", self.id, p, exc)
        except Exception:
            log.exception("worker %s: partition %d stopped", self.id, p)

    async def _handle(
        self, p: int, token: str, stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None
    ) -> bool:
        ack: list[Command] = [("XACK", stream, INBOUND_GROUP, entry_id), ("XDEL", stream, entry_id)]
        try:
            event = codec.decode(fields[b"e"]) if fields else None
        except Exception as exc:
            await self._dead_letter(p, token, stream, entry_id, fields, f"undecodable entry: {exc}", ack)
            return True
        if event is None:
            await self.deps.bus.fenced(self.keys.lease(p), token, ack)
            return True
        try:
            await self.apply(p, token, event, ack)
            self.processed += 1
            return True
        except LeaseLost:
            raise
        except (RedisConnectionError, RedisTimeoutError):
            self.cache.pop(event.thread_id, None)
            raise  # Redis is away: not this event's fault; the partition stops and is taken up again
        except LogConflict:
            self.cache.pop(event.thread_id, None)  # our view of the log is stale; reload it and go again
            return False
        except Exception as exc:
            self.cache.pop(event.thread_id, None)  # what is in memory may include uncommitted events
            attempts = await self.redis.hincrby(f"{self.keys.ns}:attempts", entry_id, 1)
            log.exception("thread %s: event %s failed (attempt %d)", event.thread_id, event.type, attempts)
            if attempts >= self.deps.settings.max_deliveries:
                await self._dead_letter(p, token, stream, entry_id, fields, f"{type(exc).__name__}: {exc}", ack)
                return True
            await asyncio.sleep(min(0.1 * 2**attempts, 5.0))
            return False

    async def apply(self, p: int, token: str, event: Event, ack: Sequence[Command]) -> None:
        cached = self.cache.get(event.thread_id)
        if cached is not None and cached[0] == token:
            thread = cached[1]
        else:  # never read, evicted, or read under an earlier lease (someone else may have written since)
            thread = await threads.load(self.redis, self.keys, event.thread_id)
        self.cache[event.thread_id] = (token, thread)
        self.cache.move_to_end(event.thread_id)
        if len(self.cache) > CACHE_THREADS:
            self.cache.popitem(last=False)

        async def commit(log: str, last_id: str, cmds: Sequence[Command]) -> list[Any]:
            return await self.deps.bus.fenced(self.keys.lease(p), token, cmds, log=log, last_id=last_id)

        tx = Tx(thread, self.keys, commit, self.deps.agents.spec.webhooks)
        name = event.agent if event.type == "thread.launched" else thread.agent
        agent = self.deps.agents.agents.get(name)
        if agent is None and name:
            log.error("thread %s: agent %r is not configured; recording the event only", thread.id, name)
        await self.runner.apply(tx, agent, event)
        await tx.flush(*ack, ("HDEL", f"{self.keys.ns}:attempts", ack[0][3]))

    async def _dead_letter(
        self, p: int, token: str, stream: str, entry_id: bytes, fields: dict[bytes, bytes] | None, error: str,
        ack: Sequence[Command],
    ) -> None:  # fmt: skip
        payload = (fields or {}).get(b"e", b"")
        await self.deps.bus.fenced(self.keys.lease(p), token, [
            ("XADD", self.keys.dlq, "*", "stream", stream, "field", "e", "payload", payload, "error", error,
             "entry", entry_id),
            *ack,
            ("HDEL", f"{self.keys.ns}:attempts", entry_id),
        ])  # fmt: skip
        log.error("dead-lettered %s from %s: %s", entry_id.decode(), stream, error)


async def _stopped(tasks: list[asyncio.Task[None]]) -> None:
    """Wait for cancelled tasks to end, cancelling again if one swallowed it (redis-py can, mid-reconnect)."""
    while tasks:
        _, pending = await asyncio.wait(tasks, timeout=1.0)
        for task in pending:
            task.cancel()
        tasks = list(pending)
